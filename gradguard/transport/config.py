"""The aggregator's round policy and limits: one dataclass with documented defaults."""
from __future__ import annotations

from dataclasses import dataclass

from gradguard.transport.codec import CHUNK_BYTES


@dataclass(frozen=True)
class AggregatorConfig:
    """How the aggregator runs rounds.

    A round closes as soon as every joined client's update is in, or once ``round_deadline_s``
    has passed since the round opened; either way only when at least ``min_clients`` updates
    were accepted (before that, the round waits). Closing applies the FedAvg of the accepted
    deltas, weighted by ``num_samples``, to the global model and opens the next round; an update
    that arrives later is refused as being for the wrong round, so a straggler neither blocks a
    round nor lands in the wrong one.

    min_clients: updates a round needs before it can close.
    round_deadline_s: seconds after a round opens when it closes without the missing clients;
        None waits for every joined client.
    max_update_bytes: largest update payload accepted (RESOURCE_EXHAUSTED beyond it); the default
        fits a ResNet-50-sized float32 update with room to spare.
    chunk_bytes: size of the chunks the server streams the global model in.
    max_workers: threads serving calls; calls beyond it wait for a free thread.
    max_concurrent_updates: updates received, checked and summed at the same time. Each holds
        one chunk and one piece of a tensor in memory; the others wait with at most gRPC's 64 KiB
        window buffered, so the server's memory does not grow with the number of clients (or
        with its thread count). Only authenticated clients with a valid header take a slot.
    fsync: flush the state directory to the disk before acknowledging an update, so that an
        acknowledged update survives a power loss too (SIGKILL alone needs no fsync).
    """

    min_clients: int = 1
    round_deadline_s: float | None = 60.0
    max_update_bytes: int = 512 * 2**20
    chunk_bytes: int = CHUNK_BYTES
    max_workers: int = 16
    max_concurrent_updates: int = 4
    fsync: bool = True

    def __post_init__(self) -> None:
        checks = {
            "min_clients": self.min_clients >= 1,
            "round_deadline_s": self.round_deadline_s is None or self.round_deadline_s > 0,
            "max_update_bytes": self.max_update_bytes > 0,
            "chunk_bytes": 0 < self.chunk_bytes <= 4 * 2**20 - 1024,
            "max_workers": self.max_workers >= 1,
            "max_concurrent_updates": self.max_concurrent_updates >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid AggregatorConfig field(s) {bad}: see the AggregatorConfig docstring "
                             "(chunk_bytes must stay under gRPC's 4 MiB message limit)")
