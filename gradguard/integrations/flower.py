"""GradGuard on Flower: a ClientApp that shares only protected updates, and checks on updates.

Flower (``pip install "gradguard[flower]"``; written against flwr 1.41's Message API) runs
federations beyond one machine. Three pieces plug GradGuard into it::

    # client_app.py: the user's unchanged loop runs on the wrapped model
    app = guarded_client_app(train, model_fn=build_model, optimizer_fn=build_optimizer,
                             mods=[gradguard_mod])
    # server_app.py: any Flower strategy, wrapped
    strategy = GradGuardStrategy(FedAvg(fraction_evaluate=0.0))

- :func:`guarded_client_app` builds a ``flwr.clientapp.ClientApp`` whose ``@app.train()``
  handler loads the global ``ArrayRecord``, wraps the model with :class:`~gradguard.GradGuard`,
  runs the user's training function and replies with ``global + protected delta``: Flower's
  strategies (FedAvg averages weights) and mods (``fixedclipping_mod`` clips ``reply - sent``)
  expect model weights, so the FedAvg step is the same as our aggregator's ``global + mean delta``.
- :func:`gradguard_mod` is a client mod in the style of ``fixedclipping_mod``: a train reply
  leaves the node only if it is a well-formed GradGuard update of the model it was sent.
- :class:`GradGuardStrategy` wraps a strategy the way Flower's DP wrappers do
  (``DifferentialPrivacyServerSideFixedClipping(strategy, ...)``) and drops, with a logged
  reason, every reply that is malformed or not GradGuard-protected before aggregation.

A guard's masks and shadow persist across rounds in ``Context.state``, which Flower keeps on
the node ("never leave the system it's running from", ``flwr.app.Context``): in the deployment
engine each message runs in a fresh ClientApp process, so in-memory state would be lost.
"""
from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from logging import ERROR, INFO, WARNING
from typing import Any, cast

import numpy as np
import safetensors.torch
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from gradguard.config import FLAT_FIELDS, GROUPS, GuardConfig, derive_seed, suggestion
from gradguard.errors import ConfigError
from gradguard.guard import GradGuard
from gradguard.update import ProtectedUpdate

REPLY_KEY = "gradguard"
"""Name of the ConfigRecord in a train reply that describes the protected update."""
STATE_KEY = "gradguard"
"""Name of the ConfigRecord in ``Context.state`` that holds the guard between rounds."""
NODE_SEED_KEY = "gradguard-seed"
"""Node config key that fixes a SuperNode's noise seed (reproducible experiments only)."""
WEIGHT_KEY = "num-examples"
"""The MetricRecord entry FedAvg weights replies by (``FedAvg(weighted_by_key=...)``'s default)."""
_CONFIG_PREFIX = "gradguard."

TrainStep = Callable[[nn.Module, torch.optim.Optimizer, GradGuard], Mapping[str, float] | None]
"""``train(model, optimizer, guard) -> metrics``: one round of the user's local loop on the
wrapped pair. ``guard`` is there for optional calls such as ``guard.set_sample_ids``."""
TrainFn = Callable[[nn.Module, torch.optim.Optimizer, GradGuard, Context], Mapping[str, float] | None]
"""A :data:`TrainStep` that also gets the node's Flower ``Context`` (its data partition, run config)."""
ModelFn = Callable[[Context], nn.Module]
"""Builds the model's architecture on the node's device; the global weights are loaded into it."""
OptimizerFn = Callable[[nn.Module, Context], torch.optim.Optimizer]


def guard_config(run_config: Mapping[str, Any], *, base: GuardConfig | None = None) -> GuardConfig:
    """The run's GuardConfig: ``base`` (default: ``GuardConfig()``) changed by the run config.

    Keys ``gradguard.<field>`` set GuardConfig fields (all but the seed, which is the node's),
    dashes for underscores: ``gradguard.noise-amplitude = 0.2`` in the app's ``pyproject.toml``
    (``[tool.flwr.app.config]``), then ``flwr run --run-config "gradguard.noise-amplitude=0.3"``
    (Flower overrides only keys the app declares). ``gradguard.preset`` starts from a named
    preset instead of ``base``. ``total_rounds`` defaults to ``num-server-rounds``, so the noise
    schedules span the run.
    """
    changes = {key[len(_CONFIG_PREFIX):].replace("-", "_"): value
               for key, value in run_config.items() if key.startswith(_CONFIG_PREFIX)}
    if "seed" in changes:
        raise ValueError(f"{_CONFIG_PREFIX}seed cannot be set by the run: whoever submits the run would know the "
                         "noise and could redraw it. The seed is each node's secret; for reproducible experiments "
                         f"start the SuperNode with --node-config '{NODE_SEED_KEY}=<int>'")
    preset = changes.pop("preset", None)
    valid = sorted({*FLAT_FIELDS, *(f.name for f in fields(GuardConfig) if f.name not in GROUPS)} - {"seed"})
    unknown = sorted(set(changes) - set(valid))
    if unknown:
        keys = [_CONFIG_PREFIX + k.replace("_", "-") for k in valid]
        bad = _CONFIG_PREFIX + unknown[0].replace("_", "-")
        raise ConfigError(f"run config key {bad} names no GuardConfig field{suggestion(bad, keys)}; valid: {keys}")
    config = GuardConfig.preset(str(preset)) if preset is not None else (base or GuardConfig())
    if "total_rounds" not in changes and "num-server-rounds" in run_config:
        changes["total_rounds"] = int(run_config["num-server-rounds"])
    return config.with_(**changes)


def node_client_id(context: Context) -> str:
    """The client's name in updates and seeds: the node config's ``client-id``, else its
    ``partition-id`` (stable across restarts), else the SuperNode's id."""
    node = context.node_config
    if "client-id" in node:
        return str(node["client-id"])
    if "partition-id" in node:
        return f"partition-{node['partition-id']}"
    return f"node-{context.node_id}"


def _save_guard(guard: GradGuard) -> bytes:
    """The guard's state (masks, shadow, steps) as safetensors bytes: tensors only, nothing to unpickle."""
    return safetensors.torch.save(guard.state_dict())


def _restore_guard(guard: GradGuard, state: bytes) -> None:
    guard.load_state_dict(safetensors.torch.load(state))


@dataclass(frozen=True)
class GuardedRound:
    """One client's round: the update to share, the guard's state for the next round, and the
    metrics the training function returned."""

    update: ProtectedUpdate
    state: bytes
    metrics: dict[str, float]


def guarded_round(model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainStep, *, config: GuardConfig,
                  client_id: str, round: int, state: bytes | None = None,
                  dataset_size: int | None = None) -> GuardedRound:
    """Train ``model`` (holding the global weights) for one round under GradGuard.

    This is the ClientApp's training step without Flower around it (the equality test runs it
    over our own gRPC aggregator). ``state`` is the previous round's :attr:`GuardedRound.state`
    (None in a client's first round): masks and shadow carry over, the noise seed is derived
    from ``config.seed``, ``client_id`` and ``round`` so every client and round draws fresh,
    reproducible noise. ``dataset_size``, the images the round trains on, is needed by
    ``config.update_exponent``.
    """
    if config.update_kind != "delta":
        raise ValueError("Flower strategies average model weights, so a Flower client shares weight deltas; "
                         "use GuardConfig(update_kind='delta')")
    if config.dp_noise_multiplier is not None:
        raise ValueError("GradGuard's hybrid DP is not available on Flower yet (it needs wrap(data_loader=...) to "
                         "sample as its accountant assumes, and the training function owns the loader); for an "
                         "(epsilon, delta) guarantee on the update "
                         "add Flower's DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod, or set "
                         "dp_noise_multiplier=None")
    # Fresh noise per client and round; no seed means the guard draws a secret one.
    seed = None if config.seed is None else derive_seed(config.seed, client_id, round)
    guard = GradGuard(config.with_(seed=seed), client_id=client_id)
    if state is not None:
        _restore_guard(guard, state)
    guard.begin_round(round)
    train_model, train_optimizer = guard.wrap(model, optimizer, dataset_size=dataset_size)
    try:
        metrics = train(train_model, train_optimizer, guard) or {}
        update = guard.protected_update()
    finally:
        guard.cleanup()
    return GuardedRound(update=update, state=_save_guard(guard), metrics={k: float(v) for k, v in metrics.items()})


def protected_arrays(update: ProtectedUpdate, sent: ArrayRecord) -> ArrayRecord:
    """``sent + delta`` for every array the update carries, ``sent`` for the others (integer
    buffers such as BatchNorm's step count), in ``sent``'s order and dtypes."""
    unknown = sorted(set(update.tensors) - set(sent.keys()))
    if unknown:
        raise KeyError(f"the update carries tensors the server did not send: {unknown[:5]}")
    out = ArrayRecord()
    for name, array in sent.items():
        value = array.numpy()
        delta = update.tensors.get(name)
        out[name] = Array(value if delta is None else value + delta.numpy().astype(value.dtype, copy=False))
    return out


def _update_record(update: ProtectedUpdate) -> ConfigRecord:
    # The server may audit the settings, but never the noise seed: with it, it could redraw the noise.
    config = json.loads(update.metadata.get("config", "{}"))
    config.pop("seed", None)
    return ConfigRecord({"defense": update.metadata.get("defense", ""), "client-id": update.client_id,
                         "round": update.round, "num-steps": update.num_steps,
                         "config": json.dumps(config, sort_keys=True)})


def _single_arrays(content: RecordDict) -> ArrayRecord:
    records = list(content.array_records.values())
    if len(records) != 1:
        raise ValueError(f"a train message must carry exactly one ArrayRecord (the global model), got {len(records)}")
    return records[0]


def guarded_client_app(train_fn: TrainFn, *, model_fn: ModelFn, optimizer_fn: OptimizerFn,
                       config: GuardConfig | None = None, mods: Sequence[Mod] = (),
                       dataset_size_fn: Callable[[Context], int] | None = None) -> ClientApp:
    """A ClientApp whose train handler runs ``train_fn`` on a GradGuard-wrapped model.

    Per train message: ``model_fn(context)`` builds the model, the global weights are loaded
    (strictly), ``optimizer_fn(model, context)`` builds the optimizer, then
    :func:`guarded_round` runs ``train_fn(model, optimizer, guard, context)``. The reply holds
    the protected weights under the key the server used, a MetricRecord with
    ``num-examples`` (distinct samples trained on, FedAvg's weight) and ``train_fn``'s metrics,
    and a ``gradguard`` ConfigRecord describing the update (settings without the seed).
    ``config`` is the base of :func:`guard_config` (the run config can change it). The noise
    seed is the node's secret, drawn once and kept in ``Context.state``, unless the SuperNode
    was started with ``--node-config 'gradguard-seed=<int>'`` (reproducible experiments only:
    whoever knows the seed can redraw the noise). Register evaluation on the returned
    app with ``@app.evaluate()`` as usual; ``mods`` apply to every handler, e.g.
    ``[gradguard_mod, fixedclipping_mod]`` (the first is the outermost). ``dataset_size_fn(context)``
    gives the number of images a round trains on, for ``update_exponent``.
    """
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        sent = _single_arrays(msg.content)
        model = model_fn(context)
        model.load_state_dict(sent.to_torch_state_dict())
        optimizer = optimizer_fn(model, context)
        # cast: a record value may be any ConfigRecordValues (lists too); these keys hold what the server
        # sends ("server-round": an int) and what this handler stored (an int seed, bytes of state)
        round_config = next(iter(msg.content.config_records.values()), ConfigRecord())
        server_round = int(cast(int, round_config.get("server-round", 1)))
        stored = context.state.config_records.get(STATE_KEY)
        # The noise seed is the node's: fixed by its operator, or a secret drawn once, since noise
        # that the server could regenerate would hide nothing.
        if NODE_SEED_KEY in context.node_config:
            seed = int(context.node_config[NODE_SEED_KEY])
        else:
            seed = int(cast(int, stored["seed"])) if stored is not None else secrets.randbits(31)
        settings = guard_config(context.run_config, base=config).with_(seed=seed)
        result = guarded_round(
            model, optimizer, lambda m, o, g: train_fn(m, o, g, context), config=settings,
            client_id=node_client_id(context),
            round=server_round - 1,  # Flower counts rounds from 1, GradGuard's schedules from 0
            state=cast(bytes, stored["state"]) if stored is not None else None,
            dataset_size=dataset_size_fn(context) if dataset_size_fn is not None else None)
        context.state[STATE_KEY] = ConfigRecord({"seed": seed, "state": result.state})  # seed is settings.seed
        array_key = next(iter(msg.content.array_records))
        return Message(RecordDict({
            array_key: protected_arrays(result.update, sent),
            "metrics": MetricRecord({**result.metrics, WEIGHT_KEY: result.update.num_samples}),
            REPLY_KEY: _update_record(result.update),
        }), reply_to=msg)

    return app


def update_problem(reply: RecordDict, sent: ArrayRecord, *, require_protected: bool = True) -> str | None:
    """Why a train reply's ``content`` must not be aggregated against the ``sent`` global
    model, or None: one ArrayRecord with the same names, dtypes and shapes as ``sent``, finite
    values, and (``require_protected``) GradGuard's ConfigRecord. The marker catches a node that
    runs an unprotected ClientApp by mistake; it cannot stop a node that lies."""
    if len(reply.array_records) != 1:
        return f"it carries {len(reply.array_records)} ArrayRecords; a train reply carries one (the model)"
    arrays = next(iter(reply.array_records.values()))
    if list(arrays.keys()) != list(sent.keys()):
        missing, extra = sorted(set(sent.keys()) - set(arrays.keys())), sorted(set(arrays.keys()) - set(sent.keys()))
        return (f"its arrays are not the global model's (missing {missing[:5]}, unexpected {extra[:5]}, or another "
                "order); reply with the arrays the server sent")
    for name, array in arrays.items():
        want = sent[name]
        if array.dtype != want.dtype or tuple(array.shape) != tuple(want.shape):
            return (f"array {name!r} is {array.dtype}{list(array.shape)}, the global model's is "
                    f"{want.dtype}{list(want.shape)}; the update must come from the same architecture")
        values = array.numpy()
        if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
            return f"array {name!r} has NaN or infinite values (lower the learning rate or clip gradients)"
    marker = reply.config_records.get(REPLY_KEY)
    if require_protected and (marker is None or marker.get("defense") != "gradguard"):
        return ("it is not a GradGuard-protected update (no 'gradguard' ConfigRecord); build the ClientApp with "
                "gradguard.integrations.flower.guarded_client_app")
    return None


def gradguard_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: a train reply leaves the node only if :func:`update_problem` finds nothing;
    otherwise the server gets an error reply (MOD_FAILED_PRECONDITION) that says why. Other
    message types pass through. Put it first in ``mods`` so it sees what really leaves."""
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return call_next(msg, ctxt)
    try:
        sent = _single_arrays(msg.content)
    except ValueError as err:
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"gradguard_mod: {err}"), reply_to=msg)
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    problem = update_problem(reply.content, sent)
    if problem is None:
        return reply
    log(ERROR, "gradguard_mod withheld the update: %s", problem)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION,
                         reason=f"gradguard_mod withheld the update: {problem}"), reply_to=msg)


class GradGuardStrategy(Strategy):
    """Strategy wrapper: only well-formed (and, with ``require_protected``, GradGuard-protected)
    train replies reach ``strategy``'s aggregation; each dropped reply is logged with its node
    and the reason, so a bad client can neither crash the ServerApp nor slip in unprotected."""

    def __init__(self, strategy: Strategy, *, require_protected: bool = True) -> None:
        super().__init__()
        self.strategy = strategy
        self.require_protected = require_protected
        self._sent: dict[int, ArrayRecord] = {}

    def __repr__(self) -> str:
        return f"GradGuardStrategy({self.strategy!r}, require_protected={self.require_protected})"

    def summary(self) -> None:
        log(INFO, "\t├──> GradGuard: drops malformed%s train replies",
            " and unprotected" if self.require_protected else "")
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = {server_round: arrays}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        sent = self._sent.get(server_round)
        if sent is None:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train({server_round}): "
                               "GradGuardStrategy needs the global model it sent to check the replies")
        kept = []
        for reply in replies:
            problem = None if reply.has_error() else update_problem(reply.content, sent,
                                                                      require_protected=self.require_protected)
            if problem is None:
                kept.append(reply)
            else:
                log(WARNING, "round %d: dropped the update of node %d: %s", server_round, reply.metadata.src_node_id,
                    problem)
        return self.strategy.aggregate_train(server_round, kept)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
