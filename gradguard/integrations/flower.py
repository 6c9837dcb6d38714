"""GradGuard on Flower: a client mod that trains a handler under GradGuard, and checks on updates.

Flower (``pip install "gradguard[flower]"``; written against flwr 1.42's Message API) runs
federations beyond one machine. GradGuard plugs into a ClientApp as a mod, the way Flower's
``fixedclipping_mod`` and ``secaggplus_mod`` do::

    app = ClientApp()

    @app.train(mods=[gradguard_mod])
    def train(msg: Message, context: Context) -> Message:
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model, optimizer = current_guard().wrap(model, optimizer)
        ...  # the ordinary loop
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)

    # server_app.py: any Flower strategy, wrapped
    strategy = GradGuardStrategy(FedAvg(fraction_evaluate=1.0))

- :func:`gradguard_mod` restores the node's guard, lends it to the handler as
  :func:`current_guard`, and replaces the reply's arrays by ``global + protected delta``:
  Flower's strategies (FedAvg averages weights) and mods (``fixedclipping_mod`` clips
  ``reply - sent``, ``secaggplus_mod`` masks the reply) expect model weights.
- :class:`GradGuardStrategy` wraps a strategy the way Flower's DP wrappers do
  (``DifferentialPrivacyServerSideFixedClipping(strategy, ...)``), drops, with a logged reason,
  every reply that is malformed or not GradGuard-protected before aggregation, and keeps every
  client's train and evaluate metrics per round (:attr:`GradGuardStrategy.client_metrics`).
- :func:`guarded_round` is the mod's training step without Flower.

A guard's masks and shadow persist across rounds in ``Context.state``, which Flower keeps on
the node ("never leave the system it's running from", ``flwr.app.Context``): in the deployment
engine each message runs in a fresh ClientApp process, so in-memory state would be lost.
"""
from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, fields
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
import safetensors.torch
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from gradguard.config import FLAT_FIELDS, GROUPS, GuardConfig, derive_seed, suggestion
from gradguard.errors import ConfigError, GradGuardError
from gradguard.guard import GradGuard
from gradguard.update import LeakageEstimate, ProtectedUpdate

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


def _new_guard(config: GuardConfig, *, client_id: str, round: int, state: bytes | None) -> GradGuard:
    # Fresh noise per client and round; no seed means the guard draws a secret one.
    seed = None if config.seed is None else derive_seed(config.seed, client_id, round)
    guard = GradGuard(config.with_(seed=seed), client_id=client_id)
    if state is not None:
        _restore_guard(guard, state)
    guard.begin_round(round)
    return guard


def _check_flower_config(config: GuardConfig) -> None:
    if config.update_kind != "delta":
        raise ValueError("Flower strategies average model weights, so a Flower client shares weight deltas; "
                         "use GuardConfig(update_kind='delta')")
    if config.dp_noise_multiplier is not None:
        raise ValueError("GradGuard's hybrid DP is not available on Flower yet (it needs wrap(data_loader=...) to "
                         "sample as its accountant assumes, and the training function owns the loader); for an "
                         "(epsilon, delta) guarantee on the update "
                         "add Flower's DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod, or set "
                         "dp_noise_multiplier=None")


def guarded_round(model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainStep, *, config: GuardConfig,
                  client_id: str, round: int, state: bytes | None = None,
                  dataset_size: int | None = None) -> GuardedRound:
    """Train ``model`` (holding the global weights) for one round under GradGuard.

    This is what :func:`gradguard_mod` does around a train handler, without Flower around it.
    ``state`` is the previous round's :attr:`GuardedRound.state` (None in a client's first
    round): masks and shadow carry over, the noise seed is derived from ``config.seed``,
    ``client_id`` and ``round`` so every client and round draws fresh, reproducible noise.
    ``dataset_size``, the images the round trains on, is needed by ``config.update_exponent``.
    """
    _check_flower_config(config)
    guard = _new_guard(config, client_id=client_id, round=round, state=state)
    train_model, train_optimizer = guard.wrap(model, optimizer, dataset_size=dataset_size)
    try:
        metrics = train(train_model, train_optimizer, guard) or {}
        update = guard.protected_update()
    finally:
        guard.cleanup()
    return GuardedRound(update=update, state=_save_guard(guard), metrics={k: float(v) for k, v in metrics.items()})


def protected_arrays(update: ProtectedUpdate, sent: ArrayRecord, names: Sequence[str] | None = None) -> ArrayRecord:
    """``sent + delta`` for every array the update carries, ``sent`` for the others (integer
    buffers such as BatchNorm's step count), in ``sent``'s order and dtypes.

    ``names`` are the model's state-dict names in order, for a ``sent`` record whose keys are
    positions ("0", "1", ...: Flower's legacy ``Parameters``, which SecAgg+ uses)."""
    keys = list(sent.keys())
    if names is not None and keys != list(names):
        if len(keys) != len(names):
            raise KeyError(f"the server sent {len(keys)} arrays, the model has {len(names)} state-dict entries; "
                           "send the model's full state_dict")
        by_key = dict(zip(keys, names, strict=True))
    else:
        by_key = {key: key for key in keys}
    unknown = sorted(set(update.tensors) - set(by_key.values()))
    if unknown:
        raise KeyError(f"the update carries tensors the server did not send: {unknown[:5]}")
    out = ArrayRecord()
    for key, array in sent.items():
        value = array.numpy()
        delta = update.tensors.get(by_key[key])
        out[key] = Array(value if delta is None else value + delta.numpy().astype(value.dtype, copy=False))
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


_ACTIVE: ContextVar[GradGuard | None] = ContextVar("gradguard_active_guard", default=None)


def current_guard() -> GradGuard:
    """The guard of the train message being handled, inside a handler registered with
    ``@app.train(mods=[gradguard_mod])``: wrap the model and optimizer with it, as without Flower::

        model, optimizer = current_guard().wrap(model, optimizer)
    """
    guard = _ACTIVE.get()
    if guard is None:
        raise RuntimeError("no GradGuard for this message: register the train handler with "
                           "@app.train(mods=[gradguard_mod]) and call current_guard() inside it")
    return guard


def _stored_state(stored: ConfigRecord | None) -> bytes | None:
    state = None if stored is None else stored.get("state")
    if state is not None and not isinstance(state, bytes):
        raise TypeError(f"Context.state[{STATE_KEY!r}]['state'] holds {type(state).__name__}, not the guard's "
                        "safetensors bytes; another component wrote that record: give it another name")
    return state


def _server_round(msg: Message) -> int:
    # Message-API strategies put "server-round" in the config; Flower's legacy workflows (SecAgg+)
    # send the round as the message's group id.
    for record in msg.content.config_records.values():
        if "server-round" in record:
            return int(str(record["server-round"]))
    if msg.metadata.group_id.isdigit():
        return int(msg.metadata.group_id)
    raise ValueError("the train message names no round (no 'server-round' config, no numeric group id)")


def _failed(msg: Message, reason: str) -> Message:
    log(ERROR, "gradguard_mod: %s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"gradguard_mod: {reason}"), reply_to=msg)


def gradguard_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Client mod that runs a train handler under GradGuard: ``@app.train(mods=[gradguard_mod])``.

    Per train message it restores the node's guard from ``Context.state`` (masks, shadow,
    secret seed), makes it :func:`current_guard` for the handler, which trains on
    ``current_guard().wrap(model, optimizer)``, and then replaces the reply's arrays by
    ``sent + protected delta``: what leaves the node is GradGuard's update, whatever the
    handler put there. The reply's MetricRecord gets ``num-examples`` (if the handler set
    none), ``gradguard-noise-amplitude`` (the largest amplitude chosen under calibrated noise,
    else this round's w_t), ``gradguard-steps`` and, under calibrated noise, the update's
    leakage report (:func:`leakage_metrics`: ``gradguard-leakage-psnr-max``, ``-psnr-mean``,
    ``-ssim-max``, ``-target``, ``-met``); a ``gradguard`` ConfigRecord describes the update
    (settings without the seed). Settings come from the run config (:func:`guard_config`).
    The noise seed is the node's secret, unless the SuperNode was started with
    ``--node-config 'gradguard-seed=<int>'`` (reproducible experiments only). A reply that is
    malformed or non-finite, or a handler that never trained through the guard, becomes an
    error reply that says why. Messages other than train pass through. With SecAgg+, list
    ``secaggplus_mod`` first so that it masks the protected update.
    """
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return call_next(msg, ctxt)
    try:
        sent = _single_arrays(msg.content)
        server_round = _server_round(msg)
        stored = ctxt.state.config_records.get(STATE_KEY)
        # The noise seed is the node's: fixed by its operator, or a secret drawn once, since noise
        # that the server could regenerate would hide nothing.
        if NODE_SEED_KEY in ctxt.node_config:
            seed = int(str(ctxt.node_config[NODE_SEED_KEY]))
        else:
            seed = int(str(stored["seed"])) if stored is not None else secrets.randbits(31)
        settings = guard_config(ctxt.run_config).with_(seed=seed)
        _check_flower_config(settings)
    except (ValueError, ConfigError) as err:
        return _failed(msg, str(err))
    guard = _new_guard(settings, client_id=node_client_id(ctxt),
                       round=server_round - 1,  # Flower counts rounds from 1, GradGuard's schedules from 0
                       state=_stored_state(stored))
    token = _ACTIVE.set(guard)
    try:
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        amplitude, model = guard.noise_amplitude, guard.model
        try:
            update = guard.protected_update()
        except GradGuardError as err:  # e.g. a missed leakage target: the guard's message says the fix
            return _failed(msg, f"withheld the update: {err}")
        except RuntimeError as err:
            return _failed(msg, f"the train handler did not train through the guard ({err}); wrap with "
                                "model, optimizer = current_guard().wrap(model, optimizer)")
    finally:
        _ACTIVE.reset(token)
        guard.cleanup()
    ctxt.state[STATE_KEY] = ConfigRecord({"seed": seed, "state": _save_guard(guard)})
    content = reply.content
    try:
        array_key = next(iter(content.array_records)) if len(content.array_records) == 1 else None
        if array_key is None:
            raise ValueError(f"the reply carries {len(content.array_records)} ArrayRecords; reply with one, "
                             "the trained model")
        assert model is not None  # protected_update succeeded, so the handler wrapped a model
        content[array_key] = protected_arrays(update, sent, names=list(model.state_dict()))
    except (KeyError, ValueError) as err:
        return _failed(msg, f"withheld the update: {err}")
    problem = update_problem(content, sent, require_protected=False)
    if problem is not None:
        return _failed(msg, f"withheld the update: {problem}")
    metrics = next(iter(content.metric_records.values()), None)
    if metrics is None:
        content["metrics"] = MetricRecord()
        metrics = content.metric_records["metrics"]
    metrics.setdefault(WEIGHT_KEY, update.num_samples)
    # Under calibrated noise the scheduled w_t is not what was applied: each sample got its own
    # amplitude, and the largest is what the leakage report names.
    metrics["gradguard-noise-amplitude"] = float(amplitude if update.leakage is None else update.leakage.amplitude_max)
    metrics["gradguard-steps"] = update.num_steps
    if update.leakage is not None:
        metrics.update(leakage_metrics(update.leakage))
    content[REPLY_KEY] = _update_record(update)
    return reply


def leakage_metrics(leakage: LeakageEstimate) -> dict[str, float]:
    """The leakage report as MetricRecord entries (numbers only; ``met`` as 0 or 1). An SSIM that
    was not computed (volumes) is left out rather than sent as NaN, which would poison the
    strategy's averages."""
    metrics = {"gradguard-leakage-psnr-max": leakage.psnr_above_prior_max,
               "gradguard-leakage-psnr-mean": leakage.psnr_above_prior_mean,
               "gradguard-leakage-ssim-max": leakage.ssim_above_prior_max,
               "gradguard-leakage-target": leakage.target_db,
               "gradguard-leakage-met": float(leakage.met)}
    return {key: value for key, value in metrics.items() if not math.isnan(value)}


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
        # Compared as numpy arrays: Flower's legacy Parameters (SecAgg+) carry no dtype or shape in the record.
        values, want = array.numpy(), sent[name].numpy()
        if values.dtype != want.dtype or values.shape != want.shape:
            return (f"array {name!r} is {values.dtype}{list(values.shape)}, the global model's is "
                    f"{want.dtype}{list(want.shape)}; the update must come from the same architecture")
        if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
            return f"array {name!r} has NaN or infinite values (lower the learning rate or clip gradients)"
    marker = reply.config_records.get(REPLY_KEY)
    if require_protected and (marker is None or marker.get("defense") != "gradguard"):
        return ("it is not a GradGuard-protected update (no 'gradguard' ConfigRecord); register the train handler "
                "with @app.train(mods=[gradguard_mod])")
    return None


class GradGuardStrategy(Strategy):
    """Strategy wrapper: only well-formed (and, with ``require_protected``, GradGuard-protected)
    train replies reach ``strategy``'s aggregation; each dropped reply is logged with its node
    and the reason, so a bad client can neither crash the ServerApp nor slip in unprotected.

    :attr:`client_metrics` keeps what every client reported, per round and stage: one dict per
    reply with ``round``, ``stage`` ("train" or "evaluate"), ``node-id`` and the reply's
    metrics (``num-examples``, ``gradguard-noise-amplitude``, ``gradguard-leakage-psnr-max``,
    ...), which the strategy's own aggregation averages away."""

    def __init__(self, strategy: Strategy, *, require_protected: bool = True) -> None:
        super().__init__()
        self.strategy = strategy
        self.require_protected = require_protected
        self._sent: dict[int, ArrayRecord] = {}
        self.client_metrics: list[dict[str, int | float | str]] = []

    def _record(self, server_round: int, stage: str, replies: list[Message]) -> None:
        for reply in replies:
            for record in reply.content.metric_records.values():
                row: dict[str, int | float | str] = {"round": server_round, "stage": stage,
                                                     "node-id": reply.metadata.src_node_id}
                row.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
                self.client_metrics.append(row)
                log(INFO, "round %d %s, node %d: %s", server_round, stage, reply.metadata.src_node_id,
                    ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, (int, float))))

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
        self._record(server_round, "train", kept)
        return self.strategy.aggregate_train(server_round, kept)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._record(server_round, "evaluate", [reply for reply in replies if not reply.has_error()])
        return self.strategy.aggregate_evaluate(server_round, replies)
