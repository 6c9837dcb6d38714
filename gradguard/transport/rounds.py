"""The aggregator's rounds: who joined, which updates count, when a round closes. No gRPC here.

One lock guards the round state, and it is never held while a payload is read or a model is
computed. An update is received into a file and checked as it streams in, outside the lock (at
most ``max_concurrent_updates`` at once, one chunk and one piece of the global model in memory
each, one upload in flight per client); only the final "still the right round, not a duplicate"
check and the commit to the state directory happen under it. A background thread closes a round
when its conditions hold (see :class:`AggregatorConfig`): it computes the next global model from
the accepted files, block by block in float64, then swaps it in under the lock.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import grpc
import numpy as np

from gradguard.transport._generated.v1 import aggregator_pb2 as pb
from gradguard.transport.aggregation import aggregate, clip_scale
from gradguard.transport.config import AggregatorConfig
from gradguard.transport.errors import TransportError
from gradguard.transport.store import AcceptedUpdate, PastUpdate, RoundState, StateStore
from gradguard.transport.validation import ModelSpec, UpdateReceiver, check_header
from gradguard.transport.wire import (FLOAT_CODES, ITEM_BYTES, PIECE_BYTES, HashingWriter, Layout, MalformedSafetensors,
                                      file_digest, from_float64, header_bytes, iter_ranges, max_abs, new_digest,
                                      read_header, read_range, to_float64)

log = logging.getLogger(__name__)
# What closing a round holds at once: one block of every accepted update, in float64.
_CLOSE_BUDGET_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Ack:
    """The server's receipt for an accepted update."""

    round: int
    digest: str
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


def digest_of_header(header: pb.UpdateHeader, payload_digest: str) -> str:
    """Digest of everything an update's header says, with ``payload_digest`` in it wherever
    the client sent that (header or trailer): a retry must repeat all of it."""
    complete = pb.UpdateHeader()
    complete.CopyFrom(header)
    complete.digest = payload_digest
    return new_digest(complete.SerializeToString(deterministic=True)).hexdigest()


class OnePerClient:
    """At most one call of a kind in flight per client; a second one is told to retry."""

    def __init__(self, kind: str, *, retry_hint: str) -> None:
        self._kind = kind
        self._retry_hint = retry_hint
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, client_id: str) -> Iterator[None]:
        with self._lock:
            if client_id in self._busy:
                raise TransportError(grpc.StatusCode.UNAVAILABLE,
                                     f"another {self._kind} of client {client_id!r} is in flight; retry once it has "
                                     f"ended ({self._retry_hint})")
            self._busy.add(client_id)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(client_id)


class RoundManager:
    """Rounds of aggregation over the updates of known clients, persisted in a :class:`StateStore`.

    With an empty state directory it starts round 0 from the safetensors file ``initial``;
    otherwise it resumes the stored round with every update accepted in it (``initial`` may then
    be None, or must have the stored model's layout).
    """

    def __init__(self, initial: Path | None, *, store: StateStore, config: AggregatorConfig,
                 known_clients: Container[str], max_num_samples: Mapping[str, int] | None = None) -> None:
        self._store = store
        self._config = config
        self._max_num_samples = dict(max_num_samples or {})
        self._cond = threading.Condition()
        self._slots = threading.BoundedSemaphore(config.max_concurrent_updates)
        self._uploads = OnePerClient("upload", retry_hint=f"a stalled one is cut after {config.idle_timeout_s:g} s")
        self._closing = False
        self._stopped = False
        # The global model lives in the state directory only: it is streamed from there on fetch
        # and read piece by piece when a round closes, so the aggregator holds no model in memory.
        if store.exists():
            self._state = store.load()
            self.spec = self._check_stored(_layout_of(initial) if initial is not None else None)
            self._state.joined = [c for c in self._state.joined if c in known_clients]
            log.info("resumed round %d from %s with %d accepted update(s)", self._state.round, store.root,
                     len(self._state.accepted))
        else:
            store.check_no_orphaned_rounds()
            if initial is None:
                raise ValueError(f"{store.root} holds no aggregator state: give the initial global model")
            self.spec = ModelSpec(_layout_of(initial))
            name, sha = store.write_global(0, _file_blocks(initial))
            self._state = RoundState(round=0, opened_at=time.time(), global_file=name, global_digest=sha)
            store.save(self._state)
        self._open_global_file()
        store.prune(self._state)
        self._closer = threading.Thread(target=self._close_rounds, name="gradguard-round-closer", daemon=True)

    def _check_stored(self, initial_layout: Layout | None) -> ModelSpec:
        path = self._store.global_path(self._state)
        if not path.exists() or file_digest(path) != self._state.global_digest:
            raise ValueError(f"{path} is missing or does not match its checksum in state.json; restore the "
                             "state directory from a backup or start from an empty one")
        spec = ModelSpec(_layout_of(path))
        if initial_layout is not None and initial_layout != spec.layout:
            raise ValueError(f"{self._store.root} holds the state of a different model (other names, dtypes "
                             "or shapes); use another state directory, or pass the model it was started with")
        for client_id, record in self._state.accepted.items():
            update = self._store.update_path(self._state.round, client_id)
            if not update.exists() or file_digest(update) != record.digest:
                raise ValueError(f"accepted update {update} is missing or corrupted; restore the state directory")
        return spec

    def _open_global_file(self) -> None:
        """Read the layout and the per-tensor bounds of the open round's global model."""
        path = self._store.global_path(self._state)
        self._global_header = read_header(path)
        self._global_bounds = max_abs(path, self._global_header)
        self._store.make_round_dir(self._state.round)  # now, rather than on the first acknowledgement

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

    @property
    def finished(self) -> bool:
        """Whether the configured number of rounds is complete."""
        with self._cond:
            return self._finished()

    def global_path(self) -> Path:
        with self._cond:
            return self._store.global_path(self._state)

    def status(self, client_id: str | None = None) -> RoundStatus:
        with self._cond:
            state = self._state
            return RoundStatus(
                round=state.round, accepted_in_round=len(state.accepted), joined_clients=len(state.joined),
                min_clients=self._config.min_clients, seconds_to_deadline=self._seconds_to_deadline(),
                joined=client_id in state.joined, submitted=client_id in state.accepted)

    def wait_for_round(self, round_index: int, timeout_s: float | None) -> bool:
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
        """(round, digest, open file) of the global model of the open round; the file stays
        readable even if the round closes (and the store deletes it) while it is streamed."""
        with self._cond:
            if round_index is not None and round_index != self._state.round:
                raise self._wrong_round(round_index)
            return self._state.round, self._state.global_digest, open(self._store.global_path(self._state), "rb")

    def submit(self, client_id: str, header: pb.UpdateHeader, chunks: Iterable[bytes | memoryview],
               trailer_digest: Callable[[], str | None] = lambda: None, *,
               waiting: Callable[[], None] = lambda: None) -> Ack:
        """Receive, check and count one update; raises :class:`TransportError` and changes
        nothing when any check fails. The payload's BLAKE3 digest is the header's, or else what
        ``trailer_digest`` returns once ``chunks`` is exhausted. ``waiting`` is called every second
        spent waiting for one of the ``max_concurrent_updates`` slots (the wait is the server's,
        not the client's)."""
        check_header(header, client_id=client_id, max_update_bytes=self._config.max_update_bytes,
                     max_num_samples=min(self._config.max_num_samples,
                                         self._max_num_samples.get(client_id, self._config.max_num_samples)),
                     max_metadata_bytes=self._config.max_metadata_bytes,
                     max_leakage_db=self._config.max_leakage_db)
        with self._cond:  # a digest in the trailer: only the wrong round is known before the bytes
            known = self._known_update(client_id, header, header.digest or None)
        if known is not None:
            return known
        with self._uploads.hold(client_id):
            while not self._slots.acquire(timeout=1.0):
                waiting()
            try:
                return self._receive(client_id, header, chunks, trailer_digest)
            finally:
                self._slots.release()

    # internals (callers hold self._cond unless said otherwise) ---------------------------------
    def _finished(self) -> bool:
        return self._config.rounds is not None and self._state.round >= self._config.rounds

    def _wrong_round(self, asked: int) -> TransportError:
        current = self._state.round
        if self._finished():
            return TransportError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"the federation is finished: its {self._config.rounds} rounds are complete and "
                                  f"round {current} holds the final global model; fetch it", open_round=current)
        when = "is closed" if asked < current else "has not opened"
        return TransportError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"round {asked} {when}; the open round is {current}: fetch its global model, train on "
                              f"it (guard.begin_round({current})) and submit for round {current}", open_round=current)

    def _known_update(self, client_id: str, header: pb.UpdateHeader, digest: str | None) -> Ack | None:
        """The receipt of an update already accepted (a retry), None for a new one of the open
        round or, while the payload's ``digest`` is not known yet, for one that may be a retry;
        raises for anything else."""
        state = self._state
        past = state.past.get(client_id)
        if header.round == state.round and not self._finished():
            record = state.accepted.get(client_id)
            if record is None or digest is None:
                return None
            return self._retry_ack(client_id, record.digest, record.header_digest, header, digest,
                                   Ack(state.round, record.digest, True, len(state.accepted)))
        if past is not None and past.round == header.round and digest is None:
            return None  # perhaps a retry of the update accepted in that round: the bytes will tell
        if past is not None and past.round == header.round and past.digest == digest:
            # A retry whose first acknowledgement was lost, arriving after its round closed.
            return self._retry_ack(client_id, past.digest, past.header_digest, header, digest,
                                   Ack(past.round, past.digest, True, past.accepted_in_round))
        raise self._wrong_round(header.round)

    def _retry_ack(self, client_id: str, accepted_payload: str, accepted_header: str, header: pb.UpdateHeader,
                   payload_digest: str, ack: Ack) -> Ack:
        if accepted_payload == payload_digest and accepted_header == digest_of_header(header, payload_digest):
            return ack
        if accepted_payload == payload_digest:
            raise TransportError(grpc.StatusCode.ALREADY_EXISTS,
                                 f"these bytes were accepted from client {client_id!r} in round {ack.round} with "
                                 "other metadata (num_samples, num_steps, ...); a retry must resend the same header, "
                                 "an accepted update is final")
        raise TransportError(grpc.StatusCode.ALREADY_EXISTS,
                             f"client {client_id!r} already has a different update accepted in round {ack.round} "
                             f"(digest {accepted_payload[:12]}...); an accepted update is final, "
                             "submit the next one for "
                             f"round {ack.round + 1}")

    def _receive(self, client_id: str, header: pb.UpdateHeader, chunks: Iterable[bytes | memoryview],
                 trailer_digest: Callable[[], str | None]) -> Ack:
        """Called without the lock: stream, check and flush the payload, then commit it."""
        with self._cond:
            global_path, global_header = self._store.global_path(self._state), self._global_header
            global_bounds = self._global_bounds
        part = self._store.incoming_path()
        global_fd = os.open(global_path, os.O_RDONLY)
        try:
            with HashingWriter(part, flush_behind=self._config.fsync, hash_behind=True) as writer:
                receiver = UpdateReceiver(writer, header=header, spec=self.spec, global_fd=global_fd,
                                          global_header=global_header, global_bounds=global_bounds,
                                          max_metadata_bytes=self._config.max_metadata_bytes,
                                          norm=self._config.max_update_norm is not None)
                for chunk in chunks:
                    receiver.feed(chunk)
                digest, norm = receiver.finish(header.digest or trailer_digest())
                self._check_norm(norm)
                if self._config.fsync:
                    writer.fsync()
            with self._cond:  # the round may have closed, or a twin call won, meanwhile
                while self._closing:
                    self._cond.wait()
                known = self._known_update(client_id, header, digest)
                if known is not None:
                    return known
                record = AcceptedUpdate(digest=digest, num_samples=header.num_samples, num_steps=header.num_steps,
                                        nbytes=header.total_bytes, header_digest=digest_of_header(header, digest),
                                        norm=norm)
                return self._commit(client_id, record, part)
        finally:
            os.close(global_fd)
            part.unlink(missing_ok=True)

    def _check_norm(self, norm: float) -> None:
        bound = self._config.max_update_norm
        if bound is None:
            return
        if not math.isfinite(norm) or (self._config.norm_bound == "refuse" and norm > bound):
            raise TransportError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"the update's L2 norm is {norm:.4g}, over this server's bound of {bound:g} "
                                 "(AggregatorConfig.max_update_norm); clip the update or lower the learning rate")

    def _commit(self, client_id: str, record: AcceptedUpdate, part: Path) -> Ack:
        round_index = self._state.round
        self._store.commit_update(part, round_index, client_id)
        joined = self._state.joined if client_id in self._state.joined else [*self._state.joined, client_id]
        state = replace(self._state, joined=joined, accepted={**self._state.accepted, client_id: record})
        self._store.save(state)  # from here on the update survives a crash: only now is it accepted
        self._state = state
        log.info("accepted the update of %s for round %d (%d samples, %d/%d updates)", client_id, round_index,
                 record.num_samples, len(state.accepted), len(state.joined))
        self._cond.notify_all()
        return Ack(round_index, record.digest, False, len(state.accepted))

    def _seconds_to_deadline(self) -> float:
        if self._config.round_deadline_s is None:
            return math.inf
        return self._state.opened_at + self._config.round_deadline_s - time.time()

    def _closable(self) -> bool:
        accepted = self._state.accepted
        if self._finished() or len(accepted) < self._config.min_clients:
            return False
        return all(c in accepted for c in self._state.joined) or self._seconds_to_deadline() <= 0

    def _next_global_blocks(self, closing: RoundState) -> Iterator[bytes]:
        """Called without the lock: the next global model's safetensors bytes, computed block by
        block from the accepted updates on disk."""
        config = self._config
        clients = sorted(closing.accepted)
        records = [closing.accepted[c] for c in clients]
        paths = [self._store.update_path(closing.round, c) for c in clients]
        headers = [read_header(p) for p in paths]
        scales = [clip_scale(r.norm, config.max_update_norm) if config.norm_bound == "clip" else 1.0
                  for r in records]
        weights = [r.num_samples for r in records]
        base_header = self._global_header
        prefix, _ = header_bytes(base_header.layout)
        yield prefix
        with contextlib.ExitStack() as files:
            fds = []
            for path in paths:
                fds.append(os.open(path, os.O_RDONLY))
                files.callback(os.close, fds[-1])
            base_fd = os.open(self._store.global_path(closing), os.O_RDONLY)
            files.callback(os.close, base_fd)
            for name, entry in base_header.entries.items():
                item = ITEM_BYTES[entry.code]
                if entry.code not in FLOAT_CODES:  # integer buffers are kept as they are
                    for first, count in iter_ranges(entry.numel, max(1, PIECE_BYTES // item)):
                        yield read_range(base_fd, base_header, name, first, count)
                    continue
                step = max(1, min(PIECE_BYTES // item, _CLOSE_BUDGET_BYTES // (8 * len(fds))))
                for first, count in iter_ranges(entry.numel, step):
                    deltas = np.empty((len(fds), count))
                    for row, (fd, header, scale) in enumerate(zip(fds, headers, scales)):
                        deltas[row] = to_float64(entry.code, read_range(fd, header, name, first, count))
                        if scale != 1.0:
                            deltas[row] *= scale
                    base = to_float64(entry.code, read_range(base_fd, base_header, name, first, count))
                    step_values = aggregate(deltas, weights, rule=config.aggregation,
                                            trim_fraction=config.trim_fraction)
                    out = from_float64(entry.code, base + step_values)
                    if not np.isfinite(to_float64(entry.code, out)).all():  # kept from commit below
                        raise ValueError(f"the aggregate of round {closing.round} is not finite in tensor {name!r}; "
                                         "the global model is left as it was")
                    yield out

    def _close_round(self) -> None:
        """Compute the next global model without the lock (commits wait meanwhile), then open
        the next round. On failure the round stays open as it was."""
        closing = self._state
        self._closing = True
        try:
            self._cond.release()
            try:
                name, sha = self._store.write_global(closing.round + 1, self._next_global_blocks(closing))
            finally:
                self._cond.acquire()
            current = self._state  # joins may have happened meanwhile; accepted is unchanged
            past = {**current.past, **{c: PastUpdate(closing.round, r.digest, r.header_digest, len(closing.accepted))
                                       for c, r in closing.accepted.items()}}
            state = RoundState(round=closing.round + 1, opened_at=time.time(), global_file=name,
                               global_digest=sha, joined=list(current.joined), past=past)
            self._store.save(state)
        finally:
            self._closing = False
            self._cond.notify_all()
        self._state = state
        self._open_global_file()
        self._store.prune(state)
        log.info("closed round %d with %d update(s) (%d samples, %s); round %d is open", closing.round,
                 len(closing.accepted), sum(r.num_samples for r in closing.accepted.values()),
                 self._config.aggregation, state.round)
        if self._finished():
            log.info("all %d rounds are complete; serving the final global model", self._config.rounds)
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


def _layout_of(path: Path) -> Layout:
    try:
        return read_header(path).layout
    except (MalformedSafetensors, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors model ({err}); write it with "
                         "gradguard.transport.codec.write_tensors(path, model.state_dict())") from None


def _file_blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(PIECE_BYTES):
            yield block
