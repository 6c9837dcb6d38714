"""Checks an update must pass before it counts; each failure names what is wrong and the fix.

Every check raises :class:`TransportError` with the gRPC status the client receives: the
servicer turns it into that status, and nothing reaches the aggregate before all checks pass.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from gradguard.transport._generated.v1 import aggregator_pb2 as pb
from gradguard.transport.codec import FLOAT_CODES, dtype_code, iter_pieces, read_layout
from gradguard.transport.errors import TransportError

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
Layout = dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype code, shape)


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

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> "ModelSpec":
        return cls({name: (dtype_code(t.dtype), tuple(t.shape)) for name, t in state.items()})

    @property
    def averaged(self) -> frozenset[str]:
        return frozenset(name for name, (code, _) in self.layout.items() if code in FLOAT_CODES)

    def to_proto(self) -> list[pb.TensorSpec]:
        return [pb.TensorSpec(name=name, dtype=code, shape=shape, averaged=code in FLOAT_CODES)
                for name, (code, shape) in self.layout.items()]


def check_header(header: pb.UpdateHeader, *, client_id: str, max_update_bytes: int) -> None:
    """Checks that need only the header: sender, kind, weight, declared size and checksum."""
    if header.client_id != client_id:
        raise TransportError(grpc.StatusCode.PERMISSION_DENIED,
                             f"the update names client {header.client_id!r} but the credentials are "
                             f"{client_id!r}'s; a client submits only its own update")
    if header.kind != "delta":
        raise _invalid(f"update kind {header.kind!r} cannot be aggregated: this aggregator averages weight "
                       "deltas (GuardConfig(update_kind='delta'))")
    if header.num_samples < 1:
        raise _invalid(f"num_samples is {header.num_samples}; it is the update's FedAvg weight and must be >= 1")
    if header.total_bytes > max_update_bytes:
        raise TransportError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"the update is {header.total_bytes} bytes, over this server's limit of "
                             f"{max_update_bytes} bytes (AggregatorConfig.max_update_bytes)")
    if header.total_bytes <= 0:
        raise _invalid(f"total_bytes is {header.total_bytes}; the header must give the payload's length")
    if not _SHA256_HEX.fullmatch(header.sha256):
        raise _invalid("the header's sha256 is not 64 lowercase hex digits; send hashlib.sha256(payload).hexdigest()")


def check_payload(path: Path, spec: ModelSpec) -> None:
    """Checks of a received payload: well-formed safetensors, the model's names, dtypes and
    shapes, finite values. Holds one piece of one tensor in memory at a time."""
    try:
        layout = read_layout(path)
    except Exception as err:  # safetensors reports every malformation as its own error type
        raise _invalid(f"the payload is not valid safetensors ({err}); encode updates with "
                       "gradguard.transport.codec.encode_tensors") from None
    expected = spec.averaged
    missing, unexpected = sorted(expected - set(layout)), sorted(set(layout) - expected)
    if missing or unexpected:
        raise _invalid(f"the update's tensors do not match the global model: missing {missing[:5]}, unexpected "
                       f"{unexpected[:5]}; an update carries exactly the model's floating-point state "
                       "(parameters and float buffers, not integer buffers)")
    for name, (code, shape) in sorted(layout.items()):
        want_code, want_shape = spec.layout[name]
        if code != want_code:
            raise _invalid(f"tensor {name!r} has dtype {code}, the global model's is {want_code}; "
                           "send the delta in the model's dtype")
        if shape != want_shape:
            raise _invalid(f"tensor {name!r} has shape {list(shape)}, the global model's is {list(want_shape)}; "
                           "the update must come from the same architecture")
    for piece in iter_pieces(path):
        # A sum is finite when every value is (it can also overflow: then look closer), and
        # costs no buffer, where an elementwise test allocates one as large as the piece.
        if bool(torch.isfinite(piece.values.sum())):
            continue
        bad = torch.nonzero(~torch.isfinite(piece.values))
        if len(bad):
            index = int(bad[0])
            raise _invalid(f"tensor {piece.name!r} has a non-finite value ({float(piece.values[index])}) at flat "
                           f"index {piece.start + index}; only finite updates are aggregated (lower the learning "
                           "rate or clip gradients)")
