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
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from gradguard.transport._generated.v1 import aggregator_pb2 as pb
from gradguard.update import ProtectedUpdate

CHUNK_BYTES = 1 << 20  # 1 MiB: a quarter of gRPC's default message limit
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


def _cpu_contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of ``tensors`` (moved to CPU; safetensors refuses shared storage)."""
    return safetensors.torch.save(_cpu_contiguous(tensors))


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


def iter_chunks(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), chunk_bytes):
        yield bytes(view[start:start + chunk_bytes])


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    safetensors.torch.save_file(_cpu_contiguous(tensors), str(path))


def read_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``name -> (dtype code, shape)`` of a safetensors file, validating its header.

    Only the header is read. Raises ``safetensors.SafetensorError`` (or ``OSError``) for a file
    that is not well-formed safetensors: bad header, offsets outside the data, trailing bytes.
    """
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file, one at a time, in file order.

    Reads each tensor's byte range into its own buffer instead of memory-mapping the file, so
    the caller's resident memory grows by one tensor, not by the file: this is what keeps the
    aggregator's memory flat while many updates are checked and summed at once.
    """
    read_layout(path)  # safetensors validates the header and the offsets first
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        base = 8 + header_len
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, end = entry["data_offsets"]
            dtype = CODE_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r} has dtype {entry['dtype']}, which gradguard does not handle")
            buffer = bytearray(end - start)
            f.seek(base + start)
            f.readinto(buffer)
            flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            yield name, flat.reshape(entry["shape"])


def update_header(update: ProtectedUpdate, payload: bytes, *, client_id: str) -> pb.UpdateHeader:
    """The header that precedes ``payload`` (the update's safetensors bytes) on the wire."""
    header = pb.UpdateHeader(
        round=update.round, client_id=client_id, kind=update.kind, num_samples=update.num_samples,
        num_steps=update.num_steps, metadata=update.metadata, total_bytes=len(payload),
        sha256=sha256_hex(payload),
    )
    for name in ("batch_size", "learning_rate", "epsilon", "delta"):
        value = getattr(update, name)
        if value is not None:
            setattr(header, name, value)
    return header


def submit_messages(header: pb.UpdateHeader, payload: bytes, *,
                    chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.SubmitUpdateRequest]:
    yield pb.SubmitUpdateRequest(header=header)
    for chunk in iter_chunks(payload, chunk_bytes):
        yield pb.SubmitUpdateRequest(data=chunk)


def save_update(update: ProtectedUpdate, path: str | Path) -> None:
    """Write ``update`` to a safetensors file; its metadata travels in the file's header."""
    fields = {f.name: getattr(update, f.name) for f in dataclasses.fields(update) if f.name != "tensors"}
    safetensors.torch.save_file(_cpu_contiguous(update.tensors), str(path),
                                metadata={_UPDATE_METADATA_KEY: json.dumps(fields)})


def load_update(path: str | Path) -> ProtectedUpdate:
    """Read an update written by :func:`save_update`."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_UPDATE_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} has no {_UPDATE_METADATA_KEY!r} metadata: write it with "
                         "gradguard.transport.codec.save_update")
    return ProtectedUpdate(tensors=safetensors.torch.load_file(str(path)), **json.loads(raw))
