"""No client can stall the others: stalled uploads and fetches are cut, Join and GetStatus stay served."""
from __future__ import annotations

import logging
import threading

import grpc
import pytest
import torch
from transport_helpers import make_update, small_state

from gradguard.transport import RetryPolicy, TransportError, generate_tokens
from gradguard.transport._generated.v1 import aggregator_pb2 as pb
from gradguard.transport._generated.v1 import aggregator_pb2_grpc as pb_grpc
from gradguard.transport.auth import call_metadata
from gradguard.transport.codec import TensorPayload, submit_messages, update_header

STATE = small_state()
TOKENS = generate_tokens([f"c{i}" for i in range(6)])
PATIENT = RetryPolicy(attempts=40, initial_backoff_s=0.1, max_backoff_s=0.4)
STALL_LIMITS = dict(max_workers=6, control_workers=2, max_concurrent_updates=4, idle_timeout_s=1.0,
                    round_deadline_s=None, min_clients=6)


def _stalled_upload(address: str, client_id: str, release: threading.Event, outcome: list) -> threading.Thread:
    """An upload that sends its header and first chunk, then nothing until ``release``."""
    update = make_update(STATE, seed=1, num_samples=1, client_id=client_id)
    payload = TensorPayload(update.tensors)
    messages = [pb.SubmitUpdateRequest.FromString(message) for message in
                submit_messages(update_header(update, payload, client_id=client_id), payload, chunk_bytes=64)]

    def requests():
        yield from messages[:2]
        release.wait()

    def run():
        with grpc.insecure_channel(address) as channel:
            try:
                pb_grpc.AggregatorStub(channel).SubmitUpdate(requests(), metadata=call_metadata(
                    client_id, TOKENS[client_id]), timeout=60)
            except grpc.RpcError as err:
                outcome.append(err.code())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_stalled_uploads_are_cut_and_never_block_status_join_or_an_honest_client(start_server, connect):
    server = start_server(STATE, clients=TOKENS, **STALL_LIMITS)
    release, outcomes = threading.Event(), []
    stalled = [_stalled_upload(server.address, f"c{i}", release, outcomes) for i in range(4)]
    try:
        observer = connect(server, "c5", token=TOKENS["c5"], timeout_s=5)
        for _ in range(3):  # served apart from the streams, while all of their threads are taken
            assert observer.status().round == 0
            assert observer.join().round == 0
        honest = connect(server, "c4", token=TOKENS["c4"], retry=PATIENT)
        assert not honest.submit(make_update(STATE, seed=4, num_samples=1)).duplicate  # once the stalled are cut
        for thread in stalled:
            thread.join(timeout=30)
        assert outcomes == [grpc.StatusCode.CANCELLED] * 4
    finally:
        release.set()
    assert server.status().accepted_in_round == 1


def test_one_upload_in_flight_per_client(start_server, connect):
    server = start_server(STATE, clients=TOKENS, **STALL_LIMITS)
    release, outcomes = threading.Event(), []
    stalled = _stalled_upload(server.address, "c1", release, outcomes)
    try:
        while "c1" not in server._rounds._uploads._busy:  # the stalled upload has reached the server
            threading.Event().wait(0.01)
        with pytest.raises(TransportError) as refused:
            connect(server, "c1", token=TOKENS["c1"]).submit(make_update(STATE, seed=1, num_samples=1))
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert "another upload of client 'c1' is in flight" in refused.value.message
    finally:
        release.set()
        stalled.join(timeout=30)


def test_a_fetch_that_is_never_read_is_cut(start_server, connect):
    big = {"w": torch.zeros(16 << 20), "n": torch.tensor(3)}  # 64 MB: far beyond what gRPC buffers for a reader
    server = start_server(big, clients=TOKENS, max_workers=4, control_workers=2, idle_timeout_s=1.0)
    unread = []
    for client_id in ("c1", "c2"):
        channel = grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)])
        stream = pb_grpc.AggregatorStub(channel).FetchGlobal(
            pb.FetchGlobalRequest(), metadata=call_metadata(client_id, TOKENS[client_id]), timeout=60)
        assert next(stream).header.total_bytes > 64 << 20
        unread.append((channel, stream))
    try:
        assert connect(server, "c5", token=TOKENS["c5"], timeout_s=5).status().round == 0
        round_index, state = connect(server, "c3", token=TOKENS["c3"], retry=PATIENT).fetch_global()
        assert round_index == 0 and torch.equal(state["w"], big["w"])
        for _, stream in unread:
            with pytest.raises(grpc.RpcError) as cut:
                for _ in stream:
                    pass
            assert cut.value.code() == grpc.StatusCode.CANCELLED
    finally:
        for channel, _ in unread:
            channel.close()


def test_a_refused_call_logs_only_a_short_prefix_of_the_claimed_id(start_server, caplog):
    server = start_server(STATE, clients=TOKENS)
    claimed = "x" * 4000
    with grpc.insecure_channel(server.address) as channel, caplog.at_level(logging.WARNING):
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.AggregatorStub(channel).GetStatus(pb.StatusRequest(), metadata=call_metadata(claimed, "t" * 32),
                                                      timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "(4002 characters)" in caplog.text and "x" * 100 not in caplog.text
