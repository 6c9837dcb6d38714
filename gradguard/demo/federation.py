"""The federation: an in-process aggregator on loopback and GradGuard clients as threads.

Each client is what a hospital would run: it wraps its model once with GradGuard (the two
lines), then every round loads the global model fetched over gRPC, runs its ordinary local
loop and submits ``guard.protected_update()``. Only protected updates leave a client.
"""
from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from gradguard import GradGuard, GuardConfig, ProtectedUpdate
from gradguard.eval.datasets import ImageSet
from gradguard.eval.defenses import local_sgd
from gradguard.eval.partition import ClientSpec
from gradguard.transport import AggregatorClient, AggregatorConfig, AggregatorServer, generate_tokens


class GuardedClient:
    """One hospital: its images, its model wrapped once by GradGuard, ``local_epochs`` epochs per round.

    It trains with Adam (its moments stay on the client across rounds). The guard runs the
    measured default preset with its schedules spanning ``rounds``; ``seed`` seeds the loader's
    shuffling and the guard's noise.
    """

    def __init__(self, client_id: str, images: Tensor, labels: Tensor, *, model: nn.Module, batch_size: int,
                 lr: float, local_epochs: int, rounds: int, seed: int) -> None:
        self.client_id, self.images, self.labels = client_id, images, labels
        self.lr, self.local_epochs = lr, local_epochs
        self.loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(seed))
        self.guard = GradGuard(GuardConfig(total_rounds=rounds, seed=seed), client_id=client_id)
        self.model, self.optimizer = self.guard.wrap(model, torch.optim.Adam(model.parameters(), lr=lr))
        self.bytes_sent = 0

    def train_round(self, round_index: int, global_state: dict[str, Tensor] | None = None) -> ProtectedUpdate:
        """Load ``global_state`` (if given), train locally and return the protected update."""
        if global_state is not None:
            self.model.load_state_dict(global_state)
        self.guard.begin_round(round_index)
        self.model.train()
        for _ in range(self.local_epochs):  # the ordinary loop
            local_sgd(self.model, list(self.loader), lr=self.lr, optimizer=self.optimizer)
        return self.guard.protected_update()

    def run(self, address: str, token: str, rounds: int) -> "GuardedClient":
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


@dataclass
class FederationResult:
    global_state: dict[str, Tensor]  # after the last round (CPU)
    clients: list[GuardedClient]


def _follow(server: AggregatorServer, futures: Sequence[Future], rounds: int, progress: bool) -> None:
    """Show the rounds as they close; a client's exception surfaces here at once."""
    with tqdm(total=rounds, desc="federated rounds", unit="round", disable=not progress) as bar:
        while server.current_round < rounds:
            for future in futures:
                error = future.exception() if future.done() else None
                if error is not None:
                    raise error
            time.sleep(0.05)
            bar.update(server.current_round - bar.n)
        bar.update(rounds - bar.n)


def run_federation(data: ImageSet, specs: Sequence[ClientSpec], *, model: nn.Module, rounds: int, lr: float,
                   local_epochs: int, seed: int, progress: bool = True) -> FederationResult:
    """FedAvg of GradGuard-protected updates over gRPC, starting from ``model`` (left unchanged).

    Client i trains a copy of ``model`` on ``data``'s images ``specs[i].indices`` and is seeded
    ``seed + i``.
    """
    clients = [GuardedClient(spec.client_id, data.images[list(spec.indices)], data.labels[list(spec.indices)],
                             model=copy.deepcopy(model), batch_size=spec.batch_size, lr=lr,
                             local_epochs=local_epochs, rounds=rounds, seed=seed + i)
               for i, spec in enumerate(specs)]
    tokens = generate_tokens([client.client_id for client in clients])
    with tempfile.TemporaryDirectory(prefix="gradguard-demo-aggregator-") as state_dir:
        # Rounds close when every client's update is in; no fsync: the state is thrown away anyway.
        config = AggregatorConfig(min_clients=len(clients), round_deadline_s=None, fsync=False)
        server = AggregatorServer(model.state_dict(), state_dir=state_dir, clients=tokens, config=config).start()
        pool = ThreadPoolExecutor(len(clients), thread_name_prefix="gradguard-demo-client")
        try:
            futures = [pool.submit(client.run, server.address, tokens[client.client_id], rounds)
                       for client in clients]
            _follow(server, futures, rounds, progress)
            return FederationResult(global_state=server.global_state(),
                                    clients=[future.result() for future in futures])
        finally:
            server.stop(0)  # first, so that clients still waiting on a failed run give up
            pool.shutdown(wait=True)
