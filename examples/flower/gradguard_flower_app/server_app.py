"""The ServerApp: FedAvg behind GradGuard's reply checks, evaluated on the test split each round
(accuracy, F1, and whether the model collapsed to the majority class).

With ``out-dir`` set, the global model of every round is saved there as
``round-<r>.safetensors`` (round 0 is the initial model).
"""
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import save_file

from gradguard.eval.bench import evaluate as test_utility
from gradguard.integrations.flower import GradGuardStrategy

from gradguard_flower_app import task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = context.run_config
    nodes = int(run["min-nodes"])
    out_dir = Path(str(run["out-dir"])) if run["out-dir"] else None

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        # Strategy.start calls this before round 1 and after every round with the global model.
        state = arrays.to_torch_state_dict()
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / f"round-{server_round}.safetensors"))
        model = task.build_model()
        model.load_state_dict(state)
        scores = test_utility(model, task.split_data("test"), device=task.device())
        return MetricRecord({name: float(value) for name, value in scores.items()})  # collapsed: 1.0 = yes

    strategy = GradGuardStrategy(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes,
                                        min_available_nodes=nodes))
    strategy.start(grid=grid, initial_arrays=ArrayRecord(task.initial_state(int(run["seed"]))),
                   num_rounds=int(run["num-server-rounds"]), evaluate_fn=evaluate)
