"""The demo's main job, stage by stage: data, the federation (or, offline, a local warm-up),
GradGuard's maps, the attack on one update under each defense, the report."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradguard.demo.comparison import compare_defenses, score_prior
from gradguard.demo.config import DemoConfig
from gradguard.demo.data import DemoData, find_data
from gradguard.demo.federation import DPSGD_DELTA, GuardedClient, make_clients, run_federation
from gradguard.demo.report import DemoResult, write_report
from gradguard.eval.attacks import build_attack
from gradguard.eval.bench import evaluate
from gradguard.eval.defenses import DPSGD, Defense, GuardedDefense, build_defense
from gradguard.eval.metrics import LPIPSMetric
from gradguard.eval.models import SmallCNN
from gradguard.eval.partition import ClientLayout, partition_clients

Echo = Callable[[str], None]
PNEUMONIA_CLASSES = ("normal", "pneumonia")
DEFENSES = ("none", "gradguard", "dpsgd")  # the report's rows, in this order


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use --device cpu or auto")
    return device


def _lpips(device: torch.device) -> tuple[LPIPSMetric | None, str]:
    try:
        metric = LPIPSMetric(device=device)
    except OSError as err:  # no local AlexNet weights and no network: report PSNR and SSIM only
        return None, f"unavailable ({err})"
    return metric, metric.backbone_source


def _captions(data: DemoData, client: GuardedClient, count: int) -> list[str]:
    if data.captions is not None:
        return list(data.captions[:count])
    names = PNEUMONIA_CLASSES if data.train.name == "pneumoniamnist" else None
    return [f"{client.client_id} image {i}, {names[int(y)] if names else f'class {int(y)}'}"
            for i, y in enumerate(client.labels[:count])]


def _labels(config: DemoConfig) -> dict[str, str]:
    return {"none": "no defense", "gradguard": f"GradGuard ({config.preset} preset)",
            "dpsgd": f"Opacus DP-SGD (σ={config.dpsgd_noise_multiplier:g}, C={config.dpsgd_max_grad_norm:g})"}


def _defenses(config: DemoConfig, client: GuardedClient) -> dict[str, tuple[str, Defense]]:
    # Every preset is a registered defense of that name, but for "default", which is "gradguard".
    guarded = build_defense("gradguard" if config.preset == "default" else config.preset)
    assert isinstance(guarded, GuardedDefense)
    # The client's own guard, with the masks and the shadow it built during training: the
    # update attacked is the one this client would really share.
    guarded.guards[client.client_id] = client.guard
    labels = _labels(config)
    return {
        "none": (labels["none"], build_defense("none")),
        "gradguard": (labels["gradguard"], guarded),
        "dpsgd": (labels["dpsgd"], build_defense("dpsgd", noise_multiplier=config.dpsgd_noise_multiplier,
                                                 max_grad_norm=config.dpsgd_max_grad_norm, seed=config.seed)),
    }


def run_demo(config: DemoConfig, out: Path, *, echo: Echo = print) -> tuple[DemoResult, Path]:
    """Run the whole demo and write its report into ``out``; returns the result and index.html's path."""
    seconds: dict[str, float] = {}

    @contextmanager
    def stage(name: str, text: str) -> Iterator[None]:
        echo(f"[{len(seconds) + 1}/4] {text}")
        start = time.perf_counter()
        yield
        seconds[name] = time.perf_counter() - start

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    with stage("data", f"looking for {config.dataset}"):
        data = find_data(dataset=config.dataset, size=config.image_size, download=config.download)
        model = SmallCNN(data.train.channels, data.train.num_classes, width=config.model_width).to(device)
        if data.federated:
            echo(f"      {data.source}")
        else:
            echo(f"      NO MEDMNIST DATA: {data.fallback_reason}.\n"
                 f"      Running only the attack part, on {len(data.train)} real medical images shipped inside "
                 f"PyPI wheels. For the federation, put {config.dataset}.npz in $GRADGUARD_DATA or "
                 "pip install medmnist (online).")

    utility: dict[str, dict[str, Any]] | None = None
    global_states: dict[str, dict[str, torch.Tensor]] = {}
    client: GuardedClient  # the attacked client: client 1 of the GradGuard federation
    if data.test is not None:  # data.federated
        with stage("train", f"federations of {config.clients} clients, {config.rounds} rounds over gRPC each: "
                            "no defense, GradGuard, DP-SGD"):
            layout = ClientLayout(batch_sizes=(config.batch_size,) * config.clients,
                                  dataset_sizes=(config.images_per_client,) * config.clients)
            specs = partition_clients(data.train.labels, layout=layout, seed=config.seed)
            utility, bytes_sent = {}, 0
            labels = _labels(config)
            initial = copy.deepcopy(model)
            for defense in DEFENSES:
                # Every federation starts from the same initial model; DP-SGD's swaps BatchNorm for GroupNorm.
                trained: nn.Module = copy.deepcopy(initial)
                trained = DPSGD.prepare_model(trained) if defense == "dpsgd" else trained
                clients = make_clients(defense, data.train, specs, model=trained, config=config)
                federation = run_federation(clients, model=trained, rounds=config.rounds, progress=config.progress,
                                            desc=f"{defense} rounds")
                trained.load_state_dict(federation.global_state)
                epsilons = [e for c in federation.clients if (e := c.epsilon()) is not None]
                utility[defense] = {**evaluate(trained, data.test, device=device), "test_images": len(data.test),
                                    "epsilon": max(epsilons) if epsilons else None,
                                    "delta": DPSGD_DELTA if epsilons else None}
                global_states[defense] = {name: t.detach().cpu() for name, t in trained.state_dict().items()}
                echo(f"      {labels[defense]}: test accuracy {utility[defense]['accuracy']:.3f}, "
                     f"macro-F1 {utility[defense]['macro_f1']:.3f}")
                if defense == "gradguard":  # the attacked federation
                    model.load_state_dict(federation.global_state)
                    guarded = federation.clients[0]
                    assert isinstance(guarded, GuardedClient)
                    client = guarded
                    client.model.load_state_dict(federation.global_state)  # its maps are the final global model's
                    bytes_sent = sum(c.bytes_sent for c in federation.clients)
    else:
        with stage("train", f"GradGuard warms up locally on the shipped images ({config.rounds} rounds)"):
            client = GuardedClient("client1", data.train.images, data.train.labels, model=model,
                                   batch_size=min(config.batch_size, len(data.train)), lr=config.lr,
                                   local_epochs=config.local_epochs, seed=config.seed, rounds=config.rounds,
                                   preset=config.preset, probe_steps=config.probe_steps)
            for round_index in range(config.rounds):
                client.train_round(round_index)  # nothing is shared: no aggregator offline
            bytes_sent = 0
            global_states["gradguard"] = {name: t.detach().cpu() for name, t in model.state_dict().items()}

    count = min(config.figure_images, len(client.images))
    figure_images, figure_labels = client.images[:count], client.labels[:count]
    explanation = client.guard.explain(figure_images, figure_labels)
    client.guard.cleanup()
    captions = _captions(data, client, count)

    with stage("attack", f"Inverting Gradients on {captions[0]}: no defense, GradGuard, DP-SGD"):
        lpips_metric, lpips_source = _lpips(device)
        attack = build_attack("inverting_gradients", iterations=config.attack_iterations, restarts=1,
                              seed=config.seed, device=str(device), progress=config.progress)
        prior = None if data.public is None else score_prior(data.public, figure_images[0], figure_labels[0],
                                                             lpips_metric)
        outcomes = compare_defenses(_defenses(config, client), model=model, image=figure_images[0],
                                    label=figure_labels[0], num_classes=data.train.num_classes, attack=attack,
                                    round=config.rounds, total_rounds=config.rounds, client_id=client.client_id,
                                    lpips_metric=lpips_metric, prior=prior,
                                    public=data.public.images if data.public is not None else None)

    with stage("report", f"writing the report into {out}/"):
        result = DemoResult(config=config, data_source=data.source, fallback_reason=data.fallback_reason,
                            device=str(device), utility=utility, explanation=explanation,
                            figure_images=figure_images, figure_captions=captions, victim_caption=captions[0],
                            outcomes=outcomes, prior=prior, lpips_source=lpips_source, global_states=global_states,
                            bytes_sent=bytes_sent, seconds=seconds)
        page = write_report(result, out)
    return result, page
