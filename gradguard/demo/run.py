"""The demo's main job, stage by stage: data, the federation (or, offline, a local warm-up),
GradGuard's maps, the attack on one update under each defense, the report."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from gradguard.demo.comparison import compare_defenses
from gradguard.demo.config import DemoConfig
from gradguard.demo.data import DemoData, find_data
from gradguard.demo.federation import GuardedClient, run_federation
from gradguard.demo.report import DemoResult, write_report
from gradguard.eval.attacks import build_attack
from gradguard.eval.bench import evaluate
from gradguard.eval.defenses import Defense, GradGuardDefense, build_defense
from gradguard.eval.metrics import LPIPSMetric
from gradguard.eval.models import SmallCNN
from gradguard.eval.partition import ClientLayout, partition_clients

Echo = Callable[[str], None]
PNEUMONIA_CLASSES = ("normal", "pneumonia")


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


def _defenses(config: DemoConfig, client: GuardedClient) -> dict[str, tuple[str, Defense]]:
    guarded = GradGuardDefense()
    # The client's own guard, with the masks and the shadow it built during training: the
    # update attacked is the one this client would really share.
    guarded.guards[client.client_id] = client.guard
    return {
        "none": ("no defense", build_defense("none")),
        "gradguard": ("GradGuard (default preset)", guarded),
        "dpsgd": (f"Opacus DP-SGD (σ={config.dpsgd_noise_multiplier:g}, C={config.dpsgd_max_grad_norm:g})",
                  build_defense("dpsgd", noise_multiplier=config.dpsgd_noise_multiplier,
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

    if data.test is not None:  # data.federated
        with stage("train", f"federation: {config.clients} GradGuard clients, {config.rounds} rounds over gRPC"):
            layout = ClientLayout(batch_sizes=(config.batch_size,) * config.clients,
                                  dataset_sizes=(config.images_per_client,) * config.clients)
            specs = partition_clients(data.train.labels, layout=layout, seed=config.seed)
            federation = run_federation(data.train, specs, model=model, rounds=config.rounds, lr=config.lr,
                                        local_epochs=config.local_epochs, seed=config.seed,
                                        progress=config.progress)
            model.load_state_dict(federation.global_state)
            client = federation.clients[0]
            client.model.load_state_dict(federation.global_state)  # its maps are the final global model's
            metrics = {**evaluate(model, data.test, device=device), "test_images": len(data.test)}
            bytes_sent = sum(c.bytes_sent for c in federation.clients)
            echo(f"      global model: test accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    else:
        with stage("train", f"GradGuard warms up locally on the shipped images ({config.rounds} rounds)"):
            client = GuardedClient("client1", data.train.images, data.train.labels, model=model,
                                   batch_size=min(config.batch_size, len(data.train)), lr=config.lr,
                                   local_epochs=config.local_epochs, rounds=config.rounds, seed=config.seed)
            for round_index in range(config.rounds):
                client.train_round(round_index)  # nothing is shared: no aggregator offline
            metrics, bytes_sent = None, 0

    count = min(config.figure_images, len(client.images))
    figure_images, figure_labels = client.images[:count], client.labels[:count]
    explanation = client.guard.explain(figure_images, figure_labels)
    client.guard.cleanup()
    global_state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    captions = _captions(data, client, count)

    with stage("attack", f"Inverting Gradients on {captions[0]}: no defense, GradGuard, DP-SGD"):
        lpips_metric, lpips_source = _lpips(device)
        attack = build_attack("inverting_gradients", iterations=config.attack_iterations, restarts=1,
                              seed=config.seed, device=str(device), progress=config.progress)
        outcomes = compare_defenses(_defenses(config, client), model=model, image=figure_images[0],
                                    label=figure_labels[0], num_classes=data.train.num_classes, attack=attack,
                                    round=config.rounds, total_rounds=config.rounds, client_id=client.client_id,
                                    lpips_metric=lpips_metric,
                                    # The test split stands in for the attacker's own data: no client holds it.
                                    prior=data.test.images if data.test is not None else None)

    with stage("report", f"writing the report into {out}/"):
        result = DemoResult(config=config, data_source=data.source, fallback_reason=data.fallback_reason,
                            device=str(device), utility=metrics, explanation=explanation,
                            figure_images=figure_images, figure_captions=captions, victim_caption=captions[0],
                            outcomes=outcomes, lpips_source=lpips_source, global_state=global_state,
                            bytes_sent=bytes_sent, seconds=seconds)
        page = write_report(result, out)
    return result, page
