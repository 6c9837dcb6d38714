"""The aggregator's round policy and limits: one dataclass with documented defaults."""
from __future__ import annotations

import math
from dataclasses import dataclass

from gradguard.transport.aggregation import RULES, Rule
from gradguard.transport.wire import CHUNK_BYTES


@dataclass(frozen=True)
class AggregatorConfig:
    """How the aggregator runs rounds.

    A round closes as soon as every joined client's update is in, or once ``round_deadline_s``
    has passed since the round opened; either way only when at least ``min_clients`` updates
    were accepted (before that, the round waits). Closing applies the aggregate of the accepted
    deltas (``aggregation``) to the global model and opens the next round; an update that
    arrives later is refused as being for the wrong round (its error names the open round), so a
    straggler neither blocks a round nor lands in the wrong one.

    min_clients: updates a round needs before it can close.
    round_deadline_s: seconds after a round opens when it closes without the missing clients;
        None waits for every joined client.
    rounds: rounds to run; once round ``rounds`` is open the server refuses updates and keeps
        serving the final global model. None runs rounds for as long as the server runs.
    aggregation: how the deltas are combined, in float64: "fedavg" (mean weighted by
        ``num_samples``), "median" (coordinate-wise median) or "trimmed_mean" (coordinate-wise
        mean without the ``trim_fraction`` smallest and largest values). The robust rules give
        every client one vote, so a client can move them only as far as the others allow.
    trim_fraction: share of the values dropped at each end by "trimmed_mean", in [0, 0.5).
    max_update_norm: bound on the L2 norm of an update (all its tensors together); None: no bound.
    norm_bound: what happens beyond ``max_update_norm``: "clip" scales the update down to it,
        "refuse" rejects it (INVALID_ARGUMENT).
    max_leakage_db: the most an update may be estimated to leak above the attacker's prior, in dB
        of PSNR of its worst sample (the client's own estimate, ``ProtectedUpdate.leakage``, sent
        in the header's ``leakage`` field). An update over it, one whose report says it missed
        its own target, or one without a report is refused (FAILED_PRECONDITION) and the client
        may submit another in the same round. None: no maximum (a malformed report is still refused).
    max_num_samples: the largest ``num_samples`` (FedAvg weight) accepted from any client; a
        client's own bound in clients.json (``{"id": {"token": ..., "max_num_samples": n}}``)
        can only lower it.
    max_update_bytes: largest update payload accepted (RESOURCE_EXHAUSTED beyond it); the default
        fits a ResNet-50-sized float32 update with room to spare.
    max_metadata_bytes: room for the safetensors ``__metadata__`` of an update and for the
        header's own metadata map; an update's safetensors header may exceed the model's by this.
    chunk_bytes: size of the chunks the server streams the global model in.
    max_workers: threads serving calls.
    control_workers: of these, threads that uploads and fetches never take, so that Join and
        GetStatus are served whatever the streams do; a stream beyond the others is told the
        server is busy (UNAVAILABLE, which clients retry).
    max_concurrent_updates: updates received and checked at the same time (each holds a chunk and
        a piece of the global model); further ones wait for a slot.
    call_timeout_s: the longest an upload or fetch may take, whatever its client asked for.
    idle_timeout_s: an upload that sends nothing, or a fetch whose client reads nothing, for this
        long is cancelled, so a stalled client frees its thread.
    fsync: flush the state directory to the disk before acknowledging an update, so that an
        acknowledged update survives a power loss too (SIGKILL alone needs no fsync).
    """

    min_clients: int = 1
    round_deadline_s: float | None = 60.0
    rounds: int | None = None
    aggregation: Rule = "fedavg"
    trim_fraction: float = 0.1
    max_update_norm: float | None = None
    norm_bound: str = "clip"
    max_leakage_db: float | None = None
    max_num_samples: int = 1_000_000
    max_update_bytes: int = 512 * 2**20
    max_metadata_bytes: int = 64 * 2**10
    chunk_bytes: int = CHUNK_BYTES
    max_workers: int = 16
    control_workers: int = 4
    max_concurrent_updates: int = 4
    call_timeout_s: float = 900.0
    idle_timeout_s: float = 30.0
    fsync: bool = True

    def __post_init__(self) -> None:
        checks = {
            "min_clients": self.min_clients >= 1,
            "round_deadline_s": self.round_deadline_s is None or self.round_deadline_s > 0,
            "rounds": self.rounds is None or self.rounds >= 1,
            "aggregation": self.aggregation in RULES,
            "trim_fraction": 0 <= self.trim_fraction < 0.5,
            "max_update_norm": self.max_update_norm is None or self.max_update_norm > 0,
            "norm_bound": self.norm_bound in ("clip", "refuse"),
            "max_leakage_db": self.max_leakage_db is None or 0 < self.max_leakage_db < math.inf,
            "max_num_samples": self.max_num_samples >= 1,
            "max_update_bytes": self.max_update_bytes > 0,
            "max_metadata_bytes": self.max_metadata_bytes >= 0,
            "chunk_bytes": 0 < self.chunk_bytes <= 4 * 2**20 - 1024,
            "max_workers": self.max_workers >= 2,
            "control_workers": 1 <= self.control_workers < self.max_workers,
            "max_concurrent_updates": self.max_concurrent_updates >= 1,
            "call_timeout_s": self.call_timeout_s > 0,
            "idle_timeout_s": self.idle_timeout_s > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid AggregatorConfig field(s) {bad}: see the AggregatorConfig docstring "
                             f"(aggregation is one of {RULES}, norm_bound 'clip' or 'refuse', max_leakage_db "
                             "finite and > 0, chunk_bytes stays under gRPC's 4 MiB message limit, control_workers "
                             "< max_workers)")

    @property
    def stream_workers(self) -> int:
        """Threads that uploads and fetches may take together."""
        return self.max_workers - self.control_workers
