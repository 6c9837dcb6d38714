"""The ClientApp: an ordinary PyTorch train handler, run under GradGuard by ``gradguard_mod``.

The only GradGuard line in the handler is ``current_guard().wrap(model, optimizer)`` (plus naming
each batch's samples, so masks follow the image). With ``secagg = true`` in the run config,
``secaggplus_mod`` runs outside GradGuard and masks the protected update, so the server learns
only the sum of the clients' updates; it then speaks Flower's legacy Fit format, which its
server workflow uses.
"""
from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from gradguard.integrations.flower import current_guard, gradguard_mod

from gradguard_flower_app import task

LEGACY_ARRAYS = "fitins.parameters"  # where SecAgg+'s workflow puts the global model

app = ClientApp()


def secagg_if_configured(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ when the run asks for it (``secagg = true``), the plain Message API otherwise."""
    if context.run_config["secagg"]:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def gradguard_unless_disabled(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """GradGuard, unless the run is the undefended baseline (``defense = "none"``)."""
    if context.run_config["defense"] == "none":
        return call_next(msg, context)
    return gradguard_mod(msg, context, call_next)


def _node(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def _load_global(model: torch.nn.Module, content: RecordDict) -> None:
    if LEGACY_ARRAYS in content.array_records:  # legacy Parameters: arrays in state-dict order, no names
        arrays = [torch.from_numpy(np.array(a.numpy())) for a in content.array_records[LEGACY_ARRAYS].values()]
        model.load_state_dict(dict(zip(model.state_dict(), arrays, strict=True)))
    else:
        model.load_state_dict(content["arrays"].to_torch_state_dict())


def _local(msg: Message, context: Context, split: str, images_key: str
           ) -> tuple[int, torch.Tensor, torch.Tensor, torch.nn.Module]:
    """This node's id, its images of ``split`` and the global model the message carries."""
    run = context.run_config
    node, nodes = _node(context)
    images, labels = task.partition(str(run["data-dir"]), split, node, nodes, int(run[images_key]), int(run["seed"]))
    model = task.Net()
    _load_global(model, msg.content)
    return node, images, labels, model


@app.train(mods=[secagg_if_configured, gradguard_unless_disabled])
def train(msg: Message, context: Context) -> Message:
    run = context.run_config
    node, images, labels, model = _local(msg, context, "train", "client-images")
    optimizer = torch.optim.Adam(model.parameters(), lr=float(run["lr"]))
    guard = None if run["defense"] == "none" else current_guard()
    if guard is not None:
        model, optimizer = guard.wrap(model, optimizer, dataset_size=len(labels))
    # FedAvg sends the round in its config, SecAgg+'s workflow as the message's group id.
    server_round = int(next((r["server-round"] for r in msg.content.config_records.values() if "server-round" in r),
                            msg.metadata.group_id or 0))
    loss = task.train(model, optimizer, images, labels, epochs=int(run["local-epochs"]),
                      batch_size=int(run["batch-size"]), seed=int(run["seed"]) * 1_009 + node * 101 + server_round,
                      on_batch=None if guard is None else
                      lambda batch, y: guard.set_sample_ids([f"{node}-{i}" for i in batch.tolist()], labels=y))
    if LEGACY_ARRAYS in msg.content.array_records:
        arrays = [value.detach().cpu().numpy() for value in model.state_dict().values()]
        fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays),
                        num_examples=len(labels), metrics={"train-loss": loss})
        return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                               "metrics": MetricRecord({"train-loss": loss, "num-examples": len(labels)})}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Client-side evaluation of the global model on the node's own held-out images (val split)."""
    _, images, labels, model = _local(msg, context, "val", "eval-images")
    loss, accuracy = task.evaluate(model, images, labels)
    return Message(RecordDict({"metrics": MetricRecord({"eval-loss": loss, "eval-acc": accuracy,
                                                        "num-examples": len(labels)})}), reply_to=msg)
