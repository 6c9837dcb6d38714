"""Tensors on the wire and on disk: safetensors bytes, BLAKE3 checksums, chunked streams.

Never pickle: safetensors holds only names, dtypes, shapes and raw little-endian data, so a
hostile payload cannot run code on the aggregator. Messages stay under gRPC's default 4 MiB
limit because payloads travel in ``chunk_bytes`` pieces after a typed header.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from gradguard.leakage import LeakageEstimate
from gradguard.transport._generated.v1 import aggregator_pb2 as pb
from gradguard.transport.wire import (CHUNK_BYTES, canonical_order, data_message, header_bytes, new_digest, read_ahead,
                                      read_header, read_range)
from gradguard.update import ProtectedUpdate

# safetensors' dtype codes for the dtypes a model state may hold.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
CODE_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}

_UPDATE_METADATA_KEY = "gradguard.update"  # safetensors metadata entry of a saved update
# Chunks framed ahead of gRPC while it sends. One is enough (framing and hashing a chunk takes
# under half the time gRPC takes to send it), and every chunk more in flight makes the allocator
# give memory back and fault it in again (measured: 1000 faults per 45 MB update with 1, 1500 with 2).
_READ_AHEAD_MESSAGES = 1


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be sent; supported: {sorted(map(str, DTYPE_CODES))}") from None


class TensorPayload:
    """A state dict laid out as a safetensors file, produced without building the file in memory.

    ``safetensors.torch.save`` copies every tensor twice before a byte leaves; this reads the
    tensors' own memory, so the only copies are the chunks protobuf needs anyway. Tensors are
    ordered by element size, largest first, so every tensor's data stays aligned, as in files
    written by safetensors itself. The tensors must not change while the payload is in use.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None) -> None:
        contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        layout = canonical_order({name: (dtype_code(t.dtype), tuple(t.shape)) for name, t in contiguous.items()})
        self._prefix, _ = header_bytes(layout, metadata)
        self._tensors = [contiguous[name] for name in layout]
        self.total_bytes = len(self._prefix) + sum(t.numel() * t.element_size() for t in self._tensors)

    def buffers(self) -> Iterator[memoryview]:
        """The payload as consecutive views: the header, then each tensor's bytes."""
        yield memoryview(self._prefix)
        for tensor in self._tensors:
            # numpy's stubs give ndarray __buffer__ only from Python 3.12; it is a buffer on every version.
            yield memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]

    def digest(self) -> str:
        digest = new_digest()
        for buffer in self.buffers():
            digest.update(buffer)
        return digest.hexdigest()

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The payload in pieces of ``chunk_bytes`` (the last one shorter)."""
        for parts in self.chunk_parts(chunk_bytes):
            yield b"".join(parts)

    def chunk_parts(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[list[memoryview]]:
        """The views each piece of :meth:`chunks` is made of, uncopied."""
        parts: list[memoryview] = []
        pending = 0
        for buffer in self.buffers():
            position = 0
            while position < len(buffer):
                take = min(chunk_bytes - pending, len(buffer) - position)
                parts.append(buffer[position:position + take])
                pending += take
                position += take
                if pending == chunk_bytes:
                    yield parts
                    parts, pending = [], 0
        if parts:
            yield parts

    def to_bytes(self) -> bytes:
        return b"".join(self.buffers())

    def write(self, path: Path) -> str:
        """Write the payload to ``path``; returns its BLAKE3 digest, computed in the same pass."""
        digest = new_digest()
        with open(path, "wb") as f:
            for buffer in self.buffers():
                digest.update(buffer)
                f.write(buffer)
        return digest.hexdigest()


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of ``tensors`` (moved to CPU)."""
    return TensorPayload(tensors).to_bytes()


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes; raises ``safetensors.SafetensorError`` when malformed."""
    return safetensors.torch.load(data)


def digest_hex(data: bytes) -> str:
    return new_digest(data).hexdigest()


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    """Write ``tensors`` as a safetensors file; returns the file's BLAKE3 digest."""
    return TensorPayload(tensors).write(path)


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file, one at a time, each read into its own buffer (the
    file is not memory-mapped, so memory grows by one tensor, not by the file)."""
    header = read_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, entry in header.entries.items():
            raw = bytearray(read_range(fd, header, name, 0, entry.numel))
            values = torch.frombuffer(raw, dtype=CODE_DTYPES[entry.code]) if raw else torch.empty(
                0, dtype=CODE_DTYPES[entry.code])
            yield name, values.reshape(entry.shape)
    finally:
        os.close(fd)


def update_header(update: ProtectedUpdate, payload: TensorPayload, *, client_id: str) -> pb.UpdateHeader:
    """The header that precedes ``payload`` (the update's tensors) on the wire. Its ``digest`` is
    left empty: the trailer carries the digest, computed while the payload streams."""
    header = pb.UpdateHeader(
        round=update.round, client_id=client_id, kind=update.kind, num_samples=update.num_samples,
        num_steps=update.num_steps, metadata=update.metadata, total_bytes=payload.total_bytes,
    )
    for name in ("batch_size", "learning_rate", "epsilon", "delta"):
        value = getattr(update, name)
        if value is not None:
            setattr(header, name, value)
    if update.leakage is not None:
        header.leakage.CopyFrom(leakage_report(update.leakage))
    return header


def leakage_report(estimate: LeakageEstimate) -> pb.LeakageReport:
    """``estimate`` as the header's LeakageReport; an SSIM not computed (NaN) is left absent."""
    values = {f.name: getattr(estimate, f.name) for f in dataclasses.fields(estimate)}
    return pb.LeakageReport(**{name: value for name, value in values.items()
                               if not (isinstance(value, float) and math.isnan(value))})


def submit_messages(header: pb.UpdateHeader, payload: TensorPayload, *,
                    chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The serialized SubmitUpdateRequests: the header, the payload in chunks, then the trailer
    with the payload's BLAKE3 digest. A helper thread frames each chunk straight from the tensors'
    memory (one copy) and hashes it while gRPC sends the chunks before it: gRPC asks for
    the next message only once the last one is sent, so making it then would stall the stream."""
    def messages() -> Iterator[bytes]:
        yield pb.SubmitUpdateRequest(header=header).SerializeToString()
        digest = new_digest()
        for parts in payload.chunk_parts(chunk_bytes):
            message = data_message(parts)
            for part in parts:  # just read by the copy: still in the cache
                digest.update(part)
            yield message
        yield pb.SubmitUpdateRequest(trailer=pb.UpdateTrailer(digest=digest.hexdigest())).SerializeToString()
    return read_ahead(messages(), _READ_AHEAD_MESSAGES)


def save_update(update: ProtectedUpdate, path: str | Path) -> None:
    """Write ``update`` to a safetensors file; its metadata travels in the file's header."""
    fields = {f.name: getattr(update, f.name) for f in dataclasses.fields(update) if f.name != "tensors"}
    if update.leakage is not None:
        fields["leakage"] = update.leakage.to_dict()
    TensorPayload(update.tensors, metadata={_UPDATE_METADATA_KEY: json.dumps(fields)}).write(Path(path))


def load_update(path: str | Path) -> ProtectedUpdate:
    """Read an update written by :func:`save_update`."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_UPDATE_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} has no {_UPDATE_METADATA_KEY!r} metadata: write it with "
                         "gradguard.transport.codec.save_update")
    fields = json.loads(raw)
    if fields.get("leakage") is not None:
        fields["leakage"] = LeakageEstimate.from_dict(fields["leakage"])
    return ProtectedUpdate(tensors=safetensors.torch.load_file(str(path)), **fields)
