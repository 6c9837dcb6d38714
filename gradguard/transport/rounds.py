"""The aggregator's rounds: who joined, which updates count, when a round closes. No gRPC here.

One lock guards the round state. An update is received into a file and checked outside the
lock (at most ``max_concurrent_updates`` at once, one chunk and one piece in memory each);
only the final "still the right round, not a duplicate" check, the commit to the state
directory and the running sum happen under it. A background thread closes a round when its conditions hold
(see :class:`AggregatorConfig`), so the last client's acknowledgement never waits for the close.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import grpc
import torch

from gradguard.transport._generated.v1 import aggregator_pb2 as pb
from gradguard.transport.codec import file_sha256, iter_pieces, iter_tensors, read_layout
from gradguard.transport.config import AggregatorConfig
from gradguard.transport.errors import TransportError
from gradguard.transport.fedavg import WeightedSum
from gradguard.transport.store import AcceptedUpdate, RoundState, StateStore
from gradguard.transport.validation import ModelSpec, check_header, check_payload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ack:
    """The server's receipt for an accepted update."""

    round: int
    sha256: str
    duplicate: bool  # True: this exact update had been accepted before; nothing changed
    accepted_in_round: int


@dataclass(frozen=True)
class RoundStatus:
    round: int
    accepted_in_round: int
    joined_clients: int
    min_clients: int
    seconds_to_deadline: float  # inf without a deadline; negative once it has passed
    joined: bool
    submitted: bool


class RoundManager:
    """Rounds of FedAvg over the updates of known clients, persisted in a :class:`StateStore`.

    With an empty state directory it starts round 0 from ``initial_state``; otherwise it resumes
    the stored round with every update accepted in it (``initial_state`` may then be None, or
    must have the stored model's layout).
    """

    def __init__(self, initial_state: Mapping[str, torch.Tensor] | None, *, store: StateStore,
                 config: AggregatorConfig, known_clients: Collection[str]) -> None:
        self._store = store
        self._config = config
        self._cond = threading.Condition()
        self._slots = threading.BoundedSemaphore(config.max_concurrent_updates)
        self._stopped = False
        # The global model lives in the state directory only: it is streamed from there on fetch
        # and read piece by piece when a round closes, so the running sums are the only
        # model-sized memory the aggregator holds.
        if store.exists():
            self._state = store.load()
            self.spec = self._check_stored_global(initial_state)
            self._state.joined = [c for c in self._state.joined if c in known_clients]
            self._sum = self._replay()
            log.info("resumed round %d from %s with %d accepted update(s)", self._state.round, store.root,
                     len(self._state.accepted))
        else:
            if initial_state is None:
                raise ValueError(f"{store.root} holds no aggregator state: give the initial global model")
            self.spec = ModelSpec.of(initial_state)
            name, sha = store.write_global(0, initial_state)
            self._state = RoundState(round=0, opened_at=time.time(), global_file=name, global_sha256=sha)
            store.save(self._state)
            self._sum = WeightedSum(self.spec)
        store.prune(self._state)
        self._closer = threading.Thread(target=self._close_rounds, name="gradguard-round-closer", daemon=True)

    def _check_stored_global(self, initial_state: Mapping[str, torch.Tensor] | None) -> ModelSpec:
        path = self._store.global_path(self._state)
        if not path.exists() or file_sha256(path) != self._state.global_sha256:
            raise ValueError(f"{path} is missing or does not match its checksum in state.json; restore the "
                             "state directory from a backup or start from an empty one")
        spec = ModelSpec(read_layout(path))
        if initial_state is not None and ModelSpec.of(initial_state) != spec:
            raise ValueError(f"{self._store.root} holds the state of a different model (other names, dtypes "
                             "or shapes); use another state directory, or pass the model it was started with")
        return spec

    def _replay(self) -> WeightedSum:
        """The running sum of the open round, rebuilt from the accepted updates on disk."""
        total = WeightedSum(self.spec)
        for client_id, record in self._state.accepted.items():
            path = self._store.update_path(self._state.round, client_id)
            if not path.exists() or file_sha256(path) != record.sha256:
                raise ValueError(f"accepted update {path} is missing or corrupted; restore the state directory")
            total.add(iter_pieces(path), record.num_samples)
        return total

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._closer.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._closer.is_alive():
            self._closer.join()

    # queries -----------------------------------------------------------------------------------
    @property
    def round(self) -> int:
        with self._cond:
            return self._state.round

    def global_state(self) -> dict[str, torch.Tensor]:
        with self._cond:
            return dict(iter_tensors(self._store.global_path(self._state)))

    def status(self, client_id: str | None = None) -> RoundStatus:
        with self._cond:
            state = self._state
            return RoundStatus(
                round=state.round, accepted_in_round=len(state.accepted), joined_clients=len(state.joined),
                min_clients=self._config.min_clients, seconds_to_deadline=self._seconds_to_deadline(),
                joined=client_id in state.joined, submitted=client_id in state.accepted)

    def wait_for_round(self, round_index: int, timeout_s: float | None = None) -> bool:
        """Block until round ``round_index`` is open (or later); False on timeout or stop."""
        with self._cond:
            self._cond.wait_for(lambda: self._state.round >= round_index or self._stopped, timeout_s)
            return self._state.round >= round_index

    # calls -------------------------------------------------------------------------------------
    def join(self, client_id: str) -> int:
        with self._cond:
            if client_id not in self._state.joined:
                state = replace(self._state, joined=[*self._state.joined, client_id])
                self._store.save(state)
                self._state = state
                log.info("client %s joined in round %d", client_id, state.round)
            return self._state.round

    def open_global(self, round_index: int | None) -> tuple[int, str, BinaryIO]:
        """(round, sha256, open file) of the global model of the open round; the file stays
        readable even if the round closes (and the store deletes it) while it is streamed."""
        with self._cond:
            if round_index is not None and round_index != self._state.round:
                raise self._wrong_round(round_index)
            return self._state.round, self._state.global_sha256, open(self._store.global_path(self._state), "rb")

    def submit(self, client_id: str, header: pb.UpdateHeader, chunks: Iterable[bytes]) -> Ack:
        """Receive, check and count one update; raises :class:`TransportError` and changes
        nothing when any check fails."""
        check_header(header, client_id=client_id, max_update_bytes=self._config.max_update_bytes)
        with self._cond:
            duplicate = self._duplicate_or_wrong_round(client_id, header)
        if duplicate is not None:
            return duplicate
        part = self._store.incoming_path()
        try:
            with self._slots:
                self._receive(chunks, part, header)
                check_payload(part, self.spec)
                with self._cond:  # the round may have closed, or a twin call won, meanwhile
                    return self._duplicate_or_wrong_round(client_id, header) or self._commit(client_id, header, part)
        finally:
            part.unlink(missing_ok=True)

    # internals (callers hold self._cond unless said otherwise) ---------------------------------
    def _wrong_round(self, asked: int) -> TransportError:
        current = self._state.round
        when = "is closed" if asked < current else "has not opened"
        return TransportError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"round {asked} {when}; the open round is {current}: fetch its global model, "
                              f"train on it and submit for round {current}")

    def _duplicate_or_wrong_round(self, client_id: str, header: pb.UpdateHeader) -> Ack | None:
        if header.round != self._state.round:
            raise self._wrong_round(header.round)
        record = self._state.accepted.get(client_id)
        if record is None:
            return None
        if record.sha256 == header.sha256:
            return Ack(self._state.round, record.sha256, True, len(self._state.accepted))
        raise TransportError(grpc.StatusCode.ALREADY_EXISTS,
                             f"client {client_id!r} already has a different update accepted in round "
                             f"{self._state.round} (sha256 {record.sha256[:12]}...); an accepted update is final, "
                             f"submit the next one for round {self._state.round + 1}")

    def _receive(self, chunks: Iterable[bytes], part: Path, header: pb.UpdateHeader) -> None:
        """Stream the payload to ``part`` (called without the lock), checking length and SHA-256."""
        digest, received = hashlib.sha256(), 0
        with open(part, "wb") as f:
            for chunk in chunks:
                received += len(chunk)
                if received > header.total_bytes:
                    raise TransportError(grpc.StatusCode.INVALID_ARGUMENT,
                                         f"the payload is longer than the header's total_bytes={header.total_bytes}")
                digest.update(chunk)
                f.write(chunk)
        if received < header.total_bytes:
            raise TransportError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"the stream ended after {received} of the {header.total_bytes} bytes the header "
                                 "announced; send the whole payload")
        if digest.hexdigest() != header.sha256:
            raise TransportError(grpc.StatusCode.DATA_LOSS,
                                 f"the payload's SHA-256 is {digest.hexdigest()[:12]}..., the header says "
                                 f"{header.sha256[:12]}...: the bytes changed in transit or the header is wrong")

    def _commit(self, client_id: str, header: pb.UpdateHeader, part: Path) -> Ack:
        round_index = self._state.round
        self._store.commit_update(part, round_index, client_id)
        record = AcceptedUpdate(sha256=header.sha256, num_samples=header.num_samples,
                                num_steps=header.num_steps, nbytes=header.total_bytes)
        joined = self._state.joined if client_id in self._state.joined else [*self._state.joined, client_id]
        state = replace(self._state, joined=joined, accepted={**self._state.accepted, client_id: record})
        self._store.save(state)  # from here on the update survives a crash: only now is it accepted
        self._state = state
        self._sum.add(iter_pieces(self._store.update_path(round_index, client_id)), header.num_samples)
        log.info("accepted the update of %s for round %d (%d samples, %d/%d updates)", client_id, round_index,
                 header.num_samples, len(state.accepted), len(state.joined))
        self._cond.notify_all()
        return Ack(round_index, header.sha256, False, len(state.accepted))

    def _seconds_to_deadline(self) -> float:
        if self._config.round_deadline_s is None:
            return math.inf
        return self._state.opened_at + self._config.round_deadline_s - time.time()

    def _closable(self) -> bool:
        accepted = self._state.accepted
        if len(accepted) < self._config.min_clients:
            return False
        return all(c in accepted for c in self._state.joined) or self._seconds_to_deadline() <= 0

    def _close_round(self) -> None:
        closing = self._state
        try:
            new_global = self._sum.mean_added_to(iter_pieces(self._store.global_path(closing)))
            name, sha = self._store.write_global(closing.round + 1, new_global)
            state = RoundState(round=closing.round + 1, opened_at=time.time(), global_file=name,
                               global_sha256=sha, joined=list(closing.joined))
            self._store.save(state)
        except BaseException:
            self._sum = self._replay()  # the sums were spent; the round stays open as it was
            raise
        self._state = state
        self._sum.reset()
        self._store.prune(state)
        log.info("closed round %d with %d update(s) (%d samples); round %d is open", closing.round,
                 len(closing.accepted), sum(r.num_samples for r in closing.accepted.values()), state.round)
        self._cond.notify_all()

    def _close_rounds(self) -> None:
        """The closer thread: closes each round as soon as it may, or at its deadline."""
        with self._cond:
            while not self._stopped:
                if self._closable():
                    try:
                        self._close_round()
                    except Exception:
                        log.exception("closing round %d failed; retrying in 5 s", self._state.round)
                        self._cond.wait(5.0)
                    continue
                remaining = self._seconds_to_deadline()
                # Before the deadline, wake at it; after it (too few updates) or without one, wait
                # for the next accepted update to be notified.
                self._cond.wait(remaining if 0 < remaining < math.inf else None)
