"""The wrapper: hooks that noise each input by its own mask, and the update that leaves the client.

Two lines protect an existing model and optimizer; the training loop stays as it is::

    guard = GradGuard(GuardConfig())
    model, optimizer = guard.wrap(model, optimizer)
    ...                                  # the user's loop: forward, loss, backward, step
    update = guard.protected_update()    # what the client shares

Per training forward, a pre-hook replaces each input x_i by x_i + w_t s_i M_i * noise_i (w_t
scaled down for larger batches when batch_exponent > 0 and for clients that share more images
when update_exponent > 0), where
s_i = max|x_i| and M_i is sample i's mask. Masks are computed when a sample is first seen and
for the whole batch every ``refresh_every`` steps, from the shadow's vulnerability map and the
global model's relevance map, and smoothed across refreshes.
"""
from __future__ import annotations

import copy
import json
import secrets
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradguard import masks as mk
from gradguard.config import GuardConfig
from gradguard.errors import UnsupportedModelError, last_layer
from gradguard.per_sample import HybridDP
from gradguard.relevance import attribution, last_conv_layer
from gradguard.shadow import Shadow, ShadowInputs, build_shadow
from gradguard.update import ProtectedUpdate, snapshot, weight_delta

# model -> the guard installed on it; weak, and outside the model so deepcopy/pickle of the model
# never drags the guard (and its optimizer) along.
_GUARDS: "weakref.WeakKeyDictionary[nn.Module, GradGuard]" = weakref.WeakKeyDictionary()


@dataclass
class MaskExplanation:
    """The maps behind a batch's masks, for inspection and figures ([B, 1, H, W] each; targets: the
    classes the relevance map explains, [B])."""

    vulnerability: torch.Tensor
    relevance: torch.Tensor
    mask: torch.Tensor
    noised: torch.Tensor
    targets: torch.Tensor


@dataclass
class _RoundState:
    """What one round of local training accumulates (reset by protected_update)."""

    global_weights: dict[str, torch.Tensor] | None = None
    global_loaded: bool = False  # the round's global weights are in the hook-free copy
    steps: int = 0
    seen: set[str] = field(default_factory=set)
    batch_size: int = 0


def final_linear(model: nn.Module) -> tuple[str, nn.Module]:
    return last_layer(model, nn.Linear, needed_for="whose gradient is what the shadow inverts",
                      fix="end the model with an nn.Linear classifier, or set GuardConfig(shadow='none')")


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _strip_hooks(model: nn.Module) -> nn.Module:
    """A hook-free copy. The hooks are set aside during the copy, because a hook's closure
    (the guard's, Opacus') would otherwise drag its owner, optimizer included, into deepcopy."""
    saved = [(m, name, getattr(m, name)) for m in model.modules() for name in _HOOK_DICTS if hasattr(m, name)]
    try:
        for m, name, hooks in saved:
            setattr(m, name, type(hooks)())
        return copy.deepcopy(model)
    finally:
        for m, name, hooks in saved:
            setattr(m, name, hooks)


class GradGuard:
    """Sample-specific input noise for a wrapped model; see the module docstring."""

    def __init__(self, config: GuardConfig | None = None, *, client_id: str = "",
                 device: str | torch.device | None = None) -> None:
        self.config = config or GuardConfig()
        # A secret seed unless one is given: the noise must not be reproducible by a peer.
        self.seed = self.config.seed if self.config.seed is not None else secrets.randbits(63)
        self.client_id = client_id
        self._device = torch.device(device) if device is not None else None
        self.masks = mk.MaskStore()
        self.shadow: Shadow | None = None
        self.round = 0
        self.total_steps = 0
        self._noise = None  # torch.Generator, made on the model's device
        self._handles: list[RemovableHandle] = []
        self._model: nn.Module | None = None
        self._global_copy: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._dp: HybridDP | None = None
        self._update_images = 1  # N of update_exponent: the images the shared update covers
        self._accountant: object | None = None  # kept across rounds: epsilon accumulates
        self._state = _RoundState()
        self._pending_ids: list[str] | None = None
        self._pending_labels: torch.Tensor | None = None
        self._batch: tuple[torch.Tensor, torch.Tensor | None] | None = None  # clean images, features
        self._batchnorms: list[nn.modules.batchnorm._BatchNorm] = []
        self._frozen_bn: list[tuple[float | None, torch.Tensor | None]] = []  # restored after the forward
        self._clean_pass = False

    # ------------------------------------------------------------------ lifecycle
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, batch_size: int | None = None,
             dataset_size: int | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Install the guard on ``model`` and ``optimizer``; returns the pair to train with.

        Without hybrid DP these are the same objects, protected in place. Wrapping again (the
        same guard or a new one, e.g. every FL round) first removes the previous guard's hooks;
        a new guard takes over the previous one's masks and shadow so they keep smoothing.
        ``dataset_size`` (the images this client trains on per round) is needed by
        ``update_exponent`` and, with ``batch_size``, by hybrid DP's accountant.
        """
        cfg = self.config
        if cfg.update_exponent > 0:
            if dataset_size is None or dataset_size < 1:
                raise ValueError(f"update_exponent={cfg.update_exponent} scales the noise by the number of images "
                                 f"the update covers: pass wrap(..., dataset_size=N) with N >= 1, got {dataset_size}")
        previous = _GUARDS.get(model)
        if previous is not None:
            previous.cleanup()
            if previous is not self:
                self.masks, self.shadow, self.round = previous.masks, previous.shadow, previous.round
                self._accountant = previous._accountant
        self._update_images = dataset_size if cfg.update_exponent > 0 else 1
        self._model, self._optimizer = model, optimizer
        self._device = self._device or next(model.parameters()).device
        # Copied now, before any hook is attached; each round loads the global weights into it.
        self._global_copy = _strip_hooks(model).eval()
        if cfg.shadow != "none":
            final_linear(model)
        if cfg.relevance_method in ("gradcam", "guided_gradcam"):
            last_conv_layer(model)
        train_model, train_optimizer = model, optimizer
        if cfg.dp_noise_multiplier is not None:
            if batch_size is None or dataset_size is None:
                raise ValueError("hybrid DP needs wrap(..., batch_size=, dataset_size=) for its accountant")
            self._dp = HybridDP.attach(model, optimizer, noise_multiplier=cfg.dp_noise_multiplier,
                                       max_grad_norm=cfg.dp_max_grad_norm, batch_size=batch_size,
                                       dataset_size=dataset_size, delta=cfg.dp_delta,
                                       accountant=self._accountant or cfg.dp_accountant)
            self._accountant = self._dp.accountant
            train_model, train_optimizer = self._dp.module, self._dp.optimizer
        self._handles.append(model.register_forward_pre_hook(self._protect))
        self._batchnorms = [m for m in model.modules()
                            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if self._batchnorms and cfg.bn_statistics == "clean":
            self._handles.append(model.register_forward_hook(self._restore_batchnorm))
        if cfg.shadow != "none":
            self._handles.append(final_linear(model)[1].register_forward_hook(self._capture_features))
        self._handles.append(optimizer.register_step_post_hook(self._after_step))
        _GUARDS[model] = self
        self._state = _RoundState()
        return train_model, train_optimizer

    def cleanup(self) -> None:
        """Remove every hook this guard installed; the model and optimizer are as before wrap()."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._dp is not None:
            self._dp.detach()
            self._dp = None
        if self._model is not None and _GUARDS.get(self._model) is self:
            del _GUARDS[self._model]
        self._batch = None

    def begin_round(self, t: int) -> None:
        """Set the FL round index that the noise and relevance schedules use."""
        if t < 0:
            raise ValueError(f"round must be >= 0, got {t}")
        self.round = t

    def set_sample_ids(self, ids: list[str], labels: torch.Tensor | None = None) -> None:
        """Name the samples of the next training forward (and optionally their classes).

        Without this, a sample's id is a hash of its bytes and its class is the global model's
        prediction.
        """
        self._pending_ids = [str(i) for i in ids]
        self._pending_labels = labels

    @property
    def epsilon(self) -> float | None:
        return self._dp.epsilon() if self._dp is not None else None

    # ------------------------------------------------------------------ the update
    def protected_update(self) -> ProtectedUpdate:
        """The update to share for this round; ends the round (the next forward starts a new one)."""
        state, model = self._state, self._model
        if model is None or state.global_weights is None or state.steps == 0:
            raise RuntimeError("no protected training step since wrap() or the last protected_update(): "
                               "train at least one step (model.train(), forward, backward, optimizer.step())")
        if self.config.update_kind == "delta":
            tensors = weight_delta(state.global_weights, model)
        else:
            tensors = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
        update = ProtectedUpdate(
            tensors=tensors, kind=self.config.update_kind, num_samples=len(state.seen), num_steps=state.steps,
            round=self.round, client_id=self.client_id, batch_size=state.batch_size,
            learning_rate=float(self._optimizer.param_groups[0]["lr"]) if self._optimizer else None,
            epsilon=self.epsilon, delta=self.config.dp_delta if self._dp is not None else None,
            metadata={"defense": "gradguard", "config": json.dumps(self.config.public_dict(), sort_keys=True)},
        )
        self.round += 1
        self._state = _RoundState()
        return update

    # ------------------------------------------------------------------ masks
    def _schedules(self) -> tuple[float, float]:
        cfg = self.config
        t = min(self.round, cfg.total_rounds)
        return (mk.noise_amplitude(t, cfg.total_rounds, base=cfg.noise_amplitude, growth=cfg.amplitude_growth),
                mk.relevance_weight(t, cfg.total_rounds, low=cfg.relevance_weight_min,
                                    high=cfg.relevance_weight_max))

    def _global_model(self) -> nn.Module:
        if not self._state.global_loaded:
            self._global_copy.load_state_dict(self._model.state_dict())
            self._state.global_loaded = True
        return self._global_copy

    def _maps(self, images: torch.Tensor, ids: list[str], labels: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vulnerability, relevance and the classes the relevance explains, for clean ``images``."""
        cfg, model = self.config, self._global_model()
        captured: list[torch.Tensor] = []
        hook = None
        if cfg.shadow != "none":
            hook = final_linear(model)[1].register_forward_hook(lambda _m, a, _o: captured.append(a[0].detach()))
        try:
            with torch.no_grad():
                logits = model(images)
            predicted = logits.argmax(dim=1)
            targets = labels.to(images.device) if labels is not None else predicted
            # Only the attribution may drop the label; the shadow plays an attacker, who sees the true class.
            explained = targets if cfg.relevance_class == "label" else predicted
            ones = torch.ones_like(images[:, :1])
            relevance = ones * 0.0
            if cfg.relevance_method != "none":
                raw = attribution(cfg.relevance_method, model, images, explained)
                relevance = (mk.shadowdef_relevance_map(raw, top_fraction=cfg.relevance_top_fraction,
                                                        temperature=cfg.relevance_temperature)
                             if cfg.combine == "subtract" else
                             mk.relevance_map(raw, top_fraction=cfg.relevance_top_fraction,
                                              temperature=cfg.relevance_temperature))
        finally:
            if hook is not None:
                hook.remove()
        vulnerability = ones
        if cfg.shadow != "none":
            shadow = self._ensure_shadow(images, captured[0])
            error = shadow.error_map(ShadowInputs(images=images, features=captured[0], model=model,
                                                  targets=targets, ids=ids))
            vulnerability = (mk.shadowdef_vulnerability_map(error, temperature=cfg.vulnerability_temperature)
                             if cfg.combine == "subtract" else
                             mk.vulnerability_map(error, temperature=cfg.vulnerability_temperature))
        return vulnerability, relevance, explained

    def _mask(self, vulnerability: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return mk.combine(vulnerability, relevance, weight=self._schedules()[1], rule=cfg.combine,
                          floor=cfg.mask_floor, normalization=cfg.mask_normalization)

    def _ensure_shadow(self, images: torch.Tensor, features: torch.Tensor) -> Shadow:
        if self.shadow is None:
            cfg = self.config
            self.shadow = build_shadow(cfg.shadow, feature_dim=features.flatten(1).shape[1],
                                       image_shape=tuple(images.shape[1:]), width=cfg.shadow_width,
                                       lr=cfg.shadow_lr, steps=cfg.shadow_steps_per_batch,
                                       device=images.device, seed=self.seed)
        return self.shadow

    def _noise_like(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-variance noise per pixel (or ones for ``noise_kind="mask"``)."""
        kind = self.config.noise_kind
        if kind == "mask":
            return torch.ones_like(images)
        if self._noise is None or self._noise.device != images.device:
            self._noise = torch.Generator(device=images.device).manual_seed(self.seed)
        if kind == "uniform":
            # Uniform on [-sqrt(3), sqrt(3)] has unit variance, like the Gaussian.
            u = torch.rand(images.shape, generator=self._noise, device=images.device, dtype=images.dtype)
            return (2 * u - 1) * 3 ** 0.5
        white = torch.randn(images.shape, generator=self._noise, device=images.device, dtype=images.dtype)
        if kind == "smooth":
            return mk.low_pass_noise(white, sigma=self.config.noise_smoothness)
        return white

    def noised(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x + w_t B^(-batch_exponent) N^(-update_exponent) max|x| M (noise), B = len(images), N the
        images of the update: the training hook's rule."""
        cfg = self.config
        amplitude = mk.averaged_amplitude(
            mk.averaged_amplitude(self._schedules()[0], len(images), exponent=cfg.batch_exponent),
            self._update_images, exponent=cfg.update_exponent)
        scale = images.detach().flatten(1).abs().amax(dim=1).view(-1, 1, 1, 1)
        return images + amplitude * scale * mask * self._noise_like(images)

    def explain(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> MaskExplanation:
        """The maps GradGuard would use for ``images`` now, without changing any state."""
        if self._model is None:
            raise RuntimeError("wrap() a model first")
        images = images.to(self._device)
        ids = [mk.sample_id(x) for x in images]
        created = not self._state.global_loaded
        vulnerability, relevance, targets = self._maps(images, ids, labels)
        mask = self._mask(vulnerability, relevance)
        if created:
            self._state.global_loaded = False  # explain() must not pin this round's global model
        return MaskExplanation(vulnerability.cpu(), relevance.cpu(), mask.cpu(),
                               self.noised(images, mask).detach().cpu(), targets.cpu())

    # ------------------------------------------------------------------ hooks
    def _protect(self, module: nn.Module, args: tuple):
        if self._clean_pass or not module.training or not args:
            return None
        images = args[0]
        if not torch.is_tensor(images) or images.ndim != 4 or not images.is_floating_point():
            raise UnsupportedModelError(
                f"GradGuard protects image batches [N, C, H, W] of floats; the model got "
                f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}; fix: pass images as the first "
                "argument of forward, or call guard.cleanup() for non-image inputs")
        state = self._state
        if state.global_weights is None:  # first training forward of the round: the global model
            state.global_weights = snapshot(module)
        ids = self._pending_ids or [mk.sample_id(x) for x in images]
        labels, self._pending_ids, self._pending_labels = self._pending_labels, None, None
        if len(ids) != len(images):
            raise ValueError(f"set_sample_ids() named {len(ids)} samples but the batch has {len(images)}")
        refresh_all = self.total_steps % self.config.refresh_every == 0
        stale = [i for i, sid in enumerate(ids) if refresh_all or sid not in self.masks]
        if stale:
            with torch.enable_grad():
                v, r, _ = self._maps(images[stale].detach(), [ids[i] for i in stale],
                                     labels[stale] if labels is not None else None)
            self.masks.update([ids[i] for i in stale], self._mask(v, r), momentum=self.config.mask_momentum,
                              step=self.total_steps)
        state.seen.update(ids)
        state.batch_size = max(state.batch_size, len(ids))
        self._batch = (images.detach(), None)
        if self._batchnorms and self.config.bn_statistics == "clean":
            self._clean_batchnorm_statistics(module, images, args[1:])
        noised = self.noised(images, self.masks.stack(ids, images.device))
        return (noised,) + tuple(args[1:])

    def _clean_batchnorm_statistics(self, module: nn.Module, images: torch.Tensor, rest: tuple) -> None:
        """Running statistics from the clean batch; the noised forward then leaves them alone.

        Statistics of noised inputs would not match the clean images the model is tested on
        (measured: the global model collapsed to the majority class without this).
        """
        self._clean_pass = True
        try:
            with torch.no_grad():
                module(images, *rest)
        finally:
            self._clean_pass = False
        self._frozen_bn = []
        for bn in self._batchnorms:
            tracked = bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None
            self._frozen_bn.append((bn.momentum, tracked))
            bn.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged

    def _restore_batchnorm(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        for bn, (momentum, tracked) in zip(self._batchnorms, self._frozen_bn):
            bn.momentum = momentum
            if tracked is not None:
                bn.num_batches_tracked.copy_(tracked)
        self._frozen_bn = []

    def _capture_features(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if module.training and self._batch is not None and not self._clean_pass:
            self._batch = (self._batch[0], args[0].detach())

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._batch is None:
            return
        self.total_steps += 1
        self._state.steps += 1
        images, features = self._batch
        if self.shadow is not None and features is not None and \
                self.total_steps % self.config.shadow_train_every == 0:
            self.shadow.observe(features, images)
        self._batch = None
