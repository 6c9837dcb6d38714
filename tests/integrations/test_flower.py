"""GradGuard on Flower: the ClientApp, the mod and the strategy wrapper in process, then the
example end to end on Flower's deployment engine against GradGuard's own gRPC aggregator."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord,
                      RecordDict)
from flwr.clientapp import ClientApp
from flwr.common.config import get_fused_config_from_dir, parse_config_args
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import load_file
from torch import nn

from gradguard import GuardConfig
from gradguard.eval.datasets import DatasetError, load_medmnist
from gradguard.integrations.flower import (GradGuardStrategy, gradguard_mod, guard_config, guarded_client_app,
                                           guarded_round, node_client_id)
from gradguard.transport import AggregatorClient, AggregatorConfig, AggregatorServer, generate_tokens

APP_DIR = Path(__file__).resolve().parents[2] / "examples" / "flower"
EPS32 = float(np.finfo(np.float32).eps)
NODE_SEED = 7


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


IMAGES, LABELS = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 4)
RUN = {"num-server-rounds": 3, "gradguard.refresh-every": 2}


def tiny_train(model, optimizer, guard, context) -> dict[str, float]:
    for images, labels in zip(IMAGES.split(4), LABELS.split(4)):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return {"train-loss": 1.5}


def tiny_app(mods=()) -> ClientApp:
    return guarded_client_app(tiny_train, model_fn=lambda context: TinyNet(),
                              optimizer_fn=lambda model, context: torch.optim.SGD(model.parameters(), lr=0.1),
                              mods=mods)


def train_message(arrays: ArrayRecord, server_round: int, node_id: int = 5) -> Message:
    # The metadata a SuperNode gives a train instruction (Message() without it needs a Flower runtime).
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
                   metadata=Metadata(run_id=1, message_id=f"m{server_round}-{node_id}", src_node_id=0,
                                     dst_node_id=node_id, reply_to_message_id="", group_id="", created_at=0.0,
                                     ttl=600.0, message_type=MessageType.TRAIN))


def node(partition: int, run_config: dict, seed: int | None = None) -> Context:
    """A SuperNode's context; ``seed`` is what its operator would give as --node-config gradguard-seed."""
    config = {"partition-id": partition, "num-partitions": 3, **({} if seed is None else {"gradguard-seed": seed})}
    return Context(run_id=1, node_id=100 + partition, node_config=config, state=RecordDict(), run_config=run_config)


def initial_arrays() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(TinyNet().state_dict())


def test_run_config_sets_guard_fields_and_names_unknown_keys():
    config = guard_config({"num-server-rounds": 7, "gradguard.noise-amplitude": 0.3, "gradguard.refresh-every": 4,
                           "lr": 0.1})
    assert (config.noise_amplitude, config.refresh_every, config.total_rounds) == (0.3, 4, 7)
    assert guard_config({"gradguard.preset": "untargeted"}) == GuardConfig.preset("untargeted")
    assert guard_config({}, base=GuardConfig(noise_amplitude=0.4)).noise_amplitude == 0.4
    with pytest.raises(ValueError,
                       match=r"gradguard\.noise-amplitud names no .*did you mean 'gradguard\.noise-amplitude'"):
        guard_config({"gradguard.noise-amplitud": 0.3})
    with pytest.raises(ValueError, match="did you mean 'smooth'"):  # values are checked like any GuardConfig's
        guard_config({"gradguard.noise-kind": "smoth"})
    with pytest.raises(ValueError, match="node-config 'gradguard-seed="):  # the run's submitter must not know it
        guard_config({"gradguard.seed": 1})


def test_client_reply_is_global_plus_the_guarded_round_delta_and_state_carries_over():
    sent, context = initial_arrays(), node(0, RUN, seed=11)
    reply = tiny_app()(train_message(sent, 1), context)
    assert not reply.has_error(), reply.error

    # The reference: the same round through guarded_round directly, without Flower.
    model = TinyNet()
    model.load_state_dict(sent.to_torch_state_dict())
    reference = guarded_round(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              lambda m, o, g: tiny_train(m, o, g, context), config=guard_config(RUN).with_(seed=11),
                              client_id="partition-0", round=0)
    arrays = reply.content["arrays"]
    assert list(arrays.keys()) == list(sent.keys())
    for name, value in arrays.items():
        expected = sent[name].numpy() + (reference.update.tensors[name].numpy() if name in reference.update.tensors
                                         else 0)
        np.testing.assert_array_equal(value.numpy(), expected.astype(sent[name].dtype), err_msg=name)
    assert not np.array_equal(arrays["fc.weight"].numpy(), sent["fc.weight"].numpy())
    assert dict(reply.content["metrics"]) == {"train-loss": 1.5, "num-examples": 8}
    record = reply.content["gradguard"]
    assert (record["defense"], record["round"], record["num-steps"], record["client-id"]) == \
        ("gradguard", 0, 2, "partition-0")
    assert "seed" not in json.loads(record["config"])  # the noise seed never leaves the node

    # Round 2 picks the masks up from Context.state: with them the update differs from a fresh guard's.
    second = tiny_app()(train_message(arrays, 2), context)
    fresh = tiny_app()(train_message(arrays, 2), node(0, RUN, seed=11))
    assert not second.has_error() and not fresh.has_error()
    assert second.content["gradguard"]["round"] == 1
    assert not np.array_equal(second.content["arrays"]["fc.weight"].numpy(),
                              fresh.content["arrays"]["fc.weight"].numpy())


def test_update_exponent_takes_the_round_size_from_dataset_size_fn():
    run = {**RUN, "gradguard.update-exponent": 0.5}
    sent, context = initial_arrays(), node(0, run, seed=11)
    app = guarded_client_app(tiny_train, model_fn=lambda context: TinyNet(),
                             optimizer_fn=lambda model, context: torch.optim.SGD(model.parameters(), lr=0.1),
                             dataset_size_fn=lambda context: len(IMAGES))
    reply = app(train_message(sent, 1), context)
    assert not reply.has_error(), reply.error
    model = TinyNet()
    model.load_state_dict(sent.to_torch_state_dict())
    reference = guarded_round(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              lambda m, o, g: tiny_train(m, o, g, context), config=guard_config(run).with_(seed=11),
                              client_id="partition-0", round=0, dataset_size=len(IMAGES))
    expected = sent["fc.weight"].numpy() + reference.update.tensors["fc.weight"].numpy()
    np.testing.assert_array_equal(reply.content["arrays"]["fc.weight"].numpy(), expected)
    with pytest.raises(ValueError, match="dataset_size"):  # the rule needs N: a clear error, no silent default
        guarded_round(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      lambda m, o, g: tiny_train(m, o, g, context), config=guard_config(run).with_(seed=11),
                      client_id="partition-0", round=0)


def test_without_a_configured_seed_each_node_keeps_its_own_secret_seed():
    contexts = [node(0, RUN), node(1, RUN)]
    for context in contexts:
        assert not tiny_app()(train_message(initial_arrays(), 1), context).has_error()
    seeds = [context.state["gradguard"]["seed"] for context in contexts]
    assert seeds[0] != seeds[1]
    assert not tiny_app()(train_message(initial_arrays(), 2), contexts[0]).has_error()
    assert contexts[0].state["gradguard"]["seed"] == seeds[0]


def replying_app(content) -> ClientApp:
    """A ClientApp without GradGuard whose train reply is content(sent arrays), behind gradguard_mod."""
    app = ClientApp(mods=[gradguard_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(RecordDict(content(msg.content["arrays"])), reply_to=msg)

    return app


def test_mod_withholds_unprotected_and_malformed_updates():
    sent, metrics = initial_arrays(), MetricRecord({"num-examples": 8})
    guarded = tiny_app(mods=[gradguard_mod])(train_message(sent, 1), node(0, RUN))
    assert not guarded.has_error(), guarded.error
    marker = guarded.content["gradguard"]

    def poisoned(arrays: ArrayRecord) -> dict:
        broken = ArrayRecord(dict(guarded.content["arrays"].items()))
        broken["fc.bias"] = Array(np.full(2, np.nan, dtype=np.float32))
        return {"arrays": broken, "metrics": metrics, "gradguard": marker}

    cases = {
        "not a GradGuard-protected update": lambda arrays: {"arrays": arrays, "metrics": metrics},
        "'fc.bias' has NaN": poisoned,
        "missing ['fc.bias']": lambda arrays: {"arrays": ArrayRecord({k: v for k, v in arrays.items()
                                                                      if k != "fc.bias"}),
                                               "metrics": metrics, "gradguard": marker},
    }
    for reason, content in cases.items():
        withheld = replying_app(content)(train_message(sent, 1), node(0, RUN))
        assert withheld.has_error() and reason in withheld.error.reason, reason


class _Recorded(FedAvg):
    """FedAvg that sends nothing (messages need a Flower runtime); aggregation is FedAvg's own."""

    def configure_train(self, server_round, arrays, config, grid):
        return []


def test_strategy_aggregates_only_wellformed_protected_replies():
    sent = initial_arrays()
    good = [tiny_app()(train_message(sent, 1, node_id=n), node(n, RUN)) for n in (1, 2)]
    good[1].content["metrics"]["num-examples"] = 24  # FedAvg weights 8 : 24

    def reply(n: int, arrays: ArrayRecord, protected: bool = True) -> Message:
        content = {"arrays": arrays, "metrics": MetricRecord({"num-examples": 8})}
        if protected:
            content["gradguard"] = good[0].content["gradguard"]
        return Message(RecordDict(content), reply_to=train_message(sent, 1, node_id=n))

    wrong_shape = ArrayRecord({**dict(sent.items()), "fc.bias": Array(np.zeros(3, np.float32))})
    bad = [reply(3, wrong_shape), reply(4, sent, protected=False)]
    strategy = GradGuardStrategy(_Recorded(min_available_nodes=1, min_train_nodes=1))
    assert list(strategy.configure_train(1, sent, ConfigRecord(), grid=None)) == []
    arrays, metrics = strategy.aggregate_train(1, good + bad)

    for name in sent.keys():  # the two good replies, weighted 8 : 24; the bad ones left out
        a, b = (g.content["arrays"][name].numpy() for g in good)
        expected = a * 0.25 + b * 0.75
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=0, atol=4 * EPS32 * np.abs(expected).max(),
                                   err_msg=name)
    assert metrics["train-loss"] == pytest.approx(1.5)
    with pytest.raises(RuntimeError, match="without configure_train"):
        strategy.aggregate_train(2, good)


# ---------------------------------------------------------------- end to end
def _run_config(overrides: list[str]) -> dict:
    """The run config Flower gives the apps: pyproject defaults fused with the overrides."""
    return dict(get_fused_config_from_dir(APP_DIR, parse_config_args(overrides)))


def _our_aggregator(run: dict, tmp_path: Path) -> tuple[list[dict[str, torch.Tensor]], list[list[dict]]]:
    """The example's clients over GradGuard's gRPC aggregator: every round's global model and
    every client's delta, with the example's training function and guarded_round."""
    sys.path.insert(0, str(APP_DIR))
    try:
        from gradguard_flower_app import task
    finally:
        sys.path.remove(str(APP_DIR))
    contexts = [node(i, run, seed=NODE_SEED) for i in range(int(run["min-nodes"]))]
    ids = [node_client_id(c) for c in contexts]
    tokens = generate_tokens(ids)
    config = AggregatorConfig(min_clients=len(ids), round_deadline_s=None, fsync=False)
    with AggregatorServer(task.initial_state(int(run["seed"])), state_dir=tmp_path / "aggregator", clients=tokens,
                          config=config) as server:
        clients = [AggregatorClient(server.address, client_id=cid, token=tokens[cid]) for cid in ids]
        for client in clients:
            client.join()
        globals_, deltas, states = [server.global_state()], [], [None] * len(ids)
        for r in range(int(run["num-server-rounds"])):
            deltas.append([])
            for i, (context, client) in enumerate(zip(contexts, clients)):
                round_index, state = client.fetch_global()
                model = task.build_model(context)
                model.load_state_dict(state)
                result = guarded_round(model, task.build_optimizer(model, context),
                                       lambda m, o, g, context=context: task.train(m, o, g, context),
                                       config=guard_config(run).with_(seed=NODE_SEED),
                                       client_id=ids[i], round=round_index, state=states[i])
                states[i] = result.state
                client.submit(result.update)
                deltas[-1].append(result.update.tensors)
            server.wait_for_round(r + 1, timeout_s=60)
            globals_.append(server.global_state())
        for client in clients:
            client.close()
    return globals_, deltas


@pytest.mark.slow
def test_flower_example_matches_our_grpc_aggregator(tmp_path):
    try:
        load_medmnist("pneumoniamnist", "train", size=32)
    except DatasetError as err:
        pytest.fail(f"the example trains on the shared PneumoniaMNIST file (set GRADGUARD_SHARED): {err}")
    log = tmp_path / "flower.log"
    with log.open("w") as out:  # --node-seed: reproducible noise, the same on both sides
        done = subprocess.run([sys.executable, str(APP_DIR / "run_local.py"), "--out-dir", str(tmp_path / "flower"),
                               "--workdir", str(tmp_path / "federation"), "--node-seed", str(NODE_SEED),
                               "--timeout", "420"], stdout=out, stderr=subprocess.STDOUT, timeout=480)
    assert done.returncode == 0, f"the Flower example failed:\n{log.read_text()[-6000:]}"

    ours, deltas = _our_aggregator(_run_config(["min-nodes=3"]), tmp_path)
    flower = [load_file(str(tmp_path / "flower" / f"round-{r}.safetensors")) for r in range(len(ours))]
    assert len(ours) == 3
    for r, (f, o) in enumerate(zip(flower, ours)):
        assert f.keys() == o.keys()
        for name in o:
            if not o[name].is_floating_point():  # integer buffers are not averaged: the global's value stays
                assert torch.equal(f[name], o[name]), (r, name)
    for name in ours[0]:
        assert torch.equal(flower[0][name], ours[0][name]), name
    # Round 1 starts from the same model with the same clients, so the clients' deltas are the
    # same; only the aggregation's rounding differs: Flower averages weights, sum_i w_i (g + d_i),
    # ours adds the averaged delta, g + sum_i w_i d_i. Both are float32 sums of n terms, each
    # within (n + 2) / 2 units of roundoff of g + sum_i w_i d_i (u = eps / 2), per element.
    n = len(deltas[0])
    for name, g in ours[0].items():
        if g.is_floating_point():
            scale = g.abs() + torch.stack([d[name].abs() for d in deltas[0]]).amax(0)
            gap = (flower[1][name].double() - ours[1][name].double()).abs()
            assert bool((gap <= (n + 2) * EPS32 * scale).all()), (name, gap.max().item())
    # Round 2 starts from globals that differ by that rounding (about one ulp); local training
    # carries the difference on, and the masks' rank equalisation and top-fraction threshold can
    # turn a near-tie the other way. The order in which Flower receives the replies changes the
    # rounding, so the gap takes one of a few values: measured 4.0e-5 and 2.4e-4 of the largest
    # change the round made (torch 2.14, 2 cores). A logic error moves the model by a sizeable
    # fraction of that change (measured: a client that loses its masks and shadow between rounds
    # 1.2%, another noise seed 10%), so 1e-3 separates them.
    floats = [name for name in ours[0] if ours[0][name].is_floating_point()]
    step = max((ours[2][k] - ours[1][k]).abs().max().item() for k in floats)
    gap = max((flower[2][k].double() - ours[2][k].double()).abs().max().item() for k in floats)
    assert gap <= 1e-3 * step, (gap, step)
