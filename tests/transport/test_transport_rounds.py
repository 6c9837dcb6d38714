"""FedAvg over gRPC equals FedAvg in memory; rounds close on time and refuse stragglers."""
from __future__ import annotations

import threading

import grpc
import pytest
import torch
from transport_helpers import assert_states_close, make_update, reference_fedavg, small_state

from gradguard.transport import TransportError, generate_tokens


def test_ten_clients_over_grpc_equal_in_memory_fedavg(start_server, connect):
    tokens = generate_tokens([f"h{i}" for i in range(10)])
    state = small_state()
    server = start_server(state, clients=tokens, min_clients=10, round_deadline_s=None)
    updates = [make_update(state, seed=i, num_samples=[1, 4, 4, 8, 8, 32, 32, 128, 512, 3][i], client_id=f"h{i}")
               for i in range(10)]
    errors = []

    def run(update):
        try:
            client = connect(server, update.client_id, token=tokens[update.client_id])
            client.join()
            round_index, fetched = client.fetch_global()
            assert round_index == 0
            assert_states_close(fetched, state, atol=0)  # int buffers travel on fetch too
            assert not client.submit(update).duplicate
        except Exception as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(u,)) for u in updates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    server.wait_for_round(1, timeout_s=30)
    want = reference_fedavg(state, updates)
    assert_states_close(server.global_state(), want, atol=1e-7)
    _, fetched = connect(server, "h0", token=tokens["h0"]).fetch_global(round=1)
    assert_states_close(fetched, want, atol=1e-7)
    assert fetched["1.num_batches_tracked"].dtype == torch.int64


def test_rounds_chain_and_each_uses_its_own_global(start_server, connect):
    state = small_state()
    server = start_server(state, clients={"c1": "t" * 16, "c2": "u" * 16}, min_clients=2, round_deadline_s=None)
    clients = [connect(server, "c1", token="t" * 16), connect(server, "c2", token="u" * 16)]
    expected = state
    for round_index in range(3):
        updates = [make_update(expected, seed=10 * round_index + i, num_samples=i + 1, round=round_index)
                   for i in range(2)]
        for client, update in zip(clients, updates):
            client.submit(update)
        clients[0].wait_for_round(round_index + 1, timeout_s=30, poll_s=0.05)
        expected = reference_fedavg(expected, updates)
        _, fetched = clients[1].fetch_global()
        assert_states_close(fetched, expected, atol=1e-6)


def test_deadline_closes_the_round_without_the_straggler_and_refuses_it_later(start_server, connect):
    state = small_state()
    server = start_server(state, clients={f"c{i}": f"token-of-client-{i}" for i in range(3)},
                          min_clients=2, round_deadline_s=1.0)
    clients = [connect(server, f"c{i}", token=f"token-of-client-{i}") for i in range(3)]
    for client in clients:
        client.join()
    on_time = [make_update(state, seed=i, num_samples=5) for i in range(2)]
    for client, update in zip(clients, on_time):
        client.submit(update)
    assert server.current_round == 0  # the third joined client is still expected
    server.wait_for_round(1, timeout_s=10)  # ...until the deadline
    closed = server.global_state()
    assert_states_close(closed, reference_fedavg(state, on_time))
    with pytest.raises(TransportError) as late:
        clients[2].submit(make_update(state, seed=9, num_samples=5, round=0))
    assert late.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "round 0 is closed; the open round is 1" in late.value.message
    assert_states_close(server.global_state(), closed, atol=0)
    assert server.status().accepted_in_round == 0


def test_a_round_below_min_clients_waits_past_its_deadline(start_server, connect):
    state = small_state()
    server = start_server(state, clients={"c1": "t" * 16, "c2": "u" * 16}, min_clients=2, round_deadline_s=0.2)
    connect(server, "c1", token="t" * 16).submit(make_update(state, seed=1, num_samples=1))
    with pytest.raises(TimeoutError, match="needs 2"):
        server.wait_for_round(1, timeout_s=0.6)
    update = make_update(state, seed=2, num_samples=3)
    connect(server, "c2", token="u" * 16).submit(update)
    server.wait_for_round(1, timeout_s=10)


def test_fetching_another_round_than_the_open_one_is_refused(start_server, connect):
    server = start_server(small_state(), clients={"c1": "t" * 16})
    client = connect(server, "c1", token="t" * 16)
    for asked, words in ((1, "has not opened"), (-1, "is closed")):
        with pytest.raises(TransportError) as err:
            client.fetch_global(round=asked)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"round {asked} {words}" in err.value.message
