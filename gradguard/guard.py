"""The wrapper: hooks that noise each input by its own mask, and the update that leaves the client.

Two lines protect an existing model and optimizer; the training loop stays as it is::

    guard = GradGuard(GuardConfig())
    model, optimizer = guard.wrap(model, optimizer)
    ...                                  # the user's loop: forward, loss, backward, step
    update = guard.protected_update()    # what the client shares

The contract of ``wrap``: the pair it returns is what protects the training. Without hybrid DP
it is the pair it was given, protected in place; with hybrid DP it is Opacus' GradSampleModule
and DPOptimizer (plus a Poisson-sampling DataLoader), and a training step on the objects given
to ``wrap`` raises, since it would train without DP.

Per training forward, a pre-hook replaces the noised input x_i (the first tensor argument, or
the one ``wrap(noised_input=...)`` names) by x_i + w_t s_i M_i * noise_i (w_t scaled down for
larger batches when batch_exponent > 0 and for clients that share more images when
update_exponent > 0), where s_i = max|x_i| and M_i is sample i's mask. Masks are computed when
a sample is first seen and for the whole batch every ``refresh_every`` steps, from the shadow's
vulnerability map and the global model's relevance map, and smoothed across refreshes.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import json
import math
import secrets
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from gradguard import masks as mk
from gradguard.batchnorm import tracked_batchnorms
from gradguard.calibration import bound, exact
from gradguard.calibration.probe import (PROBE_FRACTIONS, PROBE_MARGIN_DB, PROBE_MIX_IMAGES, above_prior_db,
                                         buffers_kept, gradient_probe)
from gradguard.config import GuardConfig, derive_seed
from gradguard.errors import ConfigError, GradGuardError, GradGuardWarning, UnsupportedModelError, last_layer
from gradguard.per_sample import HybridDP, epsilon, new_accountant, validate_per_sample
from gradguard.relevance import LAYER_METHODS, attribution, gradcam_from, last_conv_layer, to_pixels
from gradguard.shadow import SHADOWS, Shadow, ShadowInputs, build_shadow
from gradguard.shadow.base import per_pixel_error
from gradguard.update import LeakageEstimate, ProtectedUpdate, snapshot, weight_delta

if TYPE_CHECKING:  # opacus is imported only when hybrid DP is used
    from opacus.accountants import IAccountant

# model -> the guard installed on it; weak, and outside the model so deepcopy/pickle of the model
# never drags the guard (and its optimizer) along.
_GUARDS: weakref.WeakKeyDictionary[nn.Module, GradGuard] = weakref.WeakKeyDictionary()

# Bisection stops within this of the target: an estimate this close counts as meeting it.
_TARGET_TOLERANCE_DB = 1e-6

InputSelector = int | str
"""The noised input of ``forward``: a position among its positional arguments, or a parameter name."""
LogitsSelector = int | str | Callable[[Any], torch.Tensor]
"""Where the logits [N, classes] are in what ``forward`` returns: an index, a key, or a function."""

# Measured on the federation benchmark: with no statistic shared, the global model predicts one class.
_NO_SHARED_BATCHNORM = (
    "every round of this guard is noised (the malicious-server threat, or a fixed noise rule), so with "
    "bn_statistics='local' no BatchNorm running statistic leaves this client and the global model keeps its "
    "initial ones; fix: re-estimate them on the server from public images (gradguard.reestimate_batchnorm), "
    "evaluate with each client's own statistics (FedBN), or train with GroupNorm")


@dataclass
class MaskExplanation:
    """The maps behind a batch's masks, for inspection and figures ([B, 1, H, W] each, [B, 1, D, H, W]
    for volumes; targets: the classes the relevance map explains, [B])."""

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
    dp_steps: int = 0  # steps the accountant was charged for
    seen: set[str] = field(default_factory=set)
    batch_size: int = 0
    gradient: dict[str, torch.Tensor] | None = None  # update_kind="gradient": the first step's
    plans: dict[str, _SamplePlan] = field(default_factory=dict)  # calibrated noise, per sample id
    probe: tuple[float, float] | None = None  # honest server: the round's fraction of the bound's noise, its estimate
    mixed: int = 0  # the images the probe took the round's update to mix


@dataclass(frozen=True)
class _SamplePlan:
    """A sample's calibrated noise for the round (one draw, reused at every view) and its estimate."""

    amplitude: float
    sigma: float  # amplitude x max |x|
    seed: int
    psnr_db: float
    ssim_db: float


@dataclass(frozen=True)
class _Call:
    """A training forward's arguments and where the noised input sits among them."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    slot: int | str

    @property
    def images(self) -> Any:
        return self.args[self.slot] if isinstance(self.slot, int) else self.kwargs[self.slot]

    def with_images(self, images: torch.Tensor, rows: torch.Tensor | None = None
                    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments with ``images`` in the slot; with ``rows``, every other per-sample tensor
        (one whose first dimension is the batch's) keeps only those rows."""
        n = len(self.images)

        def pick(value: Any) -> Any:
            per_sample = rows is not None and torch.is_tensor(value) and value.ndim > 0 and len(value) == n
            return value[rows] if per_sample else value

        args, kwargs = [pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}
        if isinstance(self.slot, int):
            args[self.slot] = images
        else:
            kwargs[self.slot] = images
        return tuple(args), kwargs


def _scale(images: torch.Tensor) -> torch.Tensor:
    """Each image's max |x|, the unit of the noise amplitude ([N])."""
    return images.detach().flatten(1).abs().amax(dim=1).clamp_min(1e-12)


def _describe(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def input_slot(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               selector: InputSelector | None) -> int | str:
    """Where the noised input is in a forward call: ``selector``, or the first tensor argument."""
    if selector is None:
        positions: list[int | str] = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        found = positions + [k for k, v in kwargs.items() if torch.is_tensor(v)]
        if not found:
            raise UnsupportedModelError("the model's forward got no tensor argument to noise; fix: pass the images "
                                        "as a tensor, or name the input with wrap(..., noised_input=<name>)")
        return found[0]
    if isinstance(selector, int):
        if 0 <= selector < len(args):
            return selector
        raise UnsupportedModelError(f"wrap(noised_input={selector}) but forward got {len(args)} positional "
                                    "argument(s); fix: give the images' position or their parameter name")
    if selector in kwargs:
        return selector
    names = list(inspect.signature(module.forward).parameters)
    if selector in names and names.index(selector) < len(args):
        return names.index(selector)
    raise UnsupportedModelError(f"wrap(noised_input={selector!r}) names no argument of this forward call "
                                f"(forward's parameters: {names}); fix: give the images' parameter name or position")


def select_logits(output: Any, selector: LogitsSelector | None) -> torch.Tensor:
    """The logits [N, classes] in a forward's output: ``selector``, else the output itself, the first
    element of a tuple or list, or a mapping's "logits"."""
    if callable(selector):
        logits = selector(output)
    elif selector is not None:
        logits = output[selector]
    elif isinstance(output, (tuple, list)) and output:
        logits = output[0]
    elif isinstance(output, Mapping) and "logits" in output:
        logits = output["logits"]
    else:
        logits = output
    if not torch.is_tensor(logits) or logits.ndim != 2:
        raise UnsupportedModelError(
            f"the guard reads the model's logits [N, classes], but the selected output is {_describe(logits)} "
            f"(forward returned {_describe(output)}); fix: wrap(..., logits=<index, key or function>)")
    return logits


def image_problem(images: Any) -> str | None:
    """Why ``images`` cannot be noised, with the fix, or None."""
    if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim not in (4, 5):
        return (f"the noised input is {_describe(images)}; GradGuard noises floating-point batches [N, C, H, W] "
                "or volumes [N, C, D, H, W]; fix: choose the input with wrap(..., noised_input=<position or name>), "
                "convert it with .float(), or add the batch and channel dimensions")
    if not bool(torch.isfinite(images).all()):
        return ("the noised input holds NaN or infinite values, which would reach the shared update; fix: clean "
                "the data (e.g. torch.nan_to_num) or check its normalisation")
    return None


class _Logits(nn.Module):
    """The model as a function of the noised input alone, returning logits: what Grad-CAM, captum
    and the shadows call. The other arguments of the training forward pass through unchanged."""

    def __init__(self, model: nn.Module, call: _Call, rows: torch.Tensor | None,
                 selector: LogitsSelector | None) -> None:
        super().__init__()
        self.model, self.call, self.rows, self.selector = model, call, rows, selector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.call.with_images(images, self.rows)
        return select_logits(self.model(*args, **kwargs), self.selector)


def final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
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


def _checked_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"GradGuard(device={device!r}) is not a device ({err}); fix: 'cpu', 'cuda', 'cuda:1', "
                          "or None (the guard follows the model)") from None
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    count = torch.cuda.device_count() if checked.type == "cuda" else 1
    if not available.get(checked.type, True) or (checked.index or 0) >= count:
        raise ConfigError(f"GradGuard(device={device!r}) but this machine has no such device; fix: device=None "
                          "(the guard follows the model's device) or device='cpu'")
    return checked


def _encoded_ids(prefix: str, ids: list[str]) -> dict[str, torch.Tensor]:
    """Ids of any length and alphabet as tensors: their UTF-8 bytes end to end, and each one's length."""
    encoded = [sid.encode("utf-8") for sid in ids]
    return {f"{prefix}.ids": torch.tensor(list(b"".join(encoded)), dtype=torch.uint8),
            f"{prefix}.id_lengths": torch.tensor([len(e) for e in encoded], dtype=torch.int64)}


def _decoded_ids(state: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    data, lengths = bytes(state[f"{prefix}.ids"].tolist()), state[f"{prefix}.id_lengths"].tolist()
    if sum(lengths) != len(data) or min(lengths, default=0) < 0:
        raise GradGuardError(f"not a GradGuard state: {prefix}.id_lengths does not add up to {prefix}.ids; "
                             "fix: pass guard.state_dict()")
    return [data[end - n:end].decode("utf-8") for end, n in zip(itertools.accumulate(lengths), lengths)]


class GradGuard:
    """Sample-specific input noise for a wrapped model; see the module docstring."""

    def __init__(self, config: GuardConfig | None = None, *, client_id: str = "",
                 device: str | torch.device | None = None) -> None:
        if config is not None and not isinstance(config, GuardConfig):
            raise ConfigError(f"GradGuard(config=...) must be a GuardConfig, got {type(config).__name__}; fix: "
                              "GradGuard(GuardConfig(...)) or GradGuard(GuardConfig.preset(name))")
        self.config = config or GuardConfig()
        # A secret seed unless one is given: the noise must not be reproducible by a peer.
        self.seed = self.config.seed if self.config.seed is not None else secrets.randbits(63)
        self.client_id = client_id
        self._device = _checked_device(device)
        self.masks = mk.MaskStore()
        self.shadow: Shadow | None = None
        self._shadow_state: dict[str, torch.Tensor] | None = None  # loaded, built at the next mask computation
        self._shadow_dims: torch.Tensor | None = None  # [feature size, *image shape] the shadow was built for
        self.round = 0
        self.total_steps = 0
        self._noise: torch.Generator | None = None  # made on the model's device
        self._handles: list[RemovableHandle] = []
        self._model: nn.Module | None = None
        self._global_copy: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._dp: HybridDP | None = None
        self._dp_forward = False  # inside the GradSampleModule's forward
        self._dp_step = False  # the DPOptimizer clipped and noised the step now running
        self._accountant: IAccountant | None = None  # kept across rounds: epsilon accumulates
        self._dataset_size: int | None = None
        self._update_images = 1  # N of update_exponent: the images the shared update covers
        self._noised_input: InputSelector | None = None
        self._logits: LogitsSelector | None = None
        self._state = _RoundState()
        self._pending_ids: list[str] | None = None
        self._pending_labels: torch.Tensor | None = None
        self._batch: tuple[torch.Tensor, torch.Tensor | None] | None = None  # clean images, features
        self._batchnorms: dict[str, nn.modules.batchnorm._BatchNorm] = {}  # by module name
        self._frozen_bn: list[tuple[float | None, torch.Tensor | None]] = []  # restored after the forward
        self._clean_pass = False
        self._prior: torch.Tensor | None = None  # set_prior's image
        self._prior_sum: torch.Tensor | None = None  # the sum and ids of every distinct image seen
        self._prior_ids: set[str] = set()
        # (round, batch size, images mixed, fraction, estimate) of the last probe
        self._probed: tuple[int, int, int, float, float] | None = None
        # Clean images of earlier rounds and their classes (-1: unknown), which the probe mixes into a
        # delta's gradient (up to PROBE_MIX_IMAGES); they never leave the client.
        self._kept: dict[str, tuple[torch.Tensor, int]] = {}

    # ------------------------------------------------------------------ checks
    def validate(self, model: Any, optimizer: Any, example_batch: Any = None, *, data_loader: Any = None,
                 dataset_size: Any = None, noised_input: InputSelector | None = None,
                 logits: LogitsSelector | None = None) -> list[str]:
        """Everything that would stop this guard from protecting ``model`` trained by ``optimizer``,
        one line each with its fix; empty when all is well. ``wrap`` runs it and raises on any.

        ``example_batch`` (what the model's forward is called with: a tensor, a tuple of positional
        arguments or a dict of keyword arguments) also checks the noised input and the logits.
        """
        cfg, problems = self.config, []
        if not isinstance(model, nn.Module):
            what = ("a state_dict: build the model and load it (model.load_state_dict(state))"
                    if isinstance(model, Mapping) else "the model instance (model = Net()), not a class or function")
            problems.append(f"model: expected a torch.nn.Module, got {type(model).__name__}; fix: pass {what}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            problems.append(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}; fix: "
                            "optimizer = torch.optim.SGD(model.parameters(), lr=...)")
        if dataset_size is not None and (not isinstance(dataset_size, int) or isinstance(dataset_size, bool)
                                         or dataset_size < 1):
            problems.append(f"dataset_size: expected a positive int, the images the client trains on per round, "
                            f"got {dataset_size!r}; fix: dataset_size=len(train_set)")
        elif dataset_size is None and data_loader is None and cfg.noise.update_exponent > 0:
            problems.append(f"dataset_size: update_exponent={cfg.noise.update_exponent} scales the noise by the "
                            "number of images the update covers; fix: wrap(..., dataset_size=N) with N >= 1")
        if data_loader is not None and not isinstance(data_loader, DataLoader):
            problems.append(f"data_loader: expected a torch.utils.data.DataLoader, got {type(data_loader).__name__}")
        elif cfg.dp.enabled and data_loader is None:
            problems.append("data_loader: hybrid DP's epsilon holds only if every step's batch is Poisson-sampled, "
                            "as its accountant assumes; fix: model, optimizer, loader = guard.wrap(model, optimizer, "
                            "data_loader=loader), then train on the loader it returns")
        if isinstance(model, nn.Module):
            problems += self._model_problems(model, optimizer)
            if example_batch is not None:
                problems += self._example_problems(model, example_batch, noised_input, logits)
        return problems

    def _model_problems(self, model: nn.Module, optimizer: Any) -> list[str]:
        cfg, problems = self.config, []
        params = list(model.parameters())
        if not params:
            return ["model: it has no parameters to train; fix: wrap the model that is trained"]
        if isinstance(optimizer, torch.optim.Optimizer):
            mine = {id(p) for p in params}
            theirs = [p for group in optimizer.param_groups for p in group["params"]]
            foreign = sum(id(p) not in mine for p in theirs)
            if foreign:
                problems.append(f"optimizer: {foreign} of its {len(theirs)} parameters are not the model's (it was "
                                "built on another model or a copy), so the update would not hold the training; fix: "
                                "build it on model.parameters() after any copy or .to()")
        if self._device is not None and params[0].device != self._device:
            problems.append(f"device: the guard was built for {self._device} but the model is on {params[0].device}; "
                            f"fix: model.to('{self._device}') before wrap, or GradGuard(device=None)")
        if cfg.shadow.kind != "none" and not any(isinstance(m, nn.Linear) for m in model.modules()):
            problems.append("model: it has no nn.Linear, whose gradient is what the shadow inverts; fix: end the "
                            "model with an nn.Linear classifier, or GuardConfig(shadow='none')")
        if cfg.masks.relevance_method in LAYER_METHODS and \
                not any(isinstance(m, (nn.Conv2d, nn.Conv3d)) for m in model.modules()):
            problems.append(f"model: relevance_method={cfg.masks.relevance_method!r} reads the last nn.Conv2d "
                            "(nn.Conv3d for volumes) and the model has none; fix: relevance_method='saliency', "
                            "'integrated_gradients' or 'none'")
        if cfg.dp.enabled:
            try:
                validate_per_sample(model)
            except UnsupportedModelError as err:
                problems.append(f"model: {err}")
        return problems

    def _example_problems(self, model: nn.Module, example: Any, noised_input: InputSelector | None,
                          logits: LogitsSelector | None) -> list[str]:
        args, kwargs = ((), dict(example)) if isinstance(example, Mapping) else \
            (tuple(example), {}) if isinstance(example, (tuple, list)) else ((example,), {})
        try:
            call = _Call(args, kwargs, input_slot(model, args, kwargs, noised_input))
        except UnsupportedModelError as err:
            return [f"noised_input: {err}"]
        problem = image_problem(call.images)
        if problem is not None:
            return [f"example_batch: {problem}"]
        if self.config.shadow.kind == "generator" and call.images.ndim == 5:
            return [("shadow: the 'generator' shadow reconstructs 2-D images; fix: "
                     "GuardConfig(shadow='feature_inverter') for volumes")]
        if self.config.masks.relevance_method in LAYER_METHODS and call.images.ndim == 5 and \
                not any(isinstance(m, nn.Conv3d) for m in model.modules()):
            return [("model: Grad-CAM of a volume reads the last nn.Conv3d and the model has none; fix: "
                     "relevance_method='saliency'")]
        was_training = model.training
        try:
            with torch.no_grad():
                select_logits(model.eval()(*args, **kwargs), logits)
        except UnsupportedModelError as err:
            return [f"logits: {err}"]
        except Exception as err:  # noqa: BLE001 - the user's forward: report whatever it raises
            return [(f"example_batch: the model's forward raised {type(err).__name__}: {err}; fix: pass what "
                     "forward is called with (a tensor, a tuple of arguments or a dict of keyword arguments)")]
        finally:
            model.train(was_training)
        return []

    # ------------------------------------------------------------------ lifecycle
    @overload
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, data_loader: None = None,
             dataset_size: int | None = None, example_batch: Any = None, noised_input: InputSelector | None = None,
             logits: LogitsSelector | None = None) -> tuple[nn.Module, torch.optim.Optimizer]: ...

    @overload
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, data_loader: DataLoader,
             dataset_size: int | None = None, example_batch: Any = None, noised_input: InputSelector | None = None,
             logits: LogitsSelector | None = None) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]: ...

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, data_loader: DataLoader | None = None,
             dataset_size: int | None = None, example_batch: Any = None, noised_input: InputSelector | None = None,
             logits: LogitsSelector | None = None) -> tuple[Any, ...]:
        """Install the guard on ``model`` and ``optimizer``; returns what to train with.

        Returns ``(model, optimizer)``, or ``(model, optimizer, data_loader)`` when ``data_loader``
        is given, as Opacus' ``make_private`` does. Without hybrid DP these are the objects given,
        protected in place. With hybrid DP (``GuardConfig(dp_noise_multiplier=...)``, which needs
        ``data_loader``) they are a GradSampleModule, a DPOptimizer and a Poisson-sampling loader;
        a step on the objects given raises. ``validate`` runs first and every problem it finds
        raises one UnsupportedModelError.

        Wrapping again (the same guard or a new one, e.g. every FL round) first removes the
        previous guard's hooks; a new guard takes over the previous one's masks, shadow and
        accountant. A guard wrapped onto another model leaves the first one.
        ``dataset_size`` (the images this client trains on per round; default the loader's
        dataset size) is needed by ``update_exponent``. ``noised_input`` picks the argument of
        forward to noise (default: the first tensor), ``logits`` the logits in its output
        (default: the output, the first element of a tuple, or a dict's "logits").
        """
        problems = self.validate(model, optimizer, example_batch, data_loader=data_loader,
                                 dataset_size=dataset_size, noised_input=noised_input, logits=logits)
        if problems:
            raise UnsupportedModelError("GradGuard cannot protect this training:\n  - " + "\n  - ".join(problems))
        cfg = self.config
        self.cleanup()  # a guard protects one model at a time
        previous = _GUARDS.get(model)
        if previous is not None:
            previous.cleanup()
            if previous is not self:
                self.masks, self.shadow, self.round = previous.masks, previous.shadow, previous.round
                self._shadow_state, self._shadow_dims = previous._shadow_state, previous._shadow_dims
                self._prior_sum, self._prior_ids, self._probed = previous._prior_sum, previous._prior_ids, \
                    previous._probed
                self._kept = previous._kept
                self._accountant = previous._accountant
        if dataset_size is None and data_loader is not None:
            dataset_size = len(data_loader.dataset)  # type: ignore[arg-type]
        self._dataset_size = dataset_size
        self._update_images = dataset_size if cfg.noise.update_exponent > 0 and dataset_size else 1
        self._noised_input, self._logits = noised_input, logits
        self._model, self._optimizer = model, optimizer
        self._device = self._device or next(model.parameters()).device
        # Copied now, before any hook is attached; each round loads the global weights into it.
        self._global_copy = _strip_hooks(model).eval()
        train: tuple[Any, ...] = (model, optimizer, data_loader)
        if cfg.dp.enabled:
            assert data_loader is not None and cfg.dp.noise_multiplier is not None  # validate checked both
            self._accountant = self._accountant or new_accountant(cfg.dp.accountant)
            self._dp = HybridDP.attach(model, optimizer, data_loader, noise_multiplier=cfg.dp.noise_multiplier,
                                       max_grad_norm=cfg.dp.max_grad_norm, delta=cfg.dp.delta,
                                       accountant=self._accountant, on_step=self._charged)
            self._handles += [self._dp.module.register_forward_pre_hook(lambda *_: self._set_dp_forward(True)),
                              self._dp.module.register_forward_hook(lambda *_: self._set_dp_forward(False))]
            train = (self._dp.module, self._dp.optimizer, self._dp.data_loader)
        self._handles.append(model.register_forward_pre_hook(self._protect, with_kwargs=True))
        self._batchnorms = tracked_batchnorms(model)
        if self._batchnorms and cfg.bn_statistics == "clean":
            self._handles.append(model.register_forward_hook(self._restore_batchnorm))
        if self._batchnorms and cfg.bn_statistics == "local" and cfg.update_kind == "delta" and cfg.noises_every_round:
            warnings.warn(_NO_SHARED_BATCHNORM, GradGuardWarning, stacklevel=2)
        if cfg.shadow.kind != "none":
            self._handles.append(final_linear(model)[1].register_forward_hook(self._capture_features))
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(optimizer.register_step_post_hook(self._after_step))
        _GUARDS[model] = self
        self._state = _RoundState()
        return train if data_loader is not None else train[:2]

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
        if not isinstance(t, int) or t < 0:
            raise ConfigError(f"begin_round(t) needs a round index >= 0, got {t!r}")
        self.round = t

    def set_sample_ids(self, ids: list[str], labels: torch.Tensor | None = None) -> None:
        """Name the samples of the next training forward (and optionally their classes).

        Without this, a sample's id is a hash of its bytes and its class is the global model's
        prediction.
        """
        self._pending_ids = [str(i) for i in ids]
        self._pending_labels = labels

    def epsilon(self, delta: float | None = None) -> float | None:
        """Hybrid DP's epsilon at ``delta`` (default ``config.dp.delta``) over every DP step this guard
        and the guards it took over have taken, all rounds together; None without hybrid DP."""
        if not self.config.dp.enabled:
            return None
        if self._accountant is None:
            return 0.0
        return epsilon(self._accountant, self.config.dp.delta if delta is None else delta)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The guard's state as named CPU tensors, integers as int64 scalars (safetensors can save it;
        no pickle): the per-sample masks and their refresh steps, the shadow, the round, the step
        count, hybrid DP's accountant history, and calibration's prior (the sum and ids of the images
        seen), last probe and the few clean images its probe mixes into a delta's gradient: keep it
        on the client. The noise seed is not part of it."""
        out = {"round": torch.tensor(self.round), "total_steps": torch.tensor(self.total_steps)}
        for sid, mask in self.masks.masks.items():
            out[f"masks.{sid}"] = mask.detach().cpu().contiguous()
            out[f"refreshed_at.{sid}"] = torch.tensor(self.masks.refreshed_at[sid])
        shadow = dict(self._shadow_state or {})
        if self.shadow is not None and self._shadow_dims is not None:
            shadow = {**self.shadow.state_dict(), "dims": self._shadow_dims}
        out.update({f"shadow.{k}": v.contiguous() for k, v in shadow.items()})
        if self._accountant is not None and self._accountant.history:
            # One row per (noise multiplier, sample rate, steps) the accountant was charged.
            out["accountant.history"] = torch.tensor(self._accountant.history, dtype=torch.float64)
        if self._prior_sum is not None:
            out["prior.sum"] = self._prior_sum.detach().cpu().contiguous()
            out.update(_encoded_ids("prior", sorted(self._prior_ids)))
        if self._kept:
            out["kept.images"] = torch.stack([image for image, _ in self._kept.values()]).detach().cpu().contiguous()
            out["kept.labels"] = torch.tensor([label for _, label in self._kept.values()], dtype=torch.int64)
            out.update(_encoded_ids("kept", list(self._kept)))
        if self._probed is not None:
            out["probe"] = torch.tensor(self._probed, dtype=torch.float64)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` saved, or a part of it (e.g. only the ``shadow.`` entries, to
        start from a pre-trained shadow). The shadow is rebuilt at its next use, on the model's device."""
        scalars = ("round", "total_steps", "accountant.history", "prior.sum", "prior.ids", "prior.id_lengths", "probe",
                   "kept.images", "kept.labels", "kept.ids", "kept.id_lengths")
        prefixes = ("masks.", "refreshed_at.", "shadow.")
        unknown = sorted(k for k in state if k not in scalars and not k.startswith(prefixes))
        if unknown:
            raise GradGuardError(f"not a GradGuard state: unexpected keys {unknown[:5]}; fix: pass guard.state_dict()")
        shadow = {k[len("shadow."):]: v for k, v in state.items() if k.startswith("shadow.")}
        if shadow and self.config.shadow.kind == "none":
            raise ConfigError("the state holds a shadow but this guard's config has shadow='none'; fix: build the "
                              "guard with the config the state was saved under")
        if "accountant.history" in state and (not self.config.dp.enabled or self._dp is not None):
            raise ConfigError("the state holds a DP accountant: load it into a guard with hybrid DP on "
                              "(dp_noise_multiplier set), before wrap()")
        if "round" in state:
            self.round = int(state["round"])
        if "total_steps" in state:
            self.total_steps = int(state["total_steps"])
        masks = {k[len("masks."):]: v for k, v in state.items() if k.startswith("masks.")}
        if masks:
            self.masks = mk.MaskStore(masks, {sid: int(state.get(f"refreshed_at.{sid}", 0)) for sid in masks})
        if shadow:
            self.shadow, self._shadow_state = None, shadow
        if "prior.sum" in state and "prior.ids" in state and "prior.id_lengths" in state:
            self._prior_ids = set(_decoded_ids(state, "prior"))
            self._prior_sum = state["prior.sum"].double()
        if "kept.images" in state and "kept.labels" in state and "kept.ids" in state and "kept.id_lengths" in state:
            kept_ids = _decoded_ids(state, "kept")
            if not len(kept_ids) == len(state["kept.images"]) == len(state["kept.labels"]):
                raise GradGuardError("not a GradGuard state: kept.ids, kept.images and kept.labels differ in "
                                     "length; fix: pass guard.state_dict()")
            self._kept = {sid: (image, int(label)) for sid, image, label
                          in zip(kept_ids, state["kept.images"], state["kept.labels"].tolist())}
        if "probe" in state:
            values = state["probe"].tolist()
            if len(values) != 5:
                raise GradGuardError("not a GradGuard state: probe holds (round, batch size, images mixed, "
                                     "fraction, estimate); fix: pass guard.state_dict()")
            r, batch, mixed, fraction, estimate = values
            self._probed = (int(r), int(batch), int(mixed), fraction, estimate)
        if "accountant.history" in state:
            self._accountant = new_accountant(self.config.dp.accountant)
            self._accountant.history = [(float(s), float(q), int(n))
                                        for s, q, n in state["accountant.history"].tolist()]

    @property
    def model(self) -> nn.Module | None:
        """The model ``wrap`` installed the guard on (None before ``wrap``)."""
        return self._model

    @property
    def noise_amplitude(self) -> float:
        """This round's scheduled noise amplitude w_t, before the batch and update scaling (the fixed
        rule; calibrated noise reports its amplitudes in ``protected_update().leakage``)."""
        return self._schedules()[0]

    # ------------------------------------------------------------------ the update
    def protected_update(self) -> ProtectedUpdate:
        """The update to share for this round; ends the round (the next forward starts a new one)."""
        state, model, cfg = self._state, self._model, self.config
        if model is None or state.global_weights is None or state.steps == 0:
            raise RuntimeError("no protected training step since wrap() or the last protected_update(): "
                               "train at least one step (model.train(), forward, backward, optimizer.step())")
        if self._dp is not None and state.dp_steps < state.steps:
            raise GradGuardError(f"{state.steps} protected steps but {state.dp_steps} DP-SGD steps were accounted, "
                                 "so no epsilon covers this update; fix: step only the optimizer wrap() returned")
        leakage = self._leakage() if cfg.calibration.enabled else None
        if leakage is not None and not leakage.met:
            missed = sum(p.psnr_db > leakage.target_db + _TARGET_TOLERANCE_DB for p in state.plans.values())
            problem = (f"{missed} of the round's {leakage.samples} samples would leak up to "
                       f"{leakage.psnr_above_prior_max:.2f} dB above the prior at the most noise allowed "
                       f"(max_amplitude={cfg.calibration.max_amplitude}), over the target of {leakage.target_db} dB")
            fix = "a larger max_amplitude, a larger leakage_target_db"
            if len(state.seen) < state.mixed:
                problem = (f"the probe took this update to mix {state.mixed} images (wrap's dataset_size="
                           f"{self._dataset_size}), but the round trained on {len(state.seen)}, so its estimate "
                           "does not hold")
                fix = "pass wrap(dataset_size=...) the images each round trains on"
            if cfg.calibration.on_target_missed == "raise":
                raise GradGuardError(f"{problem}, so the update is not returned; fix: {fix}, or "
                                     "on_target_missed='flag' to send it flagged")
            warnings.warn(f"{problem}: the update is flagged (update.leakage.met is False)", GradGuardWarning,
                          stacklevel=2)
        tensors = weight_delta(state.global_weights, model) if cfg.update_kind == "delta" else (state.gradient or {})
        if cfg.bn_statistics == "local" and cfg.update_kind == "delta" and self._round_noised(leakage):
            for name in self._batchnorms:
                for buffer in ("running_mean", "running_var"):
                    key = f"{name}.{buffer}" if name else buffer
                    tensors[key] = torch.zeros_like(tensors[key])
        update = ProtectedUpdate(
            tensors=tensors, kind=cfg.update_kind, num_samples=len(state.seen), num_steps=state.steps,
            round=self.round, client_id=self.client_id, batch_size=state.batch_size,
            learning_rate=float(self._optimizer.param_groups[0]["lr"]) if self._optimizer else None,
            epsilon=self.epsilon() if self._dp is not None else None,
            delta=cfg.dp.delta if self._dp is not None else None,
            metadata={"defense": "gradguard", "config": json.dumps(cfg.public_dict(), sort_keys=True)},
            leakage=leakage,
        )
        self.round += 1
        self._state = _RoundState()
        return update

    def _round_noised(self, leakage: LeakageEstimate | None) -> bool:
        """Whether some input of the round was trained on with noise: a calibrated sample with a
        non-zero amplitude, or a fixed rule at a non-zero amplitude (its masks have a floor)."""
        return leakage.noised_samples > 0 if leakage is not None else self._schedules()[0] > 0

    # ------------------------------------------------------------------ masks
    def _schedules(self) -> tuple[float, float]:
        cfg = self.config
        t = min(self.round, cfg.total_rounds)
        return (mk.noise_amplitude(t, cfg.total_rounds, base=cfg.noise.amplitude, growth=cfg.noise.growth),
                mk.relevance_weight(t, cfg.total_rounds, low=cfg.masks.relevance_weight_min,
                                    high=cfg.masks.relevance_weight_max))

    def _global_model(self) -> nn.Module:
        assert self._global_copy is not None and self._model is not None
        if not self._state.global_loaded:
            self._global_copy.load_state_dict(self._model.state_dict())
            self._state.global_loaded = True
        return self._global_copy

    def _maps(self, images: torch.Tensor, ids: list[str], labels: torch.Tensor | None, call: _Call,
              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vulnerability, relevance and the classes the relevance explains, for clean ``images``.

        One forward of the global model gives the logits, the features the shadow reads and, for
        Grad-CAM, the last convolution's activations; one backward gives Grad-CAM for the batch.
        """
        cfg, model = self.config, self._global_model()
        forward = _Logits(model, call, rows, self._logits)
        method = cfg.masks.relevance_method
        captured: dict[str, torch.Tensor] = {}

        def capture(name: str, value: torch.Tensor) -> None:  # a forward hook that returns None
            captured[name] = value

        hooks = []
        if cfg.shadow.kind != "none":
            hooks.append(final_linear(model)[1].register_forward_hook(
                lambda _m, a, _o: capture("features", a[0].detach())))
        if method == "gradcam":
            hooks.append(last_conv_layer(model, images.ndim - 2)[1].register_forward_hook(
                lambda _m, _a, out: capture("activations", out)))
        try:
            with torch.set_grad_enabled(method == "gradcam"):
                logits = forward(images)
        finally:
            for hook in hooks:
                hook.remove()
        predicted = logits.detach().argmax(dim=1)
        targets = labels.to(images.device) if labels is not None else predicted
        # Only the attribution may drop the label; the shadow plays an attacker, who sees the true class.
        explained = targets if cfg.masks.relevance_class == "label" else predicted
        ones = torch.ones_like(images[:, :1])
        relevance = ones * 0.0
        if method != "none":
            raw = to_pixels(gradcam_from(captured["activations"], logits.gather(1, explained[:, None]).sum()),
                            images) if method == "gradcam" else attribution(method, forward, images, explained)
            relevance_rule = mk.shadowdef_relevance_map if cfg.masks.combine == "subtract" else mk.relevance_map
            relevance = relevance_rule(raw, top_fraction=cfg.masks.relevance_top_fraction,
                                       temperature=cfg.masks.relevance_temperature)
        vulnerability = ones
        if cfg.shadow.kind != "none":
            shadow = self._ensure_shadow(images, captured["features"])
            error = shadow.error_map(ShadowInputs(images=images, features=captured["features"], model=forward,
                                                  targets=targets, ids=ids))
            if shadow.scored_against_prior:
                vulnerability = mk.recovery_map(error, per_pixel_error(self._priors(images), images),
                                                 sigma=cfg.noise.smoothness)
            else:
                rule = mk.shadowdef_vulnerability_map if cfg.masks.combine == "subtract" else mk.vulnerability_map
                vulnerability = rule(error, temperature=cfg.masks.vulnerability_temperature)
        return vulnerability, relevance, explained

    def _mask(self, vulnerability: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        cfg = self.config.masks
        return mk.combine(vulnerability, relevance, weight=self._schedules()[1], rule=cfg.combine,
                          floor=cfg.floor, normalization=cfg.normalization)

    def _ensure_shadow(self, images: torch.Tensor, features: torch.Tensor) -> Shadow:
        if self.shadow is None:
            cfg = self.config.shadow
            dims = torch.tensor([features.flatten(1).shape[1], *images.shape[1:]])
            if self._shadow_state is not None and not torch.equal(self._shadow_state["dims"], dims):
                raise UnsupportedModelError(
                    f"the loaded shadow was trained on features and images of sizes "
                    f"{self._shadow_state['dims'].tolist()}, this model gives {dims.tolist()}; fix: load a shadow "
                    "trained with the same architecture and image size, or start without one")
            self.shadow = build_shadow(cfg.kind, feature_dim=int(dims[0]), image_shape=tuple(images.shape[1:]),
                                       width=cfg.width, lr=cfg.lr, steps=cfg.steps_per_batch,
                                       device=images.device, dtype=images.dtype, seed=self.seed)
            if self._shadow_state is not None:
                self.shadow.load_state_dict(self._shadow_state)
                self._shadow_state = None
            self._shadow_dims = dims
        return self.shadow

    def _noise_like(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Unit-variance noise per pixel (or ones for ``kind="mask"``), from ``generator`` or the guard's."""
        kind = self.config.noise.kind
        if kind == "mask":
            return torch.ones_like(images)
        if generator is None:
            if self._noise is None or self._noise.device != images.device:
                self._noise = torch.Generator(device=images.device).manual_seed(self.seed)
            generator = self._noise
        if kind == "uniform":
            # Uniform on [-sqrt(3), sqrt(3)] has unit variance, like the Gaussian.
            u = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            return (2 * u - 1) * 3 ** 0.5
        white = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        if kind == "smooth":
            return mk.low_pass_noise(white, sigma=self.config.noise.smoothness)
        return white

    def noised(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x + w_t B^(-batch_exponent) N^(-update_exponent) max|x| M (noise), B = len(images), N the
        images of the update: the training hook's rule. With rms-normalised masks, M (noise) is
        rescaled to unit root-mean-square per image, so the amplitude fixes each image's noise energy."""
        cfg = self.config.noise
        amplitude = mk.averaged_amplitude(
            mk.averaged_amplitude(self._schedules()[0], len(images), exponent=cfg.batch_exponent),
            self._update_images, exponent=cfg.update_exponent)
        scale = mk.per_sample(images.detach().flatten(1).abs().amax(dim=1), images)
        perturbation = mask * self._noise_like(images)
        if self.config.masks.normalization == "rms":
            # The realised noise, not only its expectation, has unit mean square per image: a
            # mask and its untargeted twin then inject the same energy from the same draws.
            perturbation = mk.normalize(perturbation, "rms")
        return images + amplitude * scale * perturbation

    def explain(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> MaskExplanation:
        """The maps GradGuard would use for ``images`` now (a model called as ``model(images)``),
        without changing any state. Under calibration, ``noised`` is the noise a leaking sample gets
        (each image's prior: the mean of the batch's other images), the probe left out."""
        if self._model is None:
            raise RuntimeError("wrap() a model first")
        images = images.to(self._device)
        problem = image_problem(images)
        if problem is not None:
            raise UnsupportedModelError(f"explain(images): {problem}")
        ids = mk.sample_ids(images)
        created = not self._state.global_loaded
        vulnerability, relevance, targets = self._maps(images, ids, labels, _Call((images,), {}, 0))
        mask = self._mask(vulnerability, relevance)
        if created:
            self._state.global_loaded = False  # explain() must not pin this round's global model
        if self.config.calibration.enabled:
            others = len(images) - 1
            prior = (images.sum(dim=0, keepdim=True) - images) / others if others else self._flat_prior(images)
            sigma = self._calibrated_sigma(images, prior, self._spectrum(images))
            noised = images + mk.per_sample(sigma, images) * mk.normalize(self._noise_like(images), "rms")
        else:
            noised = self.noised(images, mask)
        return MaskExplanation(vulnerability.cpu(), relevance.cpu(), mask.cpu(), noised.detach().cpu(),
                               targets.cpu())

    # ------------------------------------------------------------------ hooks
    def _set_dp_forward(self, inside: bool) -> None:
        self._dp_forward = inside

    def _charged(self) -> None:
        self._dp_step = True
        self._state.dp_steps += 1

    def _protect(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self._clean_pass or not module.training:
            return None
        if self._dp is not None and not self._dp_forward:
            raise GradGuardError("hybrid DP is on: train the model wrap() returned (a GradSampleModule); the one "
                                 "given to wrap() would train without per-sample clipping; fix: model, optimizer, "
                                 "loader = guard.wrap(model, optimizer, data_loader=loader)")
        call = _Call(args, kwargs, input_slot(module, args, kwargs, self._noised_input))
        images = call.images
        problem = image_problem(images)
        if problem is not None:
            raise UnsupportedModelError(f"{problem} (or call guard.cleanup() for forwards that are not training)")
        if len(images) == 0:  # an empty Poisson batch: nothing to noise
            return None
        state = self._state
        if state.global_weights is None:  # first training forward of the round: the global model
            state.global_weights = snapshot(module)
        ids = self._pending_ids or mk.sample_ids(images)
        labels, self._pending_ids, self._pending_labels = self._pending_labels, None, None
        if len(ids) != len(images):
            raise ValueError(f"set_sample_ids() named {len(ids)} samples but the batch has {len(images)}")
        state.seen.update(ids)
        if self._dataset_size is not None and len(state.seen) > self._dataset_size:
            raise ConfigError(f"wrap(dataset_size={self._dataset_size}) but this round trained on {len(state.seen)} "
                              "distinct samples (told apart by guard.set_sample_ids, else by content); fix: pass "
                              "the number of images the client trains on per round")
        state.batch_size = max(state.batch_size, len(ids))
        self._batch = (images.detach(), None)
        if self.config.calibration.enabled:
            noised = self._calibrated(images, ids, labels, call)
        else:
            noised = self._masked(images, ids, labels, call)
        if self._batchnorms and self.config.bn_statistics == "clean":
            self._clean_batchnorm_statistics(module, args, kwargs)
        return call.with_images(noised)

    def _masked(self, images: torch.Tensor, ids: list[str], labels: torch.Tensor | None, call: _Call
                ) -> torch.Tensor:
        """The fixed-amplitude rule: each sample noised through its mask, refreshed every k steps."""
        refresh_all = self.total_steps % self.config.masks.refresh_every == 0
        stale = [i for i, sid in enumerate(ids) if refresh_all or sid not in self.masks]
        if stale:
            kind = self.config.shadow.kind  # every image is stale when first seen, so none is missed here
            if kind != "none" and getattr(SHADOWS.lookup(kind), "scored_against_prior", False):
                self._observe(images, ids, labels)  # the attack's prior: the mean of the other images seen
            rows = None if len(stale) == len(ids) else torch.tensor(stale, device=images.device)
            with torch.enable_grad():
                v, r, _ = self._maps(images.detach() if rows is None else images[rows].detach(),
                                     [ids[i] for i in stale], None if labels is None else labels[stale], call, rows)
            self.masks.update([ids[i] for i in stale], self._mask(v, r), momentum=self.config.masks.momentum,
                              step=self.total_steps)
        return self.noised(images, self.masks.stack(ids, images))

    # ------------------------------------------------------------------ calibrated noise
    def set_prior(self, image: torch.Tensor | None) -> None:
        """The attacker's prior guess, e.g. the mean image of public data of the modality ([C, H, W]);
        None (the default) uses the mean of the other images this guard has seen, or each image's
        own mean intensity while it has seen no other. A poorer prior than the attacker's makes the
        estimates higher, never lower."""
        if image is not None and (not torch.is_tensor(image) or not image.is_floating_point()
                                  or not bool(torch.isfinite(image).all())):
            raise ConfigError("set_prior(image) takes a finite floating-point image [C, H, W] (or None)")
        self._prior = None if image is None else image.detach()

    def _observe(self, images: torch.Tensor, ids: list[str], labels: torch.Tensor | None) -> None:
        fresh = [i for i, sid in enumerate(ids) if sid not in self._prior_ids]
        if not fresh:
            return
        for i in fresh[:max(0, PROBE_MIX_IMAGES - len(self._kept))]:
            self._kept[ids[i]] = (images[i].detach().clone(), -1 if labels is None else int(labels[i]))
        total = images[fresh].detach().double().sum(dim=0)
        self._prior_sum = total if self._prior_sum is None else self._prior_sum.to(total.device) + total
        self._prior_ids.update(ids[i] for i in fresh)

    def _priors(self, images: torch.Tensor) -> torch.Tensor:
        """Each image's prior: set_prior's, else the mean of the other images seen (leave-one-out)."""
        if self._prior is not None:
            if self._prior.shape != images.shape[1:]:
                raise UnsupportedModelError(f"set_prior() gave an image of shape {list(self._prior.shape)} but the "
                                            f"training images are {list(images.shape[1:])}")
            return self._prior.to(images).expand_as(images)
        others = len(self._prior_ids) - 1
        if others < 1 or self._prior_sum is None:
            return self._flat_prior(images)
        return ((self._prior_sum.to(images.device)[None] - images.double()) / others).to(images.dtype)

    @staticmethod
    def _flat_prior(images: torch.Tensor) -> torch.Tensor:
        """Each image's own mean intensity per channel: the prior while no other image is known."""
        return images.mean(dim=tuple(range(2, images.ndim)), keepdim=True).expand_as(images)

    def _calibrated_sigma(self, images: torch.Tensor, prior: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        """Per image, the least noise (std per pixel) whose bound meets the target, at most max_amplitude."""
        cal = self.config.calibration
        assert cal.leakage_target_db is not None
        return bound.calibrate_sigma(images.detach(), prior, target_db=cal.leakage_target_db, spectrum=spectrum,
                                     max_sigma=cal.max_amplitude * _scale(images))

    def _spectrum(self, images: torch.Tensor) -> torch.Tensor:
        return bound.noise_spectrum(images, kind=self.config.noise.kind, smoothness=self.config.noise.smoothness)

    def _sample_noise(self, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Unit-RMS noise per image from each sample's own seed: the same draw at every view."""
        draws = []
        for image, seed in zip(images, seeds):
            generator = torch.Generator(device=images.device).manual_seed(seed)
            draws.append(self._noise_like(image[None], generator))
        return mk.normalize(torch.cat(draws), "rms")

    def _probe(self, shared: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, call: _Call,
               prior: torch.Tensor, *, stop_above: float) -> float:
        """The honest server's attack on the gradient of ``shared`` (the batch as trained on) at the
        global weights, scored against the clean ``images``: the worst sample's dB above the prior
        (or the first score above ``stop_above`` it reaches)."""
        model = self._global_model().train()
        try:
            leak = gradient_probe(model, _Logits(model, call, None, self._logits), images.detach(), labels, prior,
                                  steps=self.config.calibration.probe_steps, shared=shared.detach(),
                                  seed=derive_seed(self.seed, "probe", self.round), stop_above=stop_above)
        finally:
            model.eval()
        return float(leak.max())

    def _exposed(self, images: torch.Tensor, labels: torch.Tensor, call: _Call, prior: torch.Tensor) -> float:
        """What the clean gradient of the batch at the global weights hands over exactly: the worst
        sample's dB above the prior of the inputs read from the rows of every biased Linear layer
        that takes the flattened image (-inf when there is none)."""
        model = self._global_model().train()
        layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None
                  and m.in_features == images[0].numel() and m.weight.requires_grad and m.bias.requires_grad}
        if not layers:
            return -math.inf
        try:
            with buffers_kept(model), torch.enable_grad():
                loss = nn.functional.cross_entropy(_Logits(model, call, None, self._logits)(images.detach()), labels)
                params = [p for m in layers.values() for p in (m.weight, m.bias)]
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            model.eval()
        worst = -math.inf
        for i, layer in enumerate(layers.values()):
            weight_grad, bias_grad = grads[2 * i], grads[2 * i + 1]
            if weight_grad is None or bias_grad is None:
                continue
            order = layer.bias.detach().argsort(descending=True)  # an imprint's thresholds, increasing
            rows = exact.linear_row_inputs(weight_grad[order], bias_grad[order])
            if len(rows):
                found = above_prior_db(rows.to(images.dtype).view(-1, *images.shape[1:]), images, prior)
                worst = max(worst, float(found.max()))
        return worst

    def _mix(self, ids: list[str], x: torch.Tensor) -> list[str]:
        """Ids of the kept images that the probe mixes with the batch ``x`` (named ``ids``): a delta
        mixes every image of the round, at least ``dataset_size`` of them (checked when the update is
        made); none for a gradient, or when the round's images are not known (hybrid DP's Poisson
        sampling draws an unknown number of them)."""
        if self.config.update_kind != "delta" or self._dataset_size is None or self._dp is not None:
            return []
        room = min(PROBE_MIX_IMAGES, self._dataset_size) - len(x)
        batch = set(ids)
        return [sid for sid, (image, _) in self._kept.items()
                if sid not in batch and image.shape == x.shape[1:]][:max(0, room)]

    def _honest_fraction(self, x: torch.Tensor, labels: torch.Tensor | None, call: _Call, prior: torch.Tensor,
                         sigma: torch.Tensor, noise: torch.Tensor, others: list[str]) -> tuple[float, float]:
        """The least fraction of the bound's noise (0, 1/8, 1/4, 1/2, else 1) at which the probe plus its
        margin meets the target, and the probe's estimate there (dB, margin included; inf at 1).

        The bound assumes the server recovers the noised inputs exactly, which an honest server
        inverting a gradient of several images does not: far less noise may leave its attack at the
        prior. A model with a layer that does recover them (an imprint) gets the bound's noise. The
        kept images ``others`` join the batch, noised as they would be this round.
        """
        target = self.config.calibration.leakage_target_db
        assert target is not None
        # The classes the server recovers (iDLG): the known ones, -1 where the guard was not told.
        classes = torch.full((len(x),), -1, device=x.device) if labels is None else labels.to(x.device)
        if others:
            extra = torch.stack([self._kept[sid][0] for sid in others]).to(x)
            extra_prior = self._priors(extra)
            sigma = torch.cat([sigma, self._calibrated_sigma(extra, extra_prior, self._spectrum(extra))])
            noise = torch.cat([noise, self._sample_noise(
                extra, [derive_seed(self.seed, "noise", self.round, sid) for sid in others])])
            x, prior = torch.cat([x, extra]), torch.cat([prior, extra_prior])
            classes = torch.cat([classes, torch.tensor([self._kept[sid][1] for sid in others], device=x.device)])
        if bool((classes < 0).any()):
            with torch.no_grad():
                predicted = _Logits(self._global_model(), call, None, self._logits)(x).argmax(dim=1)
            classes = torch.where(classes >= 0, classes, predicted)
        labels = classes
        # A layer that hands over its input hands over the noised input too: only the bound then holds.
        if self._exposed(x, labels, call, prior) > target:
            return 1.0, math.inf
        for fraction in PROBE_FRACTIONS:
            shared = x + fraction * mk.per_sample(sigma, x) * noise
            estimate = self._probe(shared, x, labels, call, prior, stop_above=target - PROBE_MARGIN_DB) \
                + PROBE_MARGIN_DB
            if estimate <= target:
                return fraction, estimate
        return 1.0, math.inf

    def _calibrated(self, images: torch.Tensor, ids: list[str], labels: torch.Tensor | None,
                    call: _Call) -> torch.Tensor:
        """Each sample plus its calibrated noise; planned when first seen in the round.

        The bound's noise protects against every attacker. Under the honest server the round's first
        batch is probed with fractions of it (every ``probe_every`` rounds), and every sample of the
        round gets the least fraction the probe finds enough: none at all when the clean update leaks nothing.
        """
        cal, state = self.config.calibration, self._state
        self._observe(images, ids, labels)
        new = [i for i, sid in enumerate(ids) if sid not in state.plans]
        if new:
            x = images[new].detach()
            prior, spectrum = self._priors(x), self._spectrum(x)
            seeds = [derive_seed(self.seed, "noise", self.round, ids[i]) for i in new]
            noise = self._sample_noise(x, seeds)
            full: torch.Tensor | None = None
            fraction, probed = 1.0, math.inf
            if cal.threat == "honest_server":
                if state.probe is None:
                    others = self._mix(ids, x)
                    # Leakage changes with the batch size and the mix at once, with the model slowly:
                    # re-probe on any of them.
                    if self._probed is None or self._probed[1:3] != (len(images), len(x) + len(others)) \
                            or not 0 <= self.round - self._probed[0] < cal.probe_every:
                        full = self._calibrated_sigma(x, prior, spectrum)
                        found = self._honest_fraction(x, None if labels is None else labels[new], call, prior,
                                                      full, noise, others)
                        self._probed = (self.round, len(images), len(x) + len(others), *found)
                    state.probe, state.mixed = self._probed[3:], self._probed[2]
                fraction, probed = state.probe
            if fraction == 0:  # the probe found the round harmless: no bound to solve
                sigma = torch.zeros(len(x), dtype=x.dtype, device=x.device)
            else:
                sigma = fraction * (full if full is not None else self._calibrated_sigma(x, prior, spectrum))
            noised = x + mk.per_sample(sigma, x) * noise
            psnr = bound.wiener_leakage_db(x, prior, sigma, spectrum=spectrum).clamp_max(probed)
            estimate = bound.wiener_estimate(noised, x, prior, sigma, spectrum=spectrum) if x.ndim == 4 else None
            ssim = self._ssim_above(x, prior, estimate)
            amplitude = sigma / _scale(x)
            for j, i in enumerate(new):
                state.plans[ids[i]] = _SamplePlan(amplitude=float(amplitude[j]), sigma=float(sigma[j]),
                                                  seed=seeds[j], psnr_db=float(psnr[j]), ssim_db=float(ssim[j]))
        plans = [state.plans[sid] for sid in ids]
        if not any(p.sigma for p in plans):  # nothing to add: skip drawing the noise on every step
            return images
        sigma = torch.tensor([p.sigma for p in plans], device=images.device, dtype=images.dtype)
        return images + mk.per_sample(sigma, images) * self._sample_noise(images, [p.seed for p in plans])

    @staticmethod
    def _ssim_above(images: torch.Tensor, prior: torch.Tensor, estimate: torch.Tensor | None) -> torch.Tensor:
        """SSIM of the bound's estimate minus the prior's (NaN for volumes, which SSIM here does not cover)."""
        if estimate is None:
            return torch.full((len(images),), math.nan)
        flat = images.flatten(1)
        data_range = (flat.amax(dim=1) - flat.amin(dim=1)).clamp_min(1e-12)
        return (bound.ssim(estimate, images, data_range=data_range)
                - bound.ssim(prior, images, data_range=data_range)).cpu()

    def _leakage(self) -> LeakageEstimate:
        cal, plans = self.config.calibration, list(self._state.plans.values())
        assert cal.leakage_target_db is not None
        psnr = [p.psnr_db for p in plans]
        ssim = [p.ssim_db for p in plans if not math.isnan(p.ssim_db)] or [math.nan]
        amplitude = [p.amplitude for p in plans]
        estimators = ("noised_input_bound",) + (("exact_recovery_check", "gradient_probe")
                                                if cal.threat == "honest_server" else ())
        return LeakageEstimate(
            threat=cal.threat, estimators=estimators, target_db=cal.leakage_target_db,
            psnr_above_prior_max=max(psnr), psnr_above_prior_mean=sum(psnr) / len(psnr),
            ssim_above_prior_max=max(ssim), ssim_above_prior_mean=sum(ssim) / len(ssim),
            amplitude_max=max(amplitude), amplitude_mean=sum(amplitude) / len(amplitude), samples=len(plans),
            noised_samples=sum(a > 0 for a in amplitude),
            # An update that mixes fewer images than its probe assumed is not covered by the estimate.
            met=max(psnr) <= cal.leakage_target_db + _TARGET_TOLERANCE_DB
            and len(self._state.seen) >= self._state.mixed)

    def _clean_batchnorm_statistics(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Running statistics from the clean batch; the noised forward then leaves them alone.

        Statistics of noised inputs would not match the clean images the model is tested on
        (measured: the global model collapsed to the majority class without this).
        """
        self._clean_pass = True
        try:
            with torch.no_grad():
                module(*args, **kwargs)
        finally:
            self._clean_pass = False
        self._frozen_bn = []
        for bn in self._batchnorms.values():
            tracked = bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None
            self._frozen_bn.append((bn.momentum, tracked))
            bn.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged

    def _restore_batchnorm(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        for bn, (momentum, tracked) in zip(self._batchnorms.values(), self._frozen_bn):
            bn.momentum = momentum
            if tracked is not None and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.copy_(tracked)
        self._frozen_bn = []

    def _capture_features(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if module.training and self._batch is not None and not self._clean_pass:
            self._batch = (self._batch[0], args[0].detach())

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._dp is not None:
            if not self._dp_step:
                raise GradGuardError("hybrid DP is on: step the optimizer wrap() returned (a DPOptimizer); the one "
                                     "given to wrap() would apply unclipped, unnoised gradients; fix: model, "
                                     "optimizer, loader = guard.wrap(model, optimizer, data_loader=loader)")
            self._dp_step = False
        if self._batch is None or self.config.update_kind != "gradient":
            return
        if self._state.gradient is not None:
            raise GradGuardError("update_kind='gradient' shares the gradient at the weights the round started from "
                                 "(FedSGD: one local step per round) and this is the round's second step; fix: call "
                                 "guard.protected_update() after every step, or use update_kind='delta'")
        assert self._model is not None
        self._state.gradient = {name: p.grad.detach().cpu().clone() for name, p in self._model.named_parameters()
                                if p.grad is not None}

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._batch is None:
            return
        self.total_steps += 1
        self._state.steps += 1
        images, features = self._batch
        if self.shadow is not None and features is not None and \
                self.total_steps % self.config.shadow.train_every == 0:
            self.shadow.observe(features, images)
        self._batch = None
