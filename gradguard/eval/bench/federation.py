"""FedAvg over the client layout with a defense producing every client's update; test utility."""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from gradguard.batchnorm import reestimate_batchnorm, tracked_batchnorms
from gradguard.eval.bench.cache import Layout, _atomic, _read_json
from gradguard.eval.bench.spec import BenchConfig, Spec
from gradguard.eval.datasets import ImageSet, load_medmnist
from gradguard.eval.defenses import DEFENSES, GuardedDefense, build_defense
from gradguard.eval.metrics import utility
from gradguard.eval.models import build_model
from gradguard.eval.partition import ClientSpec, partition_clients
from gradguard.progress import progress_bar
from gradguard.transport.aggregation import weighted_mean
from gradguard.update import ProtectedUpdate

# A model whose test accuracy is within this of the majority class's share, or that predicts
# one class for at least _CONSTANT_SHARE of the test images, has collapsed.
_COLLAPSE_MARGIN = 0.005
_CONSTANT_SHARE = 0.95

@dataclass
class Data:
    """A dataset's splits, loaded once per benchmark.

    ``prior`` (the validation split, disjoint from every client's data and from the test split)
    is the attacker's own data: learned attacks fit on it, and its mean image is the reference
    an attacker reaches without any update."""

    train: ImageSet
    test: ImageSet
    prior: ImageSet

    @classmethod
    def load(cls, name: str, size: int) -> "Data":
        """A MedMNIST name (a file in the data directory), or the path of any ``.npz`` file in the
        MedMNIST layout (``train/val/test_images`` grey [N, H, W] or RGB [N, H, W, 3], and labels)."""
        path = Path(name)
        root = path.parent if path.suffix == ".npz" else None
        stem = path.stem if root is not None else name
        return cls(*(load_medmnist(stem, split, size=size, root=root) for split in ("train", "test", "val")))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def _model(config: BenchConfig, data: Data, defense: Spec) -> nn.Module:
    """The global model of ``defense``'s federation (the defense may swap layers it cannot train)."""
    model = build_model(config.model, in_channels=data.train.channels, num_classes=data.train.num_classes,
                        width=config.width if config.model != "resnet18" else None, image_size=config.image_size)
    return DEFENSES[defense.name].prepare_model(model, **defense.params)


def attacked_clients(config: BenchConfig, clients: Sequence[ClientSpec]) -> list[str]:
    """The ids of the clients whose updates are attacked (see :class:`BenchConfig`)."""
    ids = [c.client_id for c in clients]
    if config.clients is not None:
        unknown = [c for c in config.clients if c not in ids]
        if unknown:
            raise ValueError(f"clients {unknown} are not in the layout; its clients are {ids}")
        return list(config.clients)
    # Ties go to the later client: the layout's single-image client is its last one, while a
    # small scale also shrinks earlier clients to one image.
    smallest = min(reversed(clients), key=len)
    batched = [c for c in clients if c.batch_size > 1 and c is not smallest]
    return [smallest.client_id] + ([min(batched, key=len).client_id] if batched else [])


def fedavg(global_state: Mapping[str, Tensor], updates: Sequence[ProtectedUpdate]) -> dict[str, Tensor]:
    """FedAvg's step: ``global_state`` plus the mean of the updates' deltas weighted by their
    ``num_samples``, by the aggregator's own rule (:func:`gradguard.transport.aggregation.weighted_mean`,
    float64); entries no update carries (integer buffers) stay."""
    if not updates or any(u.kind != "delta" for u in updates):
        raise ValueError("FedAvg needs at least one update, and only weight deltas (kind='delta')")
    weights = [u.num_samples for u in updates]
    result = dict(global_state)
    for name, value in global_state.items():
        if name in updates[0].tensors:
            rows = np.stack([u.tensors[name].detach().cpu().double().reshape(-1).numpy() for u in updates])
            mean = torch.from_numpy(weighted_mean(rows, weights)).view(value.shape)
            result[name] = (value.double() + mean).to(value.dtype)
    return result


def _client_batches(data: ImageSet, client: ClientSpec, *, seed: int, round_: int, index: int
                    ) -> tuple[list[tuple[Tensor, Tensor]], list[str]]:
    """One local epoch: the client's images shuffled (seeded by run, round and client), batched."""
    order = np.random.default_rng([seed, round_, index]).permutation(np.asarray(client.indices))
    batches = [(data.images[chunk], data.labels[chunk])
               for chunk in (torch.from_numpy(order[i:i + client.batch_size])
                             for i in range(0, len(order), client.batch_size))]
    return batches, [f"{data.name}:{i}" for i in order]


def _defense(spec: Spec, seed: int):
    """A fresh defense (its per-client state belongs to one run), seeded by the run's seed."""
    params = dict(spec.params)
    cls = DEFENSES[spec.name]
    if "seed" not in params and (issubclass(cls, GuardedDefense) or "seed" in inspect.signature(cls).parameters):
        params["seed"] = seed
    return build_defense(spec.name, **params)


def defense_settings(spec: Spec) -> Any:
    """What ``spec``'s defense resolves to now (:attr:`Defense.settings`), as a run records it."""
    return _recorded(_defense(spec, 0).settings)


def _recorded(settings: Any) -> Any:
    return json.loads(json.dumps(settings))  # as JSON reads it back: tuples become lists


def cached_run(path: Path, settings: Any) -> dict[str, Any] | None:
    """The run cached at ``path`` if its defense resolved to ``settings`` (:func:`defense_settings`)
    when it was trained; None when there is none or it is stale (trained before a default changed)."""
    if not path.is_file():
        return None
    run = _read_json(path)
    return run if run.get("defense_settings") == settings else None


@torch.no_grad()
def evaluate(model: nn.Module, test: ImageSet, *, device: torch.device, chunk: int = 256) -> dict[str, Any]:
    """Test-split utility of the global model, with a collapse check (a model at the majority class has collapsed)."""
    model.eval()
    preds = torch.cat([model(test.images[i:i + chunk].to(device)).argmax(1).cpu()
                       for i in range(0, len(test), chunk)])
    scores = utility(test.labels, preds, test.num_classes)
    majority = float(torch.bincount(test.labels, minlength=test.num_classes).max()) / len(test)
    constant = float(torch.bincount(preds, minlength=test.num_classes).max()) / len(test)
    collapsed = scores["accuracy"] <= majority + _COLLAPSE_MARGIN or constant >= _CONSTANT_SHARE
    return {**scores, "majority_accuracy": majority, "collapsed": bool(collapsed)}


def train_run(config: BenchConfig, data: Data, spec: Spec, seed: int, layout: Layout, *,
              capture: bool) -> dict[str, Any]:
    """FedAvg with ``spec``'s defense; the run's record (utility, epsilon, seconds).

    With ``capture``, the attacked clients' updates of the capture rounds are saved with the
    round's global model and the clients' images (one file per round, written atomically)."""
    device = torch.device(config.device)
    torch.manual_seed(seed)
    model = _model(config, data, spec).to(device)
    defense = _defense(spec, seed)
    clients = partition_clients(data.train.labels, scale=config.scale, distribution=config.distribution,
                                alpha=config.alpha, seed=seed)
    attacked = set(attacked_clients(config, clients)) if capture else set()
    start = time.perf_counter()
    rounds = progress_bar(range(1, config.rounds + 1), desc=f"  train {spec.label} seed {seed}", leave=False,
                          enabled=config.progress)
    for round_ in rounds:
        global_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        updates = []
        for index, client in enumerate(clients):
            batches, ids = _client_batches(data.train, client, seed=seed, round_=round_, index=index)
            updates.append(defense.local_update(model, batches, lr=config.round_lr(round_), round=round_,
                                                total_rounds=config.rounds, client_id=client.client_id,
                                                sample_ids=ids))
        kept = {u.client_id: u for u in updates if u.client_id in attacked and round_ in config.rounds_attacked}
        if kept:
            _save_capture(layout.capture(data.train.name, spec, round_, seed=seed), global_state, kept, data.train,
                          clients)
        model.load_state_dict(fedavg(global_state, updates))
    seconds = time.perf_counter() - start
    epsilon = defense.epsilon(delta=defense.delta) if defense.delta is not None else None
    if epsilon is not None and not math.isfinite(epsilon):
        epsilon = None  # sigma = 0: no guarantee; JSON has no infinity, so a delta without epsilon means unbounded
    # The same global model with BatchNorm statistics of the server's public images, disjoint from
    # every client's: what a server does when no client shares clean statistics.
    reestimated = reestimate_batchnorm(model, data.prior.images, device=device) if tracked_batchnorms(model) else None
    return {"dataset": data.train.name, "defense": spec.label, "defense_name": spec.name,
            "defense_params": dict(spec.params), "defense_settings": _recorded(defense.settings), "seed": seed,
            "rounds": config.rounds, **evaluate(model, data.test, device=device), "epsilon": epsilon,
            "delta": defense.delta, "seconds": seconds,
            "bn_public": None if reestimated is None else evaluate(reestimated, data.test, device=device),
            "noise_history": defense.noise_history if isinstance(defense, GuardedDefense) else None}


def _save_capture(path: Path, global_state: dict[str, Tensor], updates: dict[str, ProtectedUpdate],
                  train: ImageSet, clients: Sequence[ClientSpec]) -> None:
    by_id = {c.client_id: c for c in clients}
    record = {"global": global_state,
              "updates": {cid: dataclasses.asdict(u) for cid, u in updates.items()},
              "images": {cid: train.images[list(by_id[cid].indices)].clone() for cid in updates},
              "labels": {cid: train.labels[list(by_id[cid].indices)].clone() for cid in updates}}
    _atomic(path, lambda tmp: torch.save(record, tmp))

