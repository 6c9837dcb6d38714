"""The aggregate no client can break: every rule equals numpy on the same updates, attacks included."""
from __future__ import annotations

import math
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch
from transport_helpers import make_update, small_state

from gradguard.transport import AggregatorConfig, TransportError, generate_tokens
from gradguard.transport.aggregation import aggregate, clip_scale, coordinate_median, trimmed_mean, weighted_mean
from gradguard.update import ProtectedUpdate

STATE = small_state()
NUMEL = sum(t.numel() for t in STATE.values() if t.is_floating_point())
TOKENS = generate_tokens(["c1", "c2", "c3", "c4", "c5"])


def _expected(state, updates, *, rule="fedavg", trim=0.1, max_norm=None):
    """The next global model by numpy in float64, rounded once to each tensor's dtype."""
    norms = [np.sqrt(sum(float(np.sum(t.double().numpy() ** 2)) for t in u.tensors.values())) for u in updates]
    scales = [1.0 if max_norm is None or n <= max_norm else max_norm / n for n in norms]
    result = {}
    for name, value in state.items():
        if not value.is_floating_point():
            result[name] = value.clone()
            continue
        rows = np.stack([u.tensors[name].double().numpy().reshape(-1) * s for u, s in zip(updates, scales)])
        if rule == "fedavg":
            w = np.array([u.num_samples for u in updates], dtype=np.float64)
            step = (w[:, None] * rows).sum(axis=0) / w.sum()
        elif rule == "median":
            step = np.median(rows, axis=0)
        else:
            ordered = np.sort(rows, axis=0)
            cut = int(trim * len(rows))
            step = ordered[cut:len(rows) - cut].mean(axis=0)
        result[name] = (value.double() + torch.from_numpy(step).reshape(value.shape)).to(value.dtype)
    return result


def _run_round(start_server, connect, updates, **config):
    server = start_server(STATE if "state" not in config else config.pop("state"), clients=TOKENS,
                          min_clients=len(updates), round_deadline_s=None, **config)
    for update in updates:
        connect(server, update.client_id, token=TOKENS[update.client_id]).submit(update)
    server.wait_for_round(1, timeout_s=30)
    return server


def _assert_equal(got, want, *, rtol=1e-6):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.isfinite(got[name].double()).all(), name
        torch.testing.assert_close(got[name].double(), want[name].double(), rtol=rtol, atol=1e-7, msg=name)


def _attack(value: float, *, num_samples: int, client_id: str = "c1", state=STATE) -> ProtectedUpdate:
    tensors = {n: torch.full(t.shape, value, dtype=t.dtype) for n, t in state.items() if t.is_floating_point()}
    return ProtectedUpdate(tensors=tensors, kind="delta", num_samples=num_samples, num_steps=1, round=0,
                           client_id=client_id)


def _honest(i: int, state=STATE) -> ProtectedUpdate:
    return make_update(state, seed=i, num_samples=i + 1, client_id=f"c{i + 1}")


def test_the_rules_are_numpy_expressions():
    rows = np.random.default_rng(0).normal(size=(7, 50)) * 10.0 ** np.arange(7)[:, None]
    weights = [1, 2, 3, 4, 5, 6, 2**63 - 1]
    w = np.array(weights, dtype=np.float64)
    np.testing.assert_allclose(weighted_mean(rows, weights), (w[:, None] * rows).sum(0) / w.sum(), rtol=1e-12)
    np.testing.assert_array_equal(coordinate_median(rows), np.median(rows, axis=0))
    np.testing.assert_allclose(trimmed_mean(rows, 0.2), np.sort(rows, axis=0)[1:6].mean(0), rtol=1e-12)
    np.testing.assert_array_equal(trimmed_mean(rows[:2], 0.49), rows[:2].mean(0))  # one value is always kept
    assert clip_scale(50.0, 10.0) == 0.2 and clip_scale(5.0, 10.0) == 1.0 and clip_scale(5.0, None) == 1.0
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        aggregate(rows, weights, rule="krum")


def test_weighted_mean_does_not_overflow_where_the_mean_is_finite():
    rows = np.array([[3e38], [3e38]])
    assert weighted_mean(rows, [2**62, 2**62])[0] == pytest.approx(3e38)


@pytest.mark.parametrize("rule", ["fedavg", "median", "trimmed_mean"])
def test_each_rule_over_grpc_equals_numpy_with_an_attacker(rule, start_server, connect):
    updates = [_honest(i) for i in range(4)] + [_attack(1e36, num_samples=1000, client_id="c5")]
    server = _run_round(start_server, connect, updates, aggregation=rule, trim_fraction=0.2)
    _assert_equal(server.global_state(), _expected(STATE, updates, rule=rule, trim=0.2))
    if rule != "fedavg":  # one vote each: the attacker moved the robust aggregate by no more than a client can
        assert float(server.global_state()["3.weight"].abs().max()) < 10


def test_a_huge_update_times_a_large_weight_stays_finite(start_server, connect):
    """1e36 with weight 1000 overflowed a float32 running sum to +inf for good."""
    updates = [_attack(1e36, num_samples=1000), _honest(1)]
    server = _run_round(start_server, connect, updates)
    _assert_equal(server.global_state(), _expected(STATE, updates))


def test_weight_two_to_the_63_is_refused_by_default_and_finite_when_allowed(start_server, connect):
    client = connect(start_server(STATE, clients=TOKENS, round_deadline_s=None), "c1", token=TOKENS["c1"])
    with pytest.raises(TransportError) as err:
        client.submit(_attack(1e22, num_samples=2**63 - 1))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the 1000000 this server allows client 'c1'" in err.value.message


def test_weight_two_to_the_63_allowed_gives_the_float64_mean(tmp_path, connect):
    from gradguard.transport import AggregatorServer
    updates = [_attack(1e22, num_samples=2**63 - 1), _honest(1)]
    with AggregatorServer(STATE, state_dir=tmp_path / "s", clients=TOKENS, config=AggregatorConfig(
            min_clients=2, round_deadline_s=None, max_num_samples=2**63 - 1)) as server:
        for update in updates:
            connect(server, update.client_id, token=TOKENS[update.client_id]).submit(update)
        server.wait_for_round(1, timeout_s=30)
        _assert_equal(server.global_state(), _expected(STATE, updates))


def test_a_client_weight_bound_from_the_clients_file(tmp_path, connect):
    from gradguard.transport import AggregatorServer
    clients = {"c1": {"token": TOKENS["c1"], "max_num_samples": 50}, "c2": TOKENS["c2"]}
    with AggregatorServer(STATE, state_dir=tmp_path / "s", clients=clients) as server:
        with pytest.raises(TransportError, match="over the 50 this server allows client 'c1'"):
            connect(server, "c1", token=TOKENS["c1"]).submit(replace(_honest(0), num_samples=51))
        assert not connect(server, "c2", token=TOKENS["c2"]).submit(_honest(1)).duplicate


def test_a_norm_1e30_update_is_clipped_to_the_bound(start_server, connect):
    updates = [_honest(0), _attack(1e30 / math.sqrt(NUMEL), num_samples=5, client_id="c2")]  # L2 norm 1e30
    server = _run_round(start_server, connect, updates, max_update_norm=1.0)
    want = _expected(STATE, updates, max_norm=1.0)
    _assert_equal(server.global_state(), want)
    moved = max(float((server.global_state()[n].double() - STATE[n].double()).abs().max()) for n in want)
    assert moved < 1.0  # where the unbounded global moved to about 1e28


def test_a_norm_bound_can_refuse_instead(start_server, connect):
    server = start_server(STATE, clients=TOKENS, round_deadline_s=None, max_update_norm=1.0, norm_bound="refuse")
    with pytest.raises(TransportError) as err:
        connect(server, "c2", token=TOKENS["c2"]).submit(_attack(1e27, num_samples=5, client_id="c2"))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "L2 norm is" in err.value.message
    assert server.status().accepted_in_round == 0


def test_a_half_precision_model_never_overflows(start_server, connect):
    """An F16 model stepped by large deltas overflowed to inf in its second round."""
    state = {n: (t.half() if t.is_floating_point() else t) for n, t in STATE.items()}
    big = [_attack(40000.0, num_samples=1000, client_id="c1", state=state),
           _attack(40000.0, num_samples=1000, client_id="c2", state=state)]
    server = _run_round(start_server, connect, big, state=state)
    _assert_equal(server.global_state(), _expected(state, big), rtol=1e-3)
    again = _attack(40000.0, num_samples=1000, client_id="c1", state=state)
    again.round = 1
    with pytest.raises(TransportError) as err:
        connect(server, "c1", token=TOKENS["c1"]).submit(again)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "is beyond the range of F16" in err.value.message
    assert all(torch.isfinite(t.double()).all() for t in server.global_state().values())
