"""Safetensors for the aggregator, with numpy only: headers checked strictly, values read by range;
and the framing of an update's data chunks on the wire.

The server never imports torch (it would cost ~700 MB of resident memory for nothing): it reads
and writes the safetensors layout itself. A file is ``u64 header length | JSON header | data``;
the header maps each name to its dtype, shape and ``[start, end)`` byte range in the data, and
may hold a ``__metadata__`` map of strings. :func:`parse_header` accepts exactly what the
reference implementation accepts: known dtypes, ranges that match the shapes and tile the data
without gaps or overlaps.
"""
from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Full, Queue
from typing import Any, TypeVar

import blake3
import numpy as np

CHUNK_BYTES = 1 << 20  # 1 MiB, the largest chunk a client sends: a quarter of gRPC's default limit
# The largest message a server accepts: a chunk plus room for a header. Bounding it bounds what
# one call can make the server hold at once, whatever chunk size a client would like to use.
MAX_MESSAGE_BYTES = CHUNK_BYTES + (64 << 10)
# A SubmitUpdateRequest holding only ``bytes data = 2`` is this tag (field 2, length-delimited),
# the length as a varint, then the bytes. Both sides frame data chunks themselves: protobuf would
# copy each chunk twice on the client and twice on the server (a parsed bytes field is copied on
# every access), more CPU than the transfer itself takes on loopback.
_DATA_TAG = 0x12
_MAX_VARINT_BYTES = 10
PIECE_BYTES = 1 << 20  # what the server holds of one tensor at a time while reading it
_READ_BYTES = 1 << 20

ITEM_BYTES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                              "U8": 1, "BOOL": 1}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
# numpy's little-endian dtype of each code; BF16 has none, it is widened through its float32 bits.
_NUMPY: dict[str, str] = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                          "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
# The largest finite value of each float code: a global model entry beyond it is inf.
FLOAT_MAX: dict[str, float] = {"F64": float(np.finfo(np.float64).max), "F32": float(np.finfo(np.float32).max),
                               "F16": float(np.finfo(np.float16).max), "BF16": 3.3895313892515355e38}

Layout = dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype code, shape)
_Item = TypeVar("_Item")


class MalformedSafetensors(ValueError):
    """Bytes that are not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorEntry:
    code: str
    shape: tuple[int, ...]
    start: int  # byte range in the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    entries: dict[str, TensorEntry]  # in data order
    data_start: int  # file offset of the data section: 8 + the header's length
    metadata: dict[str, str]

    @property
    def layout(self) -> Layout:
        return {name: (e.code, e.shape) for name, e in self.entries.items()}

    @property
    def total_bytes(self) -> int:
        return self.data_start + max((e.end for e in self.entries.values()), default=0)


def parse_header(raw: bytes, *, data_bytes: int) -> SafetensorsHeader:
    """The header ``raw`` (the JSON after the length prefix) of a file whose data section is
    ``data_bytes`` long; raises :class:`MalformedSafetensors` naming the first problem."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MalformedSafetensors(f"the header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise MalformedSafetensors("the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise MalformedSafetensors("__metadata__ is not a map of strings to strings")
    entries: dict[str, TensorEntry] = {}
    for name, spec in header.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise MalformedSafetensors(f"entry {name[:64]!r} is not {{dtype, shape, data_offsets}}")
        code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if code not in ITEM_BYTES:
            raise MalformedSafetensors(f"entry {name[:64]!r} has dtype {str(code)[:16]!r}, which is not one of "
                                       f"{sorted(ITEM_BYTES)}")
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets)):
            raise MalformedSafetensors(f"entry {name[:64]!r} has a malformed shape or data_offsets")
        entry = TensorEntry(code, tuple(shape), offsets[0], offsets[1])
        if entry.end - entry.start != entry.numel * ITEM_BYTES[code]:
            raise MalformedSafetensors(f"entry {name[:64]!r}: data_offsets {offsets} do not hold shape {shape} "
                                       f"of {code}")
        entries[name] = entry
    position = 0
    ordered = sorted(entries.items(), key=lambda item: (item[1].start, item[1].end))
    for name, entry in ordered:
        if entry.start != position:
            raise MalformedSafetensors(f"entry {name[:64]!r} starts at {entry.start}, not {position}: the data "
                                       "ranges must tile the data section without gaps or overlaps")
        position = entry.end
    if position != data_bytes:
        raise MalformedSafetensors(f"the tensors hold {position} bytes but the data section is {data_bytes}")
    return SafetensorsHeader(dict(ordered), 8 + len(raw), metadata)


def read_header(path: Path, *, max_header_bytes: int | None = None) -> SafetensorsHeader:
    """The checked header of the safetensors file at ``path``."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise MalformedSafetensors("the file is shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8 or (max_header_bytes is not None and length > max_header_bytes):
            raise MalformedSafetensors(f"the header length {length} exceeds the file or the limit")
        return parse_header(f.read(length), data_bytes=size - 8 - length)


def data_message(parts: Sequence[bytes | memoryview]) -> bytes:
    """The serialized SubmitUpdateRequest whose data is ``parts`` concatenated, built in one copy."""
    size, length = sum(len(part) for part in parts), bytearray()
    while size >= 0x80:
        length.append(size & 0x7F | 0x80)
        size >>= 7
    length.append(size)
    return b"".join([bytes((_DATA_TAG,)), length, *parts])


def data_view(message: bytes) -> memoryview | None:
    """The data of a serialized SubmitUpdateRequest that holds its data field and nothing else,
    as a view of ``message``; None for any other message (for protobuf to parse)."""
    if message[:1] != bytes((_DATA_TAG,)):
        return None
    size = 0
    for position in range(1, min(len(message), 1 + _MAX_VARINT_BYTES)):
        byte = message[position]
        size |= (byte & 0x7F) << (7 * (position - 1))
        if byte < 0x80:
            start = position + 1
            return memoryview(message)[start:] if size == len(message) - start else None
    return None


def to_float64(code: str, raw: bytes | bytearray | memoryview) -> np.ndarray:
    """The values of raw little-endian ``code`` bytes as float64."""
    values = np.frombuffer(raw, dtype=_NUMPY[code])
    if code == "BF16":  # a bfloat16 is the upper half of a float32
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float64)


def from_float64(code: str, values: np.ndarray) -> bytes:
    """float64 ``values`` rounded to ``code`` (to nearest, ties to even) as raw bytes."""
    if code != "BF16":
        return values.astype(_NUMPY[code]).tobytes()
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded.astype("<u2").tobytes()


def read_range(fd: int, header: SafetensorsHeader, name: str, first: int, count: int) -> bytes:
    """Raw bytes of elements ``[first, first + count)`` of tensor ``name`` in the open file ``fd``."""
    entry = header.entries[name]
    item = ITEM_BYTES[entry.code]
    data = os.pread(fd, count * item, header.data_start + entry.start + first * item)
    if len(data) != count * item:
        raise MalformedSafetensors(f"the file ends inside tensor {name!r}")
    return data


def max_abs(path: Path, header: SafetensorsHeader) -> dict[str, float]:
    """The largest absolute value of each floating-point tensor of a file (inf if any is not finite)."""
    bounds = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, entry in header.entries.items():
            if entry.code in FLOAT_CODES:
                largest = 0.0
                for first, count in iter_ranges(entry.numel, PIECE_BYTES // ITEM_BYTES[entry.code]):
                    values = np.abs(to_float64(entry.code, read_range(fd, header, name, first, count)))
                    largest = max(largest, float(values.max()) if not np.isnan(values).any() else math.inf)
                bounds[name] = largest
    finally:
        os.close(fd)
    return bounds


def iter_ranges(numel: int, step: int) -> Iterator[tuple[int, int]]:
    """``(first, count)`` covering ``range(numel)`` in runs of at most ``step``."""
    for first in range(0, numel, step):
        yield first, min(step, numel - first)


def header_bytes(layout: Layout, metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """The length-prefixed header of a file holding ``layout`` (in that order), and each
    tensor's data offset; the data starts 8-byte aligned."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, position = {}, 0
    for name, (code, shape) in layout.items():
        size = math.prod(shape) * ITEM_BYTES[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [position, position + size]}
        offsets[name] = position
        position += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def canonical_order(layout: Layout) -> Layout:
    """``layout`` ordered as safetensors writes it: largest elements first, then by name, so
    that every tensor's data stays aligned to its element size."""
    return dict(sorted(layout.items(), key=lambda item: (-ITEM_BYTES[item[1][0]], item[0])))


# A file written with flush_behind is fdatasynced each time this much more has been written.
FLUSH_BEHIND_BYTES = 8 << 20


class _Flusher:
    """A thread that fdatasyncs an open file whenever asked, so that the disk persists a file
    while it is still being written. On a virtual disk the flush, not the write, is the slow part
    (about 0.07 s for 45 MB): flushing behind the writer leaves the final fsync a few MiB."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._asked = threading.Event()
        self._stopping = False
        self.error: OSError | None = None  # raised by the writer's fsync
        self._thread = threading.Thread(target=self._run, name="gradguard-flush-behind", daemon=True)
        self._thread.start()

    def ask(self) -> None:
        self._asked.set()

    def stop(self) -> None:
        """Wait for the flush in progress, if any; the file may then be closed."""
        self._stopping = True
        self._asked.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._asked.wait()
            self._asked.clear()
            if self._stopping:
                return
            try:
                os.fdatasync(self._fd)
            except OSError as err:
                self.error = err
                return


_END = object()  # what the read-ahead thread queues after the last item


def read_ahead(items: Iterable[_Item], depth: int, on_item: Callable[[], None] = lambda: None) -> Iterator[_Item]:
    """``items``, pulled by a helper thread up to ``depth`` ahead of the consumer, so that
    producing the next item overlaps consuming the last. ``on_item`` is called in the helper as
    each item comes; an exception the helper meets is raised in the consumer."""
    queue: Queue[tuple[Any, BaseException | None]] = Queue(depth)
    done = threading.Event()

    def put(item: tuple[Any, BaseException | None]) -> bool:
        while not done.is_set():  # the consumer may stop early (a refused update, a failed call)
            try:
                queue.put(item, timeout=0.5)
                return True
            except Full:
                continue
        return False

    def pull() -> None:
        try:
            for item in items:
                on_item()
                if not put((item, None)):
                    return
        except BaseException as err:  # a cancelled call: raised in the consumer
            put((_END, err))
            return
        put((_END, None))

    threading.Thread(target=pull, name="gradguard-read-ahead", daemon=True).start()
    try:
        while True:
            item, err = queue.get()
            if item is _END:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        done.set()


def new_digest(data: bytes | memoryview = b"") -> Any:
    """A BLAKE3 hasher (32-byte digest) started on ``data``: the digest of every payload, on the wire
    and on disk. BLAKE3 rather than SHA-256 because the client and the server each hash every byte of
    an update, and on the same cores it costs about 10 ms for 45 MB against SHA-256's 26 ms
    (``benchmarks/transport.py``); it releases the GIL as hashlib does."""
    return blake3.blake3(data)


class BackgroundDigest:
    """A BLAKE3 digest computed by a helper thread, one update behind the caller: :meth:`update` waits
    for the previous update only, so hashing a chunk overlaps what the caller does with it next
    (writing or sending it; BLAKE3 releases the GIL). The caller must leave an updated buffer
    unchanged until the next call; :meth:`close` ends the thread."""

    def __init__(self) -> None:
        self._digest = new_digest()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradguard-hash")
        self._pending: Future[None] | None = None

    def update(self, *buffers: bytes | memoryview) -> None:
        """Hash ``buffers``, in order, after what was updated before."""
        self._wait()
        self._pending = self._pool.submit(self._update, buffers)

    def hexdigest(self) -> str:
        self._wait()
        return self._digest.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _update(self, buffers: tuple[bytes | memoryview, ...]) -> None:
        for buffer in buffers:
            self._digest.update(buffer)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


class HashingWriter:
    """A file opened for writing (mode 0600) that hashes what it writes.

    With ``flush_behind``, a helper thread flushes the file to the disk every
    :data:`FLUSH_BEHIND_BYTES` while it is written, so that the final :meth:`fsync` finds little
    left: the flushing overlaps the receiving. With ``hash_behind``, another one hashes each write
    while it is written (:class:`BackgroundDigest`); worth it for large writes only.
    """

    def __init__(self, path: Path, *, flush_behind: bool = False, hash_behind: bool = False) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._digest: Any = BackgroundDigest() if hash_behind else new_digest()
        self._flusher = _Flusher(self._fd) if flush_behind else None
        self._unflushed = 0
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        self._digest.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.written += len(data)
        self._unflushed += len(data)
        if self._flusher is not None and self._unflushed >= FLUSH_BEHIND_BYTES:
            self._flusher.ask()
            self._unflushed = 0

    def fsync(self) -> None:
        """Flush the file to the disk; raises what a flush behind the writer met, if anything."""
        flusher = self._stop_flusher()
        if flusher is not None and flusher.error is not None:
            raise flusher.error
        os.fsync(self._fd)

    def hexdigest(self) -> str:
        """The BLAKE3 digest of everything written so far."""
        return self._digest.hexdigest()

    def close(self) -> None:
        self._stop_flusher()
        if isinstance(self._digest, BackgroundDigest):
            self._digest.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _stop_flusher(self) -> _Flusher | None:
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.stop()
        return flusher

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_digest(path: Path) -> str:
    digest = new_digest()
    with open(path, "rb") as f:
        while block := f.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()
