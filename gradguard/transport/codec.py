"""Tensors on the wire and on disk: safetensors bytes, SHA-256 checksums, chunked streams.

Never pickle: safetensors holds only names, dtypes, shapes and raw little-endian data, so a
hostile payload cannot run code on the aggregator. Messages stay under gRPC's default 4 MiB
limit because payloads travel in ``chunk_bytes`` pieces after a typed header.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from gradguard.transport._generated.v1 import aggregator_pb2 as pb
from gradguard.update import ProtectedUpdate

CHUNK_BYTES = 1 << 20  # 1 MiB, the largest chunk a client sends: a quarter of gRPC's default limit
# The largest message a server accepts: a chunk plus room for a header. Bounding it bounds what
# one call can make the server hold at once, whatever chunk size a client would like to use.
MAX_MESSAGE_BYTES = CHUNK_BYTES + (64 << 10)
PIECE_BYTES = 1 << 20  # what the server holds of one update at a time while checking or summing it
_READ_BYTES = 1 << 20

# safetensors' dtype codes for the dtypes a model state may hold.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
CODE_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})

_UPDATE_METADATA_KEY = "gradguard.update"  # safetensors metadata entry of a saved update


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
        items = sorted(((name, t.detach().cpu().contiguous()) for name, t in tensors.items()),
                       key=lambda item: (-item[1].element_size(), item[0]))
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, tensor in items:
            size = tensor.numel() * tensor.element_size()
            header[name] = {"dtype": dtype_code(tensor.dtype), "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._prefix = struct.pack("<Q", len(raw)) + raw
        self._tensors = [tensor for _, tensor in items]
        self.total_bytes = len(self._prefix) + offset

    def buffers(self) -> Iterator[memoryview]:
        """The payload as consecutive views: the header, then each tensor's bytes."""
        yield memoryview(self._prefix)
        for tensor in self._tensors:
            yield memoryview(tensor.reshape(-1).view(torch.uint8).numpy())

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for buffer in self.buffers():
            digest.update(buffer)
        return digest.hexdigest()

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The payload in pieces of ``chunk_bytes`` (the last one shorter)."""
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
                    yield b"".join(parts)
                    parts, pending = [], 0
        if parts:
            yield b"".join(parts)

    def to_bytes(self) -> bytes:
        return b"".join(self.buffers())

    def write(self, path: Path) -> str:
        """Write the payload to ``path``; returns its SHA-256, computed in the same pass."""
        digest = hashlib.sha256()
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


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    """Write ``tensors`` as a safetensors file; returns the file's SHA-256."""
    return TensorPayload(tensors).write(path)


def read_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``name -> (dtype code, shape)`` of a safetensors file, validating its header.

    Only the header is read. Raises ``safetensors.SafetensorError`` (or ``OSError``) for a file
    that is not well-formed safetensors: bad header, offsets outside the data, trailing bytes.
    """
    with safetensors.safe_open(str(path), framework="pt") as f:
        slices = {name: f.get_slice(name) for name in f.keys()}
        return {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()}


@dataclass(frozen=True)
class TensorPiece:
    """A run of consecutive elements of one tensor, as read from a file."""

    name: str
    shape: tuple[int, ...]
    start: int  # index of values[0] in the flattened tensor
    values: torch.Tensor  # 1-D


def iter_pieces(path: Path, *, max_bytes: int | None = PIECE_BYTES) -> Iterator[TensorPiece]:
    """The tensors of a safetensors file in file order, in pieces of at most ``max_bytes``
    (None: whole tensors).

    Reads byte ranges into fresh buffers instead of memory-mapping the file, so the caller's
    resident memory grows by one piece, not by the file: this is what keeps the aggregator's
    memory flat while many updates are checked and summed.
    """
    read_layout(path)  # safetensors validates the header and the offsets first
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        base = 8 + header_len
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = CODE_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r} has dtype {entry['dtype']}, which gradguard does not handle")
            start, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            step = end - start if max_bytes is None else max(1, max_bytes // dtype.itemsize) * dtype.itemsize
            f.seek(base + start)
            for offset in range(start, end, step) if end > start else [start]:  # empty: one empty piece
                buffer = bytearray(min(step, end - offset))
                f.readinto(buffer)
                values = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
                yield TensorPiece(name, shape, (offset - start) // dtype.itemsize, values)


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The whole tensors of a safetensors file, one at a time (see :func:`iter_pieces`)."""
    for piece in iter_pieces(path, max_bytes=None):
        yield piece.name, piece.values.reshape(piece.shape)


def update_header(update: ProtectedUpdate, payload: TensorPayload, *, client_id: str) -> pb.UpdateHeader:
    """The header that precedes ``payload`` (the update's tensors) on the wire."""
    header = pb.UpdateHeader(
        round=update.round, client_id=client_id, kind=update.kind, num_samples=update.num_samples,
        num_steps=update.num_steps, metadata=update.metadata, total_bytes=payload.total_bytes,
        sha256=payload.sha256(),
    )
    for name in ("batch_size", "learning_rate", "epsilon", "delta"):
        value = getattr(update, name)
        if value is not None:
            setattr(header, name, value)
    return header


def submit_messages(header: pb.UpdateHeader, payload: TensorPayload, *,
                    chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.SubmitUpdateRequest]:
    yield pb.SubmitUpdateRequest(header=header)
    for chunk in payload.chunks(chunk_bytes):
        yield pb.SubmitUpdateRequest(data=chunk)


def save_update(update: ProtectedUpdate, path: str | Path) -> None:
    """Write ``update`` to a safetensors file; its metadata travels in the file's header."""
    fields = {f.name: getattr(update, f.name) for f in dataclasses.fields(update) if f.name != "tensors"}
    TensorPayload(update.tensors, metadata={_UPDATE_METADATA_KEY: json.dumps(fields)}).write(Path(path))


def load_update(path: str | Path) -> ProtectedUpdate:
    """Read an update written by :func:`save_update`."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_UPDATE_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} has no {_UPDATE_METADATA_KEY!r} metadata: write it with "
                         "gradguard.transport.codec.save_update")
    return ProtectedUpdate(tensors=safetensors.torch.load_file(str(path)), **json.loads(raw))
