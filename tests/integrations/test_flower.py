"""GradGuard on Flower in process: the mod, the strategy wrapper, the run config (the example end to
end is in test_flower_example.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord,
                      RecordDict)
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

from gradguard import GradGuardWarning, GuardConfig
from gradguard.integrations.flower import (GradGuardStrategy, current_guard, gradguard_mod, guard_config,
                                           guarded_round, protected_arrays)

EPS32 = float(np.finfo(np.float32).eps)


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


def tiny_app(mods=(gradguard_mod,), wrap: bool = True) -> ClientApp:
    """A ClientApp whose train handler runs tiny_train on current_guard().wrap(...), as the example's does."""
    app = ClientApp()

    @app.train(mods=list(mods))
    def train(msg: Message, context: Context) -> Message:
        model = TinyNet()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        if wrap:
            model, optimizer = current_guard().wrap(model, optimizer)
        metrics = tiny_train(model, optimizer, None, context)
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    return app


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
    leakage = reference.update.leakage  # calibrated noise, the default: the update's own estimate
    assert leakage is not None
    assert dict(reply.content["metrics"]) == {
        "train-loss": 1.5, "num-examples": 8, "gradguard-steps": 2,
        # The amplitude the calibration chose, not the fixed rule's scheduled w_t.
        "gradguard-noise-amplitude": pytest.approx(leakage.amplitude_max),
        "gradguard-leakage-psnr-max": pytest.approx(leakage.psnr_above_prior_max),
        "gradguard-leakage-psnr-mean": pytest.approx(leakage.psnr_above_prior_mean),
        "gradguard-leakage-ssim-max": pytest.approx(leakage.ssim_above_prior_max),
        "gradguard-leakage-target": GuardConfig().calibration.leakage_target_db,
        "gradguard-leakage-met": 1.0}
    record = reply.content["gradguard"]
    assert (record["defense"], record["round"], record["num-steps"], record["client-id"]) == \
        ("gradguard", 0, 2, "partition-0")
    assert "seed" not in json.loads(record["config"])  # the noise seed never leaves the node


def test_the_fixed_rules_masks_carry_over_between_rounds_and_its_amplitude_is_reported():
    run = {**RUN, "gradguard.preset": "targeted"}
    sent, context = initial_arrays(), node(0, run, seed=11)
    reply = tiny_app()(train_message(sent, 1), context)
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert metrics["gradguard-noise-amplitude"] == pytest.approx(GuardConfig.preset("targeted").noise_amplitude)
    assert not any(key.startswith("gradguard-leakage-") for key in metrics)  # no estimate without calibration

    # Round 2 picks the masks up from Context.state: with them the update differs from a fresh guard's.
    arrays = reply.content["arrays"]
    second = tiny_app()(train_message(arrays, 2), context)
    fresh = tiny_app()(train_message(arrays, 2), node(0, run, seed=11))
    assert not second.has_error() and not fresh.has_error()
    assert second.content["gradguard"]["round"] == 1
    assert not np.array_equal(second.content["arrays"]["fc.weight"].numpy(),
                              fresh.content["arrays"]["fc.weight"].numpy())


def test_without_a_configured_seed_each_node_keeps_its_own_secret_seed():
    contexts = [node(0, RUN), node(1, RUN)]
    for context in contexts:
        assert not tiny_app()(train_message(initial_arrays(), 1), context).has_error()
    seeds = [context.state["gradguard"]["seed"] for context in contexts]
    assert seeds[0] != seeds[1]
    assert not tiny_app()(train_message(initial_arrays(), 2), contexts[0]).has_error()
    assert contexts[0].state["gradguard"]["seed"] == seeds[0]


def test_mod_refuses_a_handler_that_did_not_train_through_the_guard():
    reply = tiny_app(wrap=False)(train_message(initial_arrays(), 1), node(0, RUN))
    assert reply.has_error() and "current_guard().wrap(model, optimizer)" in reply.error.reason


def test_legacy_positional_arrays_map_to_the_models_names():
    sent = initial_arrays()
    model = TinyNet()
    model.load_state_dict(sent.to_torch_state_dict())
    result = guarded_round(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           lambda m, o, g: tiny_train(m, o, g, None), config=guard_config(RUN).with_(seed=3),
                           client_id="c", round=0)
    positional = ArrayRecord([a.numpy() for a in sent.values()])  # legacy Parameters: keys "0", "1", ...
    out = protected_arrays(result.update, positional, names=list(sent.keys()))
    for key, name in zip(out.keys(), sent.keys(), strict=True):
        np.testing.assert_array_equal(out[key].numpy(), sent[name].numpy() + result.update.tensors[name].numpy()
                                      if name in result.update.tensors else sent[name].numpy())


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


def test_strategy_keeps_each_clients_leakage_report():
    # Every sample is noised under the malicious server: a non-zero amplitude. 8x8 images need
    # more than the default target's noise allows (see the next test).
    run = {**RUN, "gradguard.threat": "malicious_server", "gradguard.leakage-target-db": 6.0}
    sent = initial_arrays()
    replies = [tiny_app()(train_message(sent, 1, node_id=n), node(n, run, seed=n)) for n in (1, 2)]
    strategy = GradGuardStrategy(_Recorded(min_available_nodes=1, min_train_nodes=1))
    strategy.configure_train(1, sent, ConfigRecord(), grid=None)
    strategy.aggregate_train(1, replies)

    # Each client's numbers are its own update's: the same round run without Flower, same seed.
    for n, row in zip((1, 2), strategy.client_metrics, strict=True):
        model = TinyNet()
        model.load_state_dict(sent.to_torch_state_dict())
        leakage = guarded_round(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                lambda m, o, g: tiny_train(m, o, g, None), config=guard_config(run).with_(seed=n),
                                client_id=f"partition-{n}", round=0).update.leakage
        assert leakage is not None and leakage.noised_samples == 8 and leakage.amplitude_max > 0
        assert (row["round"], row["stage"], row["node-id"]) == (1, "train", n)
        assert row["gradguard-noise-amplitude"] == pytest.approx(leakage.amplitude_max)
        assert row["gradguard-leakage-psnr-max"] == pytest.approx(leakage.psnr_above_prior_max)
        assert row["gradguard-leakage-psnr-mean"] == pytest.approx(leakage.psnr_above_prior_mean)
        assert row["gradguard-leakage-ssim-max"] == pytest.approx(leakage.ssim_above_prior_max)
        assert row["gradguard-leakage-target"] == leakage.target_db
        assert row["gradguard-leakage-met"] == float(leakage.met)




def test_a_missed_leakage_target_is_reported_as_such():
    run = {**RUN, "gradguard.threat": "malicious_server", "gradguard.max-amplitude": 0.01}
    with pytest.warns(GradGuardWarning, match="flagged"):  # the default flags the update
        flagged = tiny_app()(train_message(initial_arrays(), 1), node(0, run))
    assert not flagged.has_error()
    assert next(iter(flagged.content.metric_records.values()))["gradguard-leakage-met"] == 0.0
    reply = tiny_app()(train_message(initial_arrays(), 1), node(0, {**run, "gradguard.on-target-missed": "raise"}))
    assert reply.has_error()
    assert "withheld the update" in reply.error.reason and "max_amplitude=0.01" in reply.error.reason
    assert "did not train through the guard" not in reply.error.reason
