"""The client side: join, fetch the global model, submit a protected update, poll the round.

    with AggregatorClient(server.address, client_id="c1", token=tokens["c1"]) as client:
        client.join()
        round_index, state = client.fetch_global()
        model.load_state_dict(state)
        ... train the wrapped model; guard.begin_round(round_index) ...
        client.submit(guard.protected_update())
        client.wait_for_round(round_index + 1)

Every call is retried with exponential backoff while the server is UNAVAILABLE (down,
restarting, busy, a network blip); a resubmitted update is safe because the server treats an
identical update as a duplicate, even once its round has closed. Every failure surfaces as
:class:`TransportError`; one for the wrong round carries the server's open round in
``open_round`` (a late or restarted client then calls ``guard.begin_round(err.open_round)``).
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import grpc
import torch

from gradguard.transport._generated.v1 import aggregator_pb2 as pb
from gradguard.transport._generated.v1 import aggregator_pb2_grpc as pb_grpc
from gradguard.transport.auth import ClientTLS, call_metadata
from gradguard.transport.codec import (CHUNK_BYTES, TensorPayload, decode_tensors, digest_hex, submit_messages,
                                       update_header)
from gradguard.transport.errors import OPEN_ROUND_KEY, TransportError
from gradguard.transport.rounds import Ack, RoundStatus
from gradguard.update import ProtectedUpdate

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_SUBMIT_UPDATE = "/gradguard.v1.Aggregator/SubmitUpdate"


@dataclass(frozen=True)
class RetryPolicy:
    """How a call that failed with UNAVAILABLE is retried.

    attempts: tries in all (1 disables retries). The wait before try k+1 is drawn uniformly
    from [b/2, b] with b = min(max_backoff_s, initial_backoff_s * multiplier**(k-1)), so many
    clients that lost the same server do not come back in lockstep.
    """

    attempts: int = 8
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 8.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy needs attempts >= 1, backoffs >= 0 and multiplier >= 1")

    def channel_options(self) -> list[tuple[str, int]]:
        """gRPC's own reconnect backoff, aligned with this policy: otherwise a channel that lost
        its server keeps failing fast for up to its default 120 s backoff, whatever we retry."""
        initial_ms, max_ms = max(1, int(self.initial_backoff_s * 1000)), max(1, int(self.max_backoff_s * 1000))
        return [("grpc.initial_reconnect_backoff_ms", initial_ms), ("grpc.min_reconnect_backoff_ms", initial_ms),
                ("grpc.max_reconnect_backoff_ms", max_ms)]

    def backoff_s(self, attempt: int) -> float:
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class JoinInfo:
    """What the server told a joining client."""

    round: int
    layout: dict[str, tuple[str, tuple[int, ...]]]  # the global model: name -> (dtype code, shape)
    averaged: frozenset[str]  # names an update must carry
    max_update_bytes: int
    min_clients: int
    round_deadline_s: float  # inf: no deadline


class AggregatorClient:
    """A client of one aggregator.

    address: the server's ``host:port``.
    client_id / token: the credentials the server was given for this client.
    tls: how to check the server's certificate (and the client certificate for mutual TLS);
        None speaks plaintext, for a server on loopback.
    retry: the retries on UNAVAILABLE.
    chunk_bytes: size of the pieces an update is sent in (at most 1 MiB, what servers accept).
    timeout_s: deadline of each call (a submit or fetch of a large model included).
    """

    def __init__(self, address: str, *, client_id: str, token: str, tls: ClientTLS | None = None,
                 retry: RetryPolicy = RetryPolicy(), chunk_bytes: int = CHUNK_BYTES,
                 timeout_s: float = 300.0) -> None:
        if not 0 < chunk_bytes <= CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in 1..{CHUNK_BYTES}: servers refuse larger messages")
        self.address = address
        self.client_id = client_id
        self.retry = retry
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self._metadata = call_metadata(client_id, token)
        self._tls = tls
        options = retry.channel_options()
        if tls is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, tls.credentials(), options=options + tls.channel_options())
        self._stub = pb_grpc.AggregatorStub(self._channel)
        # submit_messages serializes its requests itself, to frame each chunk in one copy (wire.data_message).
        self._submit_update = self._channel.stream_unary(
            _SUBMIT_UPDATE, response_deserializer=pb.SubmitUpdateResponse.FromString)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "AggregatorClient":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, what: str, attempt: Callable[[], _T]) -> _T:
        for tries in range(1, self.retry.attempts + 1):
            try:
                return attempt()
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.UNAVAILABLE and tries < self.retry.attempts:
                    delay = self.retry.backoff_s(tries)
                    log.info("%s: server unavailable (%s); retry %d in %.2f s", what, err.details(), tries, delay)
                    time.sleep(delay)
                    continue
                tried = f" (after {tries} attempts)" if tries > 1 else ""
                raise TransportError(code, f"{what} to {self.address} failed{tried}: {err.details()}"
                                     f"{self._hint(code, err.details() or '')}",
                                     open_round=_open_round(err)) from None
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _hint(self, code: grpc.StatusCode, details: str) -> str:
        """The likely cause of a connection that never got through, which gRPC reports only as
        UNAVAILABLE with a socket-level message."""
        if code != grpc.StatusCode.UNAVAILABLE or "busy" in details or "in flight" in details:
            return ""
        if self._tls is None:
            return (". Is the server up at this address? If it speaks TLS, connect with "
                    "tls=ClientTLS(root_certificates=...) (gradguard client --tls-ca)")
        if self._tls.certificate_chain is None:
            mutual = ("; if the server requires mutual TLS (--tls-client-ca), give this client's certificate "
                      "and key (ClientTLS(certificate_chain=..., private_key=...), --tls-cert/--tls-key)")
        else:
            mutual = "; check that the client certificate is signed by the CA the server trusts (--tls-client-ca)"
        return (". Is the server up at this address? Check that root_certificates (--tls-ca) is the CA that "
                "signed the server's certificate and that the certificate names this host (else set "
                f"server_name); check that the server speaks TLS at all{mutual}")

    def join(self) -> JoinInfo:
        """Register with the federation: the server then waits for this client in every round."""
        response: pb.JoinResponse = self._call("join", lambda: self._stub.Join(
            pb.JoinRequest(), metadata=self._metadata, timeout=self.timeout_s))
        return JoinInfo(
            round=response.round,
            layout={t.name: (t.dtype, tuple(t.shape)) for t in response.tensors},
            averaged=frozenset(t.name for t in response.tensors if t.averaged),
            max_update_bytes=response.max_update_bytes, min_clients=response.min_clients,
            round_deadline_s=response.round_deadline_s)

    def fetch_global(self, round: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        """The open round's index and its global model (a state dict on CPU). ``round`` asks
        for a specific round and fails with FAILED_PRECONDITION if it is not the open one."""
        request = pb.FetchGlobalRequest() if round is None else pb.FetchGlobalRequest(round=round)

        def attempt() -> tuple[pb.GlobalModelHeader, bytes]:
            stream = self._stub.FetchGlobal(request, metadata=self._metadata, timeout=self.timeout_s)
            first = next(stream)
            return first.header, b"".join(message.data for message in stream)

        header, payload = self._call("fetch_global", attempt)
        if len(payload) != header.total_bytes or digest_hex(payload) != header.digest:
            raise TransportError(grpc.StatusCode.DATA_LOSS,
                                 f"the global model of round {header.round} arrived corrupted "
                                 f"({len(payload)} of {header.total_bytes} bytes, or a wrong checksum); fetch again")
        return header.round, decode_tensors(payload)

    def submit(self, update: ProtectedUpdate) -> Ack:
        """Send ``update`` (e.g. ``guard.protected_update()``) for its round; returns the receipt.

        The update's leakage report (``update.leakage``) travels in the header's ``leakage``
        field. Raises :class:`TransportError` with the server's status when it refuses the update:
        INVALID_ARGUMENT (layout, dtype, non-finite values, malformed payload or leakage report),
        FAILED_PRECONDITION (not the open round; or, on a server with a maximum leakage
        (``--max-leakage-db``), an estimate over it, a missed target or no report: train the round
        again and submit the new update), RESOURCE_EXHAUSTED (too large),
        ALREADY_EXISTS (a different update of this client is in, or these bytes with another
        header), DATA_LOSS (corrupted). A retry of an update already accepted, even after its
        round closed, returns its receipt with ``duplicate=True``.
        """
        if update.client_id and update.client_id != self.client_id:
            raise ValueError(f"the update is client {update.client_id!r}'s but this client is {self.client_id!r}")
        payload = TensorPayload(update.tensors)
        header = update_header(update, payload, client_id=self.client_id)
        response: pb.SubmitUpdateResponse = self._call("submit", lambda: self._submit_update(
            submit_messages(header, payload, chunk_bytes=self.chunk_bytes),
            metadata=self._metadata, timeout=self.timeout_s))
        return Ack(round=response.round, digest=response.digest, duplicate=response.duplicate,
                   accepted_in_round=response.accepted_in_round)

    def status(self) -> RoundStatus:
        response: pb.StatusResponse = self._call("status", lambda: self._stub.GetStatus(
            pb.StatusRequest(), metadata=self._metadata, timeout=self.timeout_s))
        return RoundStatus(
            round=response.round, accepted_in_round=response.accepted_in_round,
            joined_clients=response.joined_clients, min_clients=response.min_clients,
            seconds_to_deadline=response.seconds_to_deadline, joined=response.joined,
            submitted=response.submitted)

    def wait_for_round(self, round_index: int, timeout_s: float | None = 600.0,
                       *, poll_s: float = 0.25) -> RoundStatus:
        """Poll until round ``round_index`` is open; raises TimeoutError after ``timeout_s``
        (None: wait for ever)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (status := self.status()).round < round_index:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"round {round_index} did not open within {timeout_s} s: round {status.round} "
                                   f"has {status.accepted_in_round} update(s), needs {status.min_clients}")
            time.sleep(poll_s)
        return status


def _open_round(err: grpc.RpcError) -> int | None:
    """The open round the server named in a refusal's trailing metadata, if any."""
    for key, value in (err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else ():
        if key == OPEN_ROUND_KEY and str(value).isdigit():
            return int(value)
    return None
