"""The ServerApp: FedAvg behind GradGuard's reply checks, with client-side evaluation and the
test split evaluated on the server after every round.

With ``secagg = true`` the round runs Flower's SecAgg+ workflow instead: the server receives
only masked vectors and unmasks their sum, so no individual update (protected or not) reaches it.
With ``out-dir`` set, ``metrics.json`` there holds the server's test accuracy per round and
every client's train and evaluate metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from gradguard.integrations.flower import GradGuardStrategy

from gradguard_flower_app import task

app = ServerApp()


class SumOnlyFedAvg(LegacyFedAvg):
    """Legacy FedAvg that records, per aggregation, how many results it got and how many distinct
    models they carry. Under SecAgg+ the workflow hands it one result per client, each holding the
    same unmasked sum: one distinct model, whatever the number of clients."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[dict[str, int]] = []

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        distinct = {b"".join(fitres.parameters.tensors) for _, fitres in results}
        self.seen.append({"results": len(results), "distinct-models": len(distinct)})
        return super().aggregate_fit(server_round, results, failures)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = context.run_config
    nodes, rounds = int(run["min-nodes"]), int(run["num-server-rounds"])
    test_images, test_labels = task.split(str(run["data-dir"]), "test")
    names = list(task.Net().state_dict())
    history: dict = {"test": [], "defense": str(run["defense"]), "secagg": bool(run["secagg"])}

    def test(server_round: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        model = task.Net()
        model.load_state_dict(state)
        loss, accuracy = task.evaluate(model, test_images, test_labels)
        history["test"].append({"round": server_round, "test-loss": loss, "test-acc": accuracy})
        return {"test-loss": loss, "test-acc": accuracy}

    initial = task.initial_state(int(run["seed"]))
    if run["secagg"]:
        strategy = SumOnlyFedAvg(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=nodes, min_available_clients=nodes,
            initial_parameters=ndarrays_to_parameters([v.numpy() for v in initial.values()]),
            evaluate_fn=lambda r, arrays, config: (
                lambda m: (m["test-loss"], m))(test(r, dict(zip(names, map(torch.from_numpy, arrays), strict=True)))))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        # Every client shares keys with all others and any 2 of them can rebuild a dropped one's mask.
        workflow = SecAggPlusWorkflow(num_shares=nodes, reconstruction_threshold=2)
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
        history["aggregations"] = strategy.seen
    else:
        guarded = GradGuardStrategy(
            FedAvg(fraction_train=1.0, fraction_evaluate=float(run["fraction-evaluate"]), min_train_nodes=nodes,
                   min_evaluate_nodes=nodes, min_available_nodes=nodes),
            require_protected=run["defense"] != "none")
        guarded.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=rounds,
                      train_config=ConfigRecord({"lr": float(run["lr"])}),
                      evaluate_fn=lambda r, arrays: MetricRecord(test(r, arrays.to_torch_state_dict())))
        history["clients"] = guarded.client_metrics
    if run["out-dir"]:
        out = Path(str(run["out-dir"]))
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(history, indent=1))
