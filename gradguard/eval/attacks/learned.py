"""A learned attack: a decoder from what the last layer's gradient reveals back to the image.

For a Linear head, the weight-gradient row of class c is mean_i((p_ic - y_ic) h_i): for one
image it is the image's feature vector h times a negative scalar (Geiping et al.'s and Fowl et
al.'s observation). The attacker trains a decoder h / |h| -> image on data it holds (e.g. the
public test split) with the global model of the round, decodes the revealed row of each label,
and refines the decoded images with a few Inverting Gradients steps (cf. Wu et al., "Learning
to invert", 2023). In a batch each row mixes the features of the whole batch, so images with
the same label decode alike and the refinement has to separate them.
"""
from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard.eval.attacks.base import register_attack
from gradguard.eval.attacks.inverting import InvertingConfig, InvertingGradients
from gradguard.eval.attacks.labels import last_linear
from gradguard.eval.attacks.observation import Observation
from gradguard.progress import progress_bar


@dataclass(kw_only=True)
class LearnedConfig(InvertingConfig):
    """The learned decoder attack; the Inverting Gradients fields drive the refinement.

    Defaults are the benchmark's full-size run.
    iterations=200, lr=0.01, tv_weight=3e-3: refinement steps from the decoded images (0 returns
        the decoder's output); the small step keeps the refinement near the decoded images.
    restarts=1: the refinement starts from the decoded images, so restarts repeat it.
    prior_images: the attacker's own images [N, C, H, W] in [0, 1]; the decoder is fitted on
        them for each model it attacks, unless ``fit`` was called for that model.
    fit_steps=3000, fit_batch=64, fit_lr=1e-3: the decoder's Adam training.
    decoder_width: channels of the decoder's last hidden block (twice that before it).
    """

    iterations: int = 200
    lr: float = 0.01
    tv_weight: float = 3e-3
    restarts: int = 1
    prior_images: Tensor | None = field(default=None, repr=False)
    fit_steps: int = 3000
    fit_batch: int = 64
    fit_lr: float = 1e-3
    decoder_width: int = 16


class FeatureDecoder(nn.Module):
    """Unit feature vector -> image in [0, 1]: a Linear layer to a quarter-size map, two
    upsampling conv blocks (cheap enough to fit on a CPU in seconds)."""

    def __init__(self, in_features: int, image_shape: tuple[int, int, int], width: int):
        super().__init__()
        channels, height, width_px = image_shape
        self.image_shape = image_shape
        self.start = (2 * width, math.ceil(height / 4), math.ceil(width_px / 4))
        self.project = nn.Linear(in_features, math.prod(self.start))
        self.blocks = nn.Sequential(
            nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, padding=1),
            nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, features: Tensor) -> Tensor:
        _, height, width_px = self.image_shape
        return torch.sigmoid(self.blocks(self.project(features).view(-1, *self.start))[..., :height, :width_px])


@register_attack
class LearnedDecoderAttack(InvertingGradients):
    name = "learned_decoder"
    config_class = LearnedConfig
    config: LearnedConfig

    def __init__(self, config: LearnedConfig | None = None, **overrides: object):
        super().__init__(config, **overrides)
        self._decoder: FeatureDecoder | None = None
        self._fitted_for: tuple[str, int, bool] | None = None

    def fit(self, model: nn.Module, images: Tensor, *, batch_size: int = 1,
            train_mode: bool = True) -> LearnedDecoderAttack:
        """Train the decoder for ``model`` on the attacker's ``images`` [N, C, H, W] in [0, 1].

        ``batch_size`` and ``train_mode`` must be the client's: in train mode BatchNorm makes an
        image's features depend on its batch.
        """
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self._fit(copy.deepcopy(model).to(self.config.device), images, batch_size, train_mode)
        self._fitted_for = _model_key(trainable, dict(model.named_buffers()), batch_size, train_mode)
        return self

    def _fit(self, model: nn.Module, images: Tensor, batch_size: int, train_mode: bool) -> None:
        if images.dim() != 4 or len(images) < batch_size:
            raise ValueError(f"images must be [N, C, H, W] with N >= batch_size={batch_size}, "
                             f"got {tuple(images.shape)}")
        cfg = self.config
        device = torch.device(cfg.device)
        generator = torch.Generator().manual_seed(cfg.seed)
        usable = len(images) - len(images) % batch_size  # whole batches only
        images = images[torch.randperm(len(images), generator=generator)[:usable]].to(device)
        features = F.normalize(_head_inputs(model.train(train_mode), images, batch_size), dim=1)
        with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the caller's RNG alone
            torch.manual_seed(cfg.seed)
            channels, height, width = images.shape[1:]
            decoder = FeatureDecoder(features.shape[1], (channels, height, width), cfg.decoder_width).to(device)
        optimizer = torch.optim.Adam(decoder.parameters(), lr=cfg.fit_lr)
        for _ in progress_bar(range(cfg.fit_steps), desc=f"{self.name} fit", enabled=cfg.progress, leave=False):
            batch = torch.randint(usable, (cfg.fit_batch,), generator=generator).to(device)
            loss = F.mse_loss(decoder(features[batch]), images[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self._decoder = decoder.eval()

    def _prepare(self, obs: Observation, labels: Tensor) -> None:
        key = _model_key(obs.params().items(), obs.global_buffers, obs.batch_size, obs.train_mode)
        if self._fitted_for != key:
            if self.config.prior_images is None:
                raise ValueError(f"{self.name} needs the attacker's images for this model: pass prior_images= "
                                 "in its config or call fit(model, images) first")
            # train-mode forwards may have moved obs.model's running statistics; they do not
            # change train-mode features, and eval-mode forwards leave them alone
            self._fit(obs.model, self.config.prior_images, obs.batch_size, obs.train_mode)
            self._fitted_for = key
        assert self._decoder is not None
        if tuple(self._decoder.image_shape) != tuple(obs.image_shape):
            raise ValueError(f"the decoder makes images of shape {self._decoder.image_shape}, "
                             f"the attack asks for {obs.image_shape}; fit it on images of that shape")
        name, _ = last_linear(obs.model)
        rows = -obs.target[f"{name}.weight"][labels]  # -(p - 1) h: the features' direction
        with torch.no_grad():
            self._decoded = self._decoder(F.normalize(rows, dim=1))

    def _initial_images(self, obs: Observation, labels: Tensor, generator: torch.Generator) -> Tensor:
        return self._decoded.clone()


def _head_inputs(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """The inputs of ``model``'s last Linear layer for ``images``, run in batches of ``batch_size``."""
    _, head = last_linear(model)
    features: list[Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _out: features.append(args[0].flatten(1)))
    try:
        with torch.no_grad():
            for chunk in images.split(batch_size):
                model(chunk)
    finally:
        handle.remove()
    return torch.cat(features)


def _model_key(params: Iterable[tuple[str, Tensor]], buffers: dict[str, Tensor], batch_size: int,
               train_mode: bool) -> tuple[str, int, bool]:
    """What the decoder depends on: the weights, the buffers in eval mode only (train-mode
    BatchNorm ignores its running statistics), the batch size and the mode."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in [*params, *(buffers.items() if not train_mode else ())]:
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest(), batch_size, train_mode
