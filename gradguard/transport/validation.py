"""Checks an update must pass before it counts; each failure names what is wrong and the fix.

Every check raises :class:`TransportError` with the gRPC status the client receives: the
servicer turns it into that status, and nothing reaches the state before all checks pass. The
payload is checked while it streams in (:class:`UpdateReceiver`), so an update is read once.
"""
from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields

import grpc
import numpy as np

from gradguard.leakage import LeakageEstimate
from gradguard.transport._generated.v1 import aggregator_pb2 as pb
from gradguard.transport.aggregation import combine_norms, l2_norm_squared_scaled
from gradguard.transport.errors import TransportError
from gradguard.transport.wire import (FLOAT_CODES, FLOAT_MAX, ITEM_BYTES, HashingWriter, Layout,
                                      MalformedSafetensors, SafetensorsHeader, TensorEntry, canonical_order,
                                      header_bytes, parse_header, read_range, to_float64)

_DIGEST_HEX = re.compile(r"[0-9a-f]{64}")


def _invalid(message: str) -> TransportError:
    return TransportError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class ModelSpec:
    """The global model's layout, and which of its tensors an update carries.

    Floating-point entries (parameters and float buffers such as BatchNorm's running statistics)
    are averaged; integer buffers (e.g. ``num_batches_tracked``) are sent with the global model
    but never averaged, so an update must not carry them.
    """

    layout: Layout

    @property
    def averaged(self) -> frozenset[str]:
        return frozenset(name for name, (code, _) in self.layout.items() if code in FLOAT_CODES)

    @property
    def update_header_bytes(self) -> int:
        """Length of the safetensors header of an update written by the client library."""
        layout = {name: self.layout[name] for name in self.averaged}
        return len(header_bytes(canonical_order(layout))[0]) - 8

    def to_proto(self) -> list[pb.TensorSpec]:
        return [pb.TensorSpec(name=name, dtype=code, shape=shape, averaged=code in FLOAT_CODES)
                for name, (code, shape) in self.layout.items()]


def check_header(header: pb.UpdateHeader, *, client_id: str, max_update_bytes: int, max_num_samples: int,
                 max_metadata_bytes: int, max_leakage_db: float | None) -> None:
    """Checks that need only the header: sender, kind, weight, declared size, checksum and
    leakage report."""
    if header.client_id != client_id:
        raise TransportError(grpc.StatusCode.PERMISSION_DENIED,
                             f"the update names client {header.client_id[:64]!r} but the credentials are "
                             f"{client_id!r}'s; a client submits only its own update")
    if header.kind != "delta":
        raise _invalid(f"update kind {header.kind[:32]!r} cannot be aggregated: this aggregator averages weight "
                       "deltas (GuardConfig(update_kind='delta'))")
    if header.num_samples < 1:
        raise _invalid(f"num_samples is {header.num_samples}; it is the update's FedAvg weight and must be >= 1")
    if header.num_samples > max_num_samples:
        raise _invalid(f"num_samples is {header.num_samples}, over the {max_num_samples} this server allows client "
                       f"{client_id!r} (AggregatorConfig.max_num_samples, or max_num_samples in clients.json); send "
                       "the number of samples the update was trained on")
    metadata_bytes = sum(len(k.encode()) + len(v.encode()) for k, v in header.metadata.items())
    if metadata_bytes > max_metadata_bytes:
        raise _invalid(f"the header's metadata is {metadata_bytes} bytes, over this server's limit of "
                       f"{max_metadata_bytes} (AggregatorConfig.max_metadata_bytes)")
    if header.total_bytes > max_update_bytes:
        raise TransportError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"the update is {header.total_bytes} bytes, over this server's limit of "
                             f"{max_update_bytes} bytes (AggregatorConfig.max_update_bytes)")
    if header.total_bytes <= 0:
        raise _invalid(f"total_bytes is {header.total_bytes}; the header must give the payload's length")
    if header.digest:  # empty: the UpdateTrailer carries it
        check_digest(header.digest, "the header's")
    check_leakage(decode_leakage(header), max_leakage_db=max_leakage_db)


def decode_leakage(header: pb.UpdateHeader) -> LeakageEstimate | None:
    """The header's leakage report as a :class:`LeakageEstimate` (None without one); a malformed
    report is refused whether or not the server sets a maximum."""
    if not header.HasField("leakage"):
        return None
    report = header.leakage
    data: dict[str, object] = {}
    for f in fields(LeakageEstimate):
        if f.name == "estimators":
            data[f.name] = list(report.estimators)
        elif report.DESCRIPTOR.fields_by_name[f.name].has_presence and not report.HasField(f.name):
            data[f.name] = None  # an SSIM not computed
        else:
            data[f.name] = getattr(report, f.name)
    try:
        return LeakageEstimate.from_dict(data)
    except ValueError as err:
        raise _invalid(f"the header's leakage report is malformed: {err}; send the guard's own estimate "
                       "(update.leakage of guard.protected_update(), which AggregatorClient.submit sends)") from None


def check_leakage(estimate: LeakageEstimate | None, *, max_leakage_db: float | None) -> None:
    """With ``max_leakage_db`` set, the update must carry a report whose target was met and whose
    worst sample is estimated to leak at most that much above the prior."""
    if max_leakage_db is None:
        return
    limit = (f"this server accepts updates estimated to leak at most {max_leakage_db:g} dB above the attacker's "
             "prior (AggregatorConfig.max_leakage_db, gradguard serve --max-leakage-db)")
    retrain = f"train this round again with GuardConfig(leakage_target_db={max_leakage_db:g}) or lower"
    if estimate is None:
        raise TransportError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the update carries no leakage report, and {limit}; fix: {retrain} (calibrated "
                             "noise, the default, estimates every update's leakage) and submit "
                             "guard.protected_update() with its report")
    worst = f"{estimate.psnr_above_prior_max:.2f} dB above the prior (worst of {estimate.samples} samples)"
    if not estimate.met:
        raise TransportError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the update's leakage report says it missed its own target of {estimate.target_db:g} "
                             f"dB: it leaks up to {worst}, and {limit}; fix: {retrain}, with a larger "
                             "max_amplitude so that the target is met")
    if estimate.psnr_above_prior_max > max_leakage_db:
        raise TransportError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the update is estimated to leak up to {worst}, over this server's maximum of "
                             f"{max_leakage_db:g} dB (AggregatorConfig.max_leakage_db, gradguard serve "
                             f"--max-leakage-db); fix: {retrain}")


def check_digest(value: str, where: str) -> str:
    """``value`` if it is a hex BLAKE3 digest (32 bytes); ``where`` names the field for the error."""
    if not _DIGEST_HEX.fullmatch(value):
        raise _invalid(f"{where} digest is not 64 lowercase hex digits; send blake3.blake3(payload).hexdigest()")
    return value


def check_layout(layout: Layout, spec: ModelSpec) -> None:
    """The update carries exactly the model's floating-point tensors, in their dtypes and shapes."""
    expected = spec.averaged
    missing, unexpected = sorted(expected - set(layout)), sorted(set(layout) - expected)
    if missing or unexpected:
        raise _invalid(f"the update's tensors do not match the global model: missing {missing[:5]}, unexpected "
                       f"{[name[:64] for name in unexpected[:5]]}; an update carries exactly the model's "
                       "floating-point state (parameters and float buffers, not integer buffers)")
    for name, (code, shape) in sorted(layout.items()):
        want_code, want_shape = spec.layout[name]
        if code != want_code:
            raise _invalid(f"tensor {name!r} has dtype {code}, the global model's is {want_code}; "
                           "send the delta in the model's dtype")
        if shape != want_shape:
            raise _invalid(f"tensor {name!r} has shape {list(shape)}, the global model's is {list(want_shape)}; "
                           "the update must come from the same architecture")


def _not_safetensors(err: Exception) -> TransportError:
    return _invalid(f"the payload is not valid safetensors ({err}); encode updates with "
                    "gradguard.transport.codec.encode_tensors")


def first_bad_value(code: str, base: np.ndarray, delta: np.ndarray) -> tuple[int, str] | None:
    """The first index where ``delta`` is not finite or ``base + delta`` is not a finite value of
    ``code``, and which of the two; None if there is none. Both are float64."""
    total = base + delta
    bad = np.flatnonzero(~np.isfinite(total) | (np.abs(total) > FLOAT_MAX[code]))
    if not len(bad):
        return None
    index = int(bad[0])
    return index, "delta" if not np.isfinite(delta[index]) else "overflow"


class UpdateReceiver:
    """Writes an update to a file as it arrives and checks it on the way, in one pass.

    It parses the safetensors header from the first bytes (refusing one over the model's size
    plus ``max_metadata_bytes`` before reading on), checks the layout against the model, and
    checks each run of values as it arrives: finite, and finite when added to the global model
    in its dtype (``global_bounds``: the largest |value| of each of its tensors). That keeps every
    later aggregate finite: each lies between the global plus the smallest and plus the largest
    delta. With ``norm`` it also computes the update's L2 norm.
    """

    def __init__(self, writer: HashingWriter, *, header: pb.UpdateHeader, spec: ModelSpec, global_fd: int,
                 global_header: SafetensorsHeader, global_bounds: Mapping[str, float], max_metadata_bytes: int,
                 norm: bool) -> None:
        self._writer = writer
        self._total = header.total_bytes
        self._spec = spec
        self._global_fd = global_fd
        self._global = global_header
        self._global_bounds = global_bounds
        self._max_header = spec.update_header_bytes + max_metadata_bytes
        self._prefix = bytearray()
        self._entries: list[tuple[str, TensorEntry]] | None = None
        self._index = 0
        self._position = 0  # in the data section
        self._carry = b""
        self._want_norm = norm
        self._norm = (0.0, 0.0)

    def feed(self, chunk: bytes | memoryview) -> None:
        if self._writer.written + len(chunk) > self._total:
            raise _invalid(f"the payload is longer than the header's total_bytes={self._total}")
        self._writer.write(chunk)
        if self._entries is None:
            self._prefix += chunk
            rest = self._parse_prefix()
            if rest is not None:
                self._consume(memoryview(rest))
        else:
            self._consume(memoryview(chunk))

    def finish(self, claimed: str | None) -> tuple[str, float]:
        """Checks once the stream ended against the client's ``claimed`` digest (None: it sent none);
        returns the payload's BLAKE3 digest and the update's L2 norm (0 unless ``norm`` was asked for)."""
        received = self._writer.written
        if received < self._total:
            raise _invalid(f"the stream ended after {received} of the {self._total} bytes the header announced; "
                           "send the whole payload")
        if claimed is None:
            raise _invalid("the update carries no digest: the header's digest is empty and no UpdateTrailer "
                           "followed the data; send the digest in one of them (AggregatorClient sends the trailer)")
        digest = self._writer.hexdigest()
        if digest != claimed:
            raise TransportError(grpc.StatusCode.DATA_LOSS,
                                 f"the payload's BLAKE3 digest is {digest[:12]}..., the client says {claimed[:12]}...: "
                                 "the bytes changed in transit, or the client is gradguard 0.1, which sends SHA-256 "
                                 "digests: upgrade it")
        scale, ssq = self._norm
        return digest, scale * float(np.sqrt(ssq))

    def _parse_prefix(self) -> bytes | None:
        """Parse the header once it is all in; returns the data bytes that came with it."""
        if len(self._prefix) < 8:
            return None
        (length,) = struct.unpack("<Q", self._prefix[:8])
        if length > self._total - 8:
            raise _not_safetensors(MalformedSafetensors(f"the header length {length} exceeds the payload"))
        if length > self._max_header:
            needed = self._spec.update_header_bytes
            raise _invalid(f"the update's safetensors header is {length} bytes; this model's needs {needed} plus at "
                           f"most {self._max_header - needed} of metadata (AggregatorConfig.max_metadata_bytes): send "
                           "the tensors without bulky metadata")
        if len(self._prefix) < 8 + length:
            return None
        try:
            parsed = parse_header(bytes(self._prefix[8:8 + length]), data_bytes=self._total - 8 - length)
        except MalformedSafetensors as err:
            raise _not_safetensors(err) from None
        check_layout(parsed.layout, self._spec)
        self._entries = list(parsed.entries.items())
        rest, self._prefix = bytes(self._prefix[8 + length:]), bytearray()
        return rest

    def _consume(self, view: memoryview) -> None:
        entries = self._entries
        assert entries is not None, "called once the header is parsed"
        while view:
            name, entry = entries[self._index]
            take = min(entry.end - self._position, len(view))
            part, view = view[:take], view[take:]
            self._position += take
            if self._carry:  # an element split across two chunks
                part, self._carry = memoryview(self._carry + bytes(part)), b""
            item = ITEM_BYTES[entry.code]
            usable = len(part) - len(part) % item
            if usable < len(part):
                self._carry = bytes(part[usable:])
            if usable:
                first = (self._position - entry.start - len(self._carry)) // item - usable // item
                self._check(name, entry.code, first, part[:usable])
            while self._index < len(entries) - 1 and entries[self._index][1].end == self._position:
                self._index += 1

    def _check(self, name: str, code: str, first: int, raw: memoryview) -> None:
        if code in ("F32", "F64"):
            # Fast path, without reading the global model: one BLAS pass bounds every |delta| by
            # sqrt(sum of squares), and if that plus the global's largest |value| fits the dtype,
            # every delta is finite and no global + delta can overflow. NaN and overflow land below.
            delta = np.frombuffer(raw, dtype=f"<f{ITEM_BYTES[code]}")
            with np.errstate(all="ignore"):
                squares = float(np.dot(delta, delta))
            if math.sqrt(squares) + self._global_bounds[name] <= FLOAT_MAX[code]:
                self._add_norm(delta)
                return
        count = len(raw) // ITEM_BYTES[code]
        base_raw = read_range(self._global_fd, self._global, name, first, count)
        delta64, base64 = to_float64(code, raw), to_float64(code, base_raw)
        found = first_bad_value(code, base64, delta64)
        if found is not None:
            index, what = found
            if what == "delta":
                raise _invalid(f"tensor {name!r} has a non-finite value ({delta64[index]}) at flat index "
                               f"{first + index}; only finite updates are aggregated (lower the learning rate or "
                               "clip gradients)")
            raise _invalid(f"tensor {name!r} at flat index {first + index}: the global model's {base64[index]} plus "
                           f"the delta's {delta64[index]} is beyond the range of {code}; such a step would make "
                           "the model non-finite (lower the learning rate or clip gradients)")
        self._add_norm(delta64)

    def _add_norm(self, values: np.ndarray) -> None:
        if self._want_norm:
            self._norm = combine_norms(self._norm, l2_norm_squared_scaled(values.astype(np.float64, copy=False)))

