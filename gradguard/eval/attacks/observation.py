"""What an attacker sees of one client's round, checked against the model it claims to update."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradguard.update import ProtectedUpdate

# The client states the mode its forward passes ran in; the benchmark trains in "train" mode.
MODEL_MODE_KEY = "model_mode"


@dataclass
class Observation:
    """The update, decoded for an attack running on ``model`` (a private copy, on the attack's device).

    target: the observed gradient per trainable parameter name. For a delta after K local SGD
        steps with learning rate lr this is -delta / (lr * K), the FedAvg approximation of the
        average gradient; ``simulate_steps`` in the attacks reproduces the K steps exactly instead.
    buffer_delta: the update's floating buffers (BatchNorm running statistics), empty for a gradient.
    global_buffers: the model's buffers before any attack forward (train-mode forwards change them).
    batch_size: how many images one local step used, the number of images reconstructed.
    """

    model: nn.Module
    update: ProtectedUpdate
    target: dict[str, Tensor]
    buffer_delta: dict[str, Tensor]
    global_buffers: dict[str, Tensor]
    train_mode: bool
    num_steps: int
    learning_rate: float
    batch_size: int
    image_shape: tuple[int, int, int]
    num_classes: int

    @property
    def device(self) -> torch.device:
        return next(iter(self.target.values())).device

    def params(self) -> dict[str, Tensor]:
        """The global model's parameters that the update covers, in the order of ``target``."""
        named = dict(self.model.named_parameters())
        return {name: named[name] for name in self.target}


def observe(model: nn.Module, update: ProtectedUpdate, *, image_shape: tuple[int, int, int],
            num_classes: int) -> Observation:
    """Decode ``update`` for ``model`` (the attack's own copy, already on its device)."""
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    mode = update.metadata.get(MODEL_MODE_KEY, "train")
    if mode not in ("train", "eval"):
        raise ValueError(f"update.metadata[{MODEL_MODE_KEY!r}] must be 'train' or 'eval', got {mode!r}")
    model.train(mode == "train")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name in trainable if name not in update.tensors]
    if missing:
        raise ValueError(f"the update lacks {len(missing)} trainable parameter(s) of the model, e.g. {missing[:3]}; "
                         "attack the update with the global model it was computed on")
    params = dict(model.named_parameters())
    device = params[trainable[0]].device
    for name in trainable:
        if update.tensors[name].shape != params[name].shape:
            raise ValueError(f"update[{name!r}] has shape {tuple(update.tensors[name].shape)}, "
                             f"the model's parameter has {tuple(params[name].shape)}")
    if update.kind == "gradient":
        target = {name: update.tensors[name].to(device) for name in trainable}
        num_steps, lr = 1, update.learning_rate or 1.0  # one step: the learning rate plays no part
        batch_size = update.num_samples
    else:
        if update.learning_rate is None or update.learning_rate <= 0:
            raise ValueError("a delta update needs its learning_rate (> 0) to be attacked; "
                             "the client must report it in ProtectedUpdate.learning_rate")
        num_steps, lr = update.num_steps, update.learning_rate
        if num_steps < 1:
            raise ValueError(f"a delta update needs num_steps >= 1, got {num_steps}")
        target = {name: -update.tensors[name].to(device) / (lr * num_steps) for name in trainable}
        batch_size = min(update.batch_size or update.num_samples, update.num_samples)
    buffers = dict(model.named_buffers())
    channels, height, width = image_shape  # a plain tuple (not a torch.Size or list)
    buffer_delta = {name: update.tensors[name].to(device) for name in buffers
                    if name in update.tensors and update.kind == "delta"}
    return Observation(model=model, update=update, target=target, buffer_delta=buffer_delta,
                       global_buffers={name: b.detach().clone() for name, b in buffers.items()},
                       train_mode=mode == "train", num_steps=num_steps, learning_rate=lr,
                       batch_size=batch_size, image_shape=(channels, height, width), num_classes=num_classes)
