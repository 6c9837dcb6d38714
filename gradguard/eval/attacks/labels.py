"""Label recovery from the last layer's gradient (iDLG for one image, LLG*-style counts for a batch).

For a Linear head trained with mean cross-entropy, the bias gradient of class c is
mean_i(p_ic - y_ic) and the weight row is mean_i((p_ic - y_ic) h_i) with features h_i. So:
- one image (iDLG, Zhao et al. 2020): only the true class has a negative entry, c = argmin;
- a batch (Wainakh et al.'s LLG*, 2022): n_c = B * (mean p_c - g_c), with the model's mean
  prediction estimated on random probe images, rounded greedily so the counts sum to B. For a
  multi-step delta g is the average over the local steps, so the probes' predictions are
  averaged over weights interpolated along the update too.
Without a bias the weight row sums stand in, divided by the probes' mean feature norm.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gradguard.eval.attacks.observation import Observation


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's last ``nn.Linear`` (its classification head) and its module name."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head; label recovery and the learned attack "
                         "need one (pass labels= to attack other models)")
    return linears[-1]


def recover_labels(obs: Observation, *, probes: int = 64) -> Tensor:
    """The labels of the update's batch, recovered from the last layer; sorted by class."""
    name, head = last_linear(obs.model)
    if head.out_features != obs.num_classes:
        raise ValueError(f"the model's head {name!r} has {head.out_features} outputs, num_classes is {obs.num_classes}")
    weight_grad = obs.target[f"{name}.weight"]
    bias_grad = obs.target.get(f"{name}.bias")
    if obs.batch_size == 1:
        signal = bias_grad if bias_grad is not None else weight_grad.sum(dim=1)
        return signal.argmin().reshape(1)
    mean_prob, feature_norm = _probe(obs, head, probes)
    signal = bias_grad if bias_grad is not None else weight_grad.sum(dim=1) / feature_norm
    estimate = obs.batch_size * (mean_prob - signal)
    counts = torch.zeros_like(estimate)
    for _ in range(obs.batch_size):  # greedy: each label goes to the class with most unassigned mass
        counts[(estimate - counts).argmax()] += 1
    return torch.repeat_interleave(torch.arange(obs.num_classes, device=counts.device), counts.long())


@torch.no_grad()
def _probe(obs: Observation, head: nn.Linear, probes: int) -> tuple[Tensor, Tensor]:
    """Mean softmax and mean L1 feature norm at the head on uniform random images, averaged over
    the client's local steps (weights interpolated along the update: w_k = w_0 - k * lr * target)."""
    features: list[Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _out: features.append(args[0]))
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((probes, *obs.image_shape), generator=generator).to(obs.device)
    params = obs.params()
    probs = []
    try:
        for step in range(obs.num_steps):
            weights = {name: p - step * obs.learning_rate * obs.target[name] for name, p in params.items()}
            probs += [functional_call(obs.model, weights, (chunk,)).softmax(dim=1)
                      for chunk in images.split(obs.batch_size)]
    finally:
        handle.remove()
    return torch.cat(probs).mean(dim=0), torch.cat(features).flatten(1).abs().sum(dim=1).mean()
