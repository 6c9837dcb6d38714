"""The federations: an in-process aggregator on loopback and the clients as threads.

Each client is what a hospital would run: every round it loads the global model fetched over
gRPC, runs its ordinary local loop (Adam, a seeded shuffling loader) and submits its update.
A GradGuard client wraps its model once with the guard (the two lines) and submits
``guard.protected_update()``; the baselines of the comparison, no defense and Opacus DP-SGD,
run the same loop and differ only in what they do to their update. Only updates leave a client.
"""
from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradguard import GradGuard, GuardConfig, ProtectedUpdate
from gradguard.config import derive_seed
from gradguard.demo.config import DemoConfig
from gradguard.eval.datasets import ImageSet
from gradguard.eval.defenses import local_sgd
from gradguard.eval.defenses.base import BatchHook
from gradguard.eval.defenses.dpsgd import private_optimizer
from gradguard.eval.partition import ClientSpec
from gradguard.progress import progress_bar
from gradguard.transport import AggregatorClient, AggregatorConfig, AggregatorServer, generate_tokens
from gradguard.update import snapshot, weight_delta

DPSGD_DELTA = 1e-5  # the delta of DP-SGD's (epsilon, delta), as in gradguard.eval.defenses.DPSGD


class Client:
    """One hospital without a defense: its images, ``local_epochs`` epochs of Adam per round (its
    moments stay on the client across rounds), and the weight delta of the round as its update.

    Every seed derives from ``seed`` and the client's id, so each federation of the comparison
    shuffles the same client's images in the same order.
    """

    def __init__(self, client_id: str, images: Tensor, labels: Tensor, *, model: nn.Module, batch_size: int,
                 lr: float, local_epochs: int, seed: int) -> None:
        self.client_id, self.images, self.labels = client_id, images, labels
        self.lr, self.local_epochs, self.seed = lr, local_epochs, seed
        self.loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(derive_seed(seed, client_id, "loader")))
        self.model: nn.Module = model
        self.optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.bytes_sent = 0

    def train_round(self, round_index: int, global_state: dict[str, Tensor] | None = None) -> ProtectedUpdate:
        """Load ``global_state`` (if given), train locally and return the update to share."""
        if global_state is not None:
            self.model.load_state_dict(global_state)
        return self._round(round_index)

    def _epochs(self, *, after_backward: BatchHook | None = None) -> None:
        for _ in range(self.local_epochs):  # the ordinary loop
            local_sgd(self.model, list(self.loader), lr=self.lr, optimizer=self.optimizer,
                      after_backward=after_backward)

    def _round(self, round_index: int) -> ProtectedUpdate:
        before = snapshot(self.model)
        self.model.train()
        self._epochs()
        return self._delta(before, round_index)

    def _delta(self, before: dict[str, Tensor], round_index: int) -> ProtectedUpdate:
        epsilon = self.epsilon()
        return ProtectedUpdate(tensors=weight_delta(before, self.model), kind="delta", num_samples=len(self.images),
                               num_steps=self.local_epochs * len(self.loader), round=round_index,
                               client_id=self.client_id, batch_size=self.loader.batch_size, learning_rate=self.lr,
                               epsilon=epsilon, delta=None if epsilon is None else DPSGD_DELTA)

    def epsilon(self) -> float | None:
        """The client's (epsilon, DPSGD_DELTA) guarantee over all its rounds so far; None without DP."""
        return None

    def run(self, address: str, token: str, rounds: int) -> "Client":
        """Take part in ``rounds`` rounds of the aggregator at ``address``."""
        with AggregatorClient(address, client_id=self.client_id, token=token) as client:
            client.join()
            for _ in range(rounds):
                round_index, state = client.fetch_global()
                update = self.train_round(round_index, state)
                client.submit(update)
                self.bytes_sent += update.num_bytes()
                client.wait_for_round(round_index + 1, poll_s=0.05)
        return self


class GuardedClient(Client):
    """A GradGuard client: the model wrapped once by a guard of ``preset`` whose schedules span
    ``rounds``. Its noise seed is derived from ``seed``: a deployment leaves GuardConfig's seed
    unset (a secret one per guard), but the demo is an experiment that must rerun identically."""

    def __init__(self, client_id: str, images: Tensor, labels: Tensor, *, model: nn.Module, batch_size: int,
                 lr: float, local_epochs: int, seed: int, rounds: int, preset: str, probe_steps: int) -> None:
        super().__init__(client_id, images, labels, model=model, batch_size=batch_size, lr=lr,
                         local_epochs=local_epochs, seed=seed)
        config = GuardConfig.preset(preset, total_rounds=rounds, seed=derive_seed(seed, client_id, "guard"),
                                    probe_steps=probe_steps)
        self.guard = GradGuard(config, client_id=client_id)
        # dataset_size: the presets that spend their noise on updates covering few images need it.
        self.model, self.optimizer = self.guard.wrap(self.model, self.optimizer, dataset_size=len(images))

    def _round(self, round_index: int) -> ProtectedUpdate:
        self.guard.begin_round(round_index)
        self.model.train()
        self._epochs()
        return self.guard.protected_update()


class DPSGDClient(Client):
    """An Opacus DP-SGD client: the same Adam loop with per-sample clipping and Gaussian noise,
    one accountant over all its steps. The model must be per-sample ready (no BatchNorm:
    :func:`gradguard.per_sample.per_sample_ready`); it trains in eval mode, which per-sample
    gradients need and which changes nothing in a model without BatchNorm or dropout."""

    def __init__(self, client_id: str, images: Tensor, labels: Tensor, *, model: nn.Module, batch_size: int,
                 lr: float, local_epochs: int, seed: int, noise_multiplier: float, max_grad_norm: float) -> None:
        from opacus.accountants import RDPAccountant

        super().__init__(client_id, images, labels, model=model, batch_size=batch_size, lr=lr,
                         local_epochs=local_epochs, seed=seed)
        self.accountant = RDPAccountant()
        device = next(model.parameters()).device  # Opacus draws the noise where the gradients are
        noise = torch.Generator(device=device).manual_seed(derive_seed(seed, client_id, "dpsgd"))
        self.optimizer, self._attach = private_optimizer(
            self.model, self.optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            batch_size=batch_size, sample_rate=batch_size / len(images), accountant=self.accountant, generator=noise)

    def _round(self, round_index: int) -> ProtectedUpdate:
        before = snapshot(self.model)
        self.model.eval()
        self._epochs(after_backward=self._attach)
        return self._delta(before, round_index)

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(delta=DPSGD_DELTA))


def make_clients(defense: str, data: ImageSet, specs: Sequence[ClientSpec], *, model: nn.Module,
                 config: DemoConfig) -> list[Client]:
    """The clients of ``defense``'s federation ("none", "gradguard" or "dpsgd"), each on a copy of
    ``model`` (for DP-SGD, already per-sample ready) and ``data``'s images ``specs[i].indices``."""
    clients: list[Client] = []
    for spec in specs:
        common: dict[str, Any] = dict(images=data.images[list(spec.indices)], labels=data.labels[list(spec.indices)],
                      model=copy.deepcopy(model), batch_size=spec.batch_size, lr=config.lr,
                      local_epochs=config.local_epochs, seed=config.seed)
        if defense == "gradguard":
            clients.append(GuardedClient(spec.client_id, **common, rounds=config.rounds, preset=config.preset,
                                         probe_steps=config.probe_steps))
        elif defense == "dpsgd":
            clients.append(DPSGDClient(spec.client_id, **common, noise_multiplier=config.dpsgd_noise_multiplier,
                                       max_grad_norm=config.dpsgd_max_grad_norm))
        else:
            clients.append(Client(spec.client_id, **common))
    return clients


@dataclass
class FederationResult:
    global_state: dict[str, Tensor]  # after the last round (CPU)
    clients: list[Client]


def _follow(server: AggregatorServer, futures: Sequence[Future], rounds: int, progress: bool, desc: str) -> None:
    """Show the rounds as they close; a client's exception surfaces here at once."""
    with progress_bar(total=rounds, desc=desc, unit="round", enabled=progress) as bar:
        while server.current_round < rounds:
            for future in futures:
                error = future.exception() if future.done() else None
                if error is not None:
                    raise error
            time.sleep(0.05)
            bar.update(server.current_round - bar.n)
        bar.update(rounds - bar.n)


def run_federation(clients: Sequence[Client], *, model: nn.Module, rounds: int, progress: bool = True,
                   desc: str = "federated rounds") -> FederationResult:
    """FedAvg of the ``clients``' updates over gRPC for ``rounds`` rounds, starting from ``model``'s
    state (``model`` is left unchanged)."""
    tokens = generate_tokens([client.client_id for client in clients])
    with tempfile.TemporaryDirectory(prefix="gradguard-demo-aggregator-") as state_dir:
        # Rounds close when every client's update is in; no fsync: the state is thrown away anyway.
        config = AggregatorConfig(min_clients=len(clients), round_deadline_s=None, fsync=False)
        server = AggregatorServer(model.state_dict(), state_dir=state_dir, clients=tokens, config=config).start()
        pool = ThreadPoolExecutor(len(clients), thread_name_prefix="gradguard-demo-client")
        try:
            futures = [pool.submit(client.run, server.address, tokens[client.client_id], rounds)
                       for client in clients]
            _follow(server, futures, rounds, progress, desc)
            return FederationResult(global_state=server.global_state(),
                                    clients=[future.result() for future in futures])
        finally:
            server.stop(0)  # first, so that clients still waiting on a failed run give up
            pool.shutdown(wait=True)
