"""The aggregator server: gRPC around :class:`RoundManager`, behind TLS and per-client tokens.

    server = AggregatorServer(model.state_dict(), state_dir="agg-state",
                              clients=generate_tokens(["c1", "c2", "c3"]),
                              config=AggregatorConfig(min_clients=3, round_deadline_s=30))
    with server:                      # starts on 127.0.0.1 and a free port: server.address
        server.wait_for_round(5)      # clients join, fetch, train and submit meanwhile
        final = server.global_state()
"""
from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from gradguard.transport._generated.v1 import aggregator_pb2 as pb
from gradguard.transport._generated.v1 import aggregator_pb2_grpc as pb_grpc
from gradguard.transport.auth import (CLIENT_ID_KEY, AuthInterceptor, ServerTLS, TokenRegistry, authenticated_client,
                                      short_id)
from gradguard.transport.config import AggregatorConfig
from gradguard.transport.errors import OPEN_ROUND_KEY, TransportError
from gradguard.transport.rounds import OnePerClient, RoundManager, RoundStatus
from gradguard.transport.store import StateStore
from gradguard.transport.validation import check_digest
from gradguard.transport.wire import MAX_MESSAGE_BYTES, data_view, read_ahead

if TYPE_CHECKING:  # the server itself never imports torch
    import torch

log = logging.getLogger(__name__)
_Response = TypeVar("_Response")
_MAX_METADATA_BYTES = 8 << 10  # a call's gRPC metadata: ids, token, gRPC's own entries
SubmitRequest = pb.SubmitUpdateRequest | memoryview  # a data chunk arrives as a view: see _submit_request


def _abort(context: grpc.ServicerContext, err: Exception) -> None:
    """End the call with ``err``'s status; anything but a TransportError is a server bug."""
    client = short_id(dict(context.invocation_metadata()).get(CLIENT_ID_KEY, "?"))
    if isinstance(err, TransportError):
        # A busy server is routine under load (clients retry it): not worth a warning each time.
        log.log(logging.INFO if err.code == grpc.StatusCode.UNAVAILABLE else logging.WARNING,
                "refused a call from %s: %s", client, err)
        if err.open_round is not None:
            context.set_trailing_metadata(((OPEN_ROUND_KEY, str(err.open_round)),))
        context.abort(err.code, err.message)
    if not context.is_active():
        context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled (by its client, or by the server's "
                                                 "call or idle timeout)")
    log.error("internal error on a call from %s", client, exc_info=err)
    context.abort(grpc.StatusCode.INTERNAL, "the aggregator failed on this call; its log has the details")


def _unary_response(method: Callable[..., _Response]) -> Callable[..., _Response]:
    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> _Response:
        try:
            return method(self, request, context)
        except Exception as err:  # a call never crashes the server: it ends with a status
            _abort(context, err)
            raise  # unreachable: abort raises
    return wrapper


class _Watch:
    """One stream under the watchdog: when it started, when it last moved."""

    def __init__(self, context: grpc.ServicerContext, what: str) -> None:
        self.context = context
        self.what = what
        self.started = self.moved = time.monotonic()

    def touch(self) -> None:
        self.moved = time.monotonic()


class _Watchdog:
    """Cancels streams that exceed the server's own call deadline or stay idle too long, so a
    client that stalls (or never reads what it asked for) frees its thread."""

    def __init__(self, *, call_timeout_s: float, idle_timeout_s: float) -> None:
        self._call_timeout_s = call_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._watched: set[_Watch] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradguard-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @contextlib.contextmanager
    def watch(self, context: grpc.ServicerContext, what: str) -> Iterator[_Watch]:
        watched = _Watch(context, what)
        with self._lock:
            self._watched.add(watched)
        try:
            yield watched
        finally:
            with self._lock:
                self._watched.discard(watched)

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self._idle_timeout_s / 4)):
            now = time.monotonic()
            with self._lock:
                watched = list(self._watched)
            for call in watched:
                if now - call.started > self._call_timeout_s:
                    reason = f"took over the server's call timeout of {self._call_timeout_s:g} s"
                elif now - call.moved > self._idle_timeout_s:
                    reason = f"moved no data for {self._idle_timeout_s:g} s"
                else:
                    continue
                log.warning("cancelled %s: it %s", call.what, reason)
                with self._lock:
                    self._watched.discard(call)
                call.context.cancel()


class _UpdateStream:
    """The data of a SubmitUpdate stream after its header, read ahead; once the data is read,
    ``trailer_digest`` holds the digest its trailer gave (None without a trailer).

    gRPC lets a client send little beyond the message the server has asked for (the stream
    window stays at 64 KiB so that queued streams hold little memory), so asking for the next
    chunk while the consumer writes, hashes and checks the last one overlaps the receiving with
    that work."""

    _READ_AHEAD = 2  # chunks queued per upload: memory grows with the uploads in flight, not the clients

    def __init__(self, requests: Iterator[SubmitRequest], watch: _Watch, *, header_digest: bool) -> None:
        self._requests = requests
        self._watch = watch
        self._header_digest = header_digest
        self.trailer_digest: str | None = None

    def __iter__(self) -> Iterator[bytes | memoryview]:
        for message in read_ahead(self._requests, self._READ_AHEAD, self._watch.touch):
            if self.trailer_digest is not None:
                raise TransportError(grpc.StatusCode.INVALID_ARGUMENT,
                                     "a SubmitUpdate message came after the UpdateTrailer; the trailer is the last")
            if isinstance(message, memoryview):
                yield message
                continue
            kind = message.WhichOneof("payload")
            if kind == "data":
                yield message.data
            elif kind == "trailer" and not self._header_digest:
                self.trailer_digest = check_digest(message.trailer.digest, "the trailer's")
            else:
                raise TransportError(grpc.StatusCode.INVALID_ARGUMENT,
                                     "after the UpdateHeader a SubmitUpdate stream carries data, then one "
                                     "UpdateTrailer when the header's digest is empty (and none when it is given)")


def _submit_request(message: bytes) -> SubmitRequest:
    """SubmitUpdate's deserializer: a data chunk as a view of the received bytes, any other
    message parsed by protobuf (which copies a chunk twice)."""
    view = data_view(message)
    return view if view is not None else pb.SubmitUpdateRequest.FromString(message)


class _CollectHandlers:
    """Stands in for the server to take the generated method handlers, so that one is replaced."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """The generic handler over the same methods: _add_servicer registers its own."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, handlers


def _add_servicer(servicer: _Servicer, server: grpc.Server) -> None:
    """Register ``servicer`` under the generated handlers, SubmitUpdate's with :func:`_submit_request`."""
    collected = _CollectHandlers()
    pb_grpc.add_AggregatorServicer_to_server(servicer, collected)
    handlers = {**collected.handlers, "SubmitUpdate": grpc.stream_unary_rpc_method_handler(
        servicer.SubmitUpdate, request_deserializer=_submit_request,
        response_serializer=pb.SubmitUpdateResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(collected.service, handlers),))
    server.add_registered_method_handlers(collected.service, handlers)


class _Servicer(pb_grpc.AggregatorServicer):
    def __init__(self, rounds: RoundManager, config: AggregatorConfig, *, bind_certificate: bool) -> None:
        self._rounds = rounds
        self._config = config
        self._bind_certificate = bind_certificate
        self.watchdog = _Watchdog(call_timeout_s=config.call_timeout_s, idle_timeout_s=config.idle_timeout_s)
        # Uploads and fetches share the threads but control_workers of them: Join and GetStatus
        # are always served, however many streams are open or stalled.
        self._stream_slots = threading.BoundedSemaphore(config.stream_workers)
        self._fetches = OnePerClient("fetch", retry_hint="a stalled one is cut after "
                                     f"{config.idle_timeout_s:g} s")

    def _client(self, context: grpc.ServicerContext) -> str:
        return authenticated_client(context, bind_certificate=self._bind_certificate)

    @contextlib.contextmanager
    def _stream(self, context: grpc.ServicerContext, what: str) -> Iterator[_Watch]:
        if not self._stream_slots.acquire(blocking=False):
            raise TransportError(grpc.StatusCode.UNAVAILABLE,
                                 f"the server is busy: {self._config.stream_workers} uploads and fetches are in "
                                 "flight (AggregatorConfig.max_workers - control_workers); retry shortly")
        try:
            with self.watchdog.watch(context, what) as watch:
                yield watch
        finally:
            self._stream_slots.release()

    @_unary_response
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        round_index = self._rounds.join(self._client(context))
        deadline = self._config.round_deadline_s
        return pb.JoinResponse(round=round_index, tensors=self._rounds.spec.to_proto(),
                               max_update_bytes=self._config.max_update_bytes,
                               min_clients=self._config.min_clients,
                               round_deadline_s=math.inf if deadline is None else deadline)

    def FetchGlobal(self, request: pb.FetchGlobalRequest,
                    context: grpc.ServicerContext) -> Iterator[pb.GlobalModelChunk]:
        with contextlib.ExitStack() as held:
            try:
                client_id = self._client(context)
                held.enter_context(self._fetches.hold(client_id))
                watch = held.enter_context(self._stream(context, f"a fetch of client {client_id}"))
                round_index, digest, file = self._rounds.open_global(
                    request.round if request.HasField("round") else None)
            except Exception as err:
                _abort(context, err)
            with file:
                header = pb.GlobalModelHeader(round=round_index, total_bytes=os.fstat(file.fileno()).st_size,
                                              digest=digest)
                yield pb.GlobalModelChunk(header=header)
                while chunk := file.read(self._config.chunk_bytes):
                    watch.touch()  # the previous message was taken: the client reads
                    yield pb.GlobalModelChunk(data=chunk)

    @_unary_response
    def SubmitUpdate(self, request_iterator: Iterator[SubmitRequest],
                     context: grpc.ServicerContext) -> pb.SubmitUpdateResponse:
        client_id = self._client(context)
        with self._stream(context, f"an upload of client {client_id}") as watch:
            first = next(request_iterator, None)
            if not isinstance(first, pb.SubmitUpdateRequest) or first.WhichOneof("payload") != "header":
                raise TransportError(grpc.StatusCode.INVALID_ARGUMENT,
                                     "the first SubmitUpdate message must be the UpdateHeader")
            stream = _UpdateStream(request_iterator, watch, header_digest=bool(first.header.digest))
            ack = self._rounds.submit(client_id, first.header, stream, lambda: stream.trailer_digest,
                                      waiting=watch.touch)
        return pb.SubmitUpdateResponse(round=ack.round, digest=ack.digest, duplicate=ack.duplicate,
                                       accepted_in_round=ack.accepted_in_round)

    @_unary_response
    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        status = self._rounds.status(self._client(context))
        return pb.StatusResponse(
            round=status.round, accepted_in_round=status.accepted_in_round, joined_clients=status.joined_clients,
            min_clients=status.min_clients, seconds_to_deadline=status.seconds_to_deadline,
            joined=status.joined, submitted=status.submitted)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AggregatorServer:
    """An aggregator served over gRPC, in this process (it needs no torch of its own).

    initial_state: the global model at round 0: a state dict, or the path of a safetensors file
        holding one; may be None when ``state_dir`` already holds a state, which is then resumed
        (the open round and its accepted updates).
    state_dir: where the global model, the round state and the accepted updates are kept
        (created 0700; a directory holding rounds but no state.json is refused, never wiped).
    clients: ``{client_id: token}`` of every client allowed to take part, or
        ``{client_id: {"token": token, "max_num_samples": n}}`` to bound a client's weight.
    config: the round policy, aggregation rule and limits (:class:`AggregatorConfig`).
    tls: the server's certificate (and optionally the CA for mutual TLS, under which a client's
        certificate must name its client id). Without it the server speaks plaintext, which is
        only allowed on a loopback address unless ``allow_insecure``.
    address: ``host:port`` to listen on; port 0 picks a free port (see :attr:`port`).
    """

    def __init__(self, initial_state: Mapping[str, torch.Tensor] | str | Path | None = None, *,
                 state_dir: str | Path, clients: Mapping[str, Any], config: AggregatorConfig = AggregatorConfig(),
                 tls: ServerTLS | None = None, address: str = "127.0.0.1:0", allow_insecure: bool = False) -> None:
        self._host, _, port = address.rpartition(":")
        if not self._host or not port.isdigit():
            raise ValueError(f"address {address!r} is not host:port (e.g. 127.0.0.1:50051, [::1]:0, 0.0.0.0:50051)")
        if tls is None and not allow_insecure and not _is_loopback(self._host):
            raise ValueError(f"refusing to serve plaintext on {address}: tokens would cross the network in the "
                             "clear. Pass tls=ServerTLS(...) (gradguard serve --tls-cert/--tls-key), or "
                             "allow_insecure=True inside a network you trust")
        self.config = config
        self._address = address
        self._tls = tls
        tokens = TokenRegistry(clients)
        store = StateStore(state_dir, fsync=config.fsync)
        if initial_state is None or isinstance(initial_state, (str, Path)):
            self._rounds = self._resume(None if initial_state is None else Path(initial_state), store, tokens)
        else:  # tensors: torch is loaded already, by whoever made them
            from gradguard.transport.codec import write_tensors
            initial = store.incoming_path()
            try:
                write_tensors(initial, initial_state)
                self._rounds = self._resume(initial, store, tokens)
            finally:
                initial.unlink(missing_ok=True)
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="gradguard-rpc"),
            interceptors=[AuthInterceptor(tokens)],
            options=[
                ("grpc.so_reuseport", 0),  # a second server on the same port fails instead of sharing it
                # Without bandwidth probing, gRPC keeps each stream's receive window at its 64 KiB
                # default; with it, the window grows to megabytes and every stream waiting for a
                # worker thread buffers most of its update in memory (measured: 34x the model size
                # with 100 clients, against 4x without).
                ("grpc.http2.bdp_probe", 0),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_metadata_size", _MAX_METADATA_BYTES),
            ],
        )
        self._servicer = _Servicer(self._rounds, config,
                                   bind_certificate=tls is not None and tls.client_ca is not None)
        _add_servicer(self._servicer, self._server)
        self.port: int | None = None

    def _resume(self, initial: Path | None, store: StateStore, tokens: TokenRegistry) -> RoundManager:
        return RoundManager(initial, store=store, config=self.config, known_clients=tokens,
                            max_num_samples=tokens.max_num_samples)

    def start(self) -> "AggregatorServer":
        if self._tls is None:
            port = self._server.add_insecure_port(self._address)
        else:
            self._tls.warn_if_expiring()
            port = self._server.add_secure_port(self._address, self._tls.credentials())
        if not port:
            raise RuntimeError(f"cannot listen on {self._address}: is the port in use?")
        self.port = port
        self._server.start()
        self._rounds.start()
        self._servicer.watchdog.start()
        log.info("aggregator listening on %s (round %d, %s, %s)", self.address, self.current_round,
                 "TLS" if self._tls else "plaintext", self.config.aggregation)
        return self

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Stop serving; calls in flight get ``grace_s`` seconds to finish."""
        self._server.stop(grace_s).wait()
        self._servicer.watchdog.stop()
        self._rounds.stop()

    def __enter__(self) -> "AggregatorServer":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``host:port`` clients connect to (the bound port when 0 was asked for)."""
        if self.port is None:
            raise RuntimeError("the server is not started: call start() first")
        return f"{self._host}:{self.port}"

    @property
    def current_round(self) -> int:
        return self._rounds.round

    @property
    def finished(self) -> bool:
        """Whether ``config.rounds`` rounds are complete (the server then serves the final model)."""
        return self._rounds.finished

    def global_state(self) -> dict[str, torch.Tensor]:
        """A copy of the global model of the open round (as torch tensors)."""
        from gradguard.transport.codec import iter_tensors
        return dict(iter_tensors(self._rounds.global_path()))

    def status(self) -> RoundStatus:
        return self._rounds.status()

    def wait_for_round(self, round_index: int, timeout_s: float | None = 600.0) -> None:
        """Block until round ``round_index`` is open; raises TimeoutError after ``timeout_s``
        (None: wait for ever)."""
        if not self._rounds.wait_for_round(round_index, timeout_s):
            status = self.status()
            raise TimeoutError(f"round {round_index} did not open within {timeout_s} s: round {status.round} has "
                               f"{status.accepted_in_round} of {status.joined_clients} joined clients' updates "
                               f"(it needs {status.min_clients})")
