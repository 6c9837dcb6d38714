"""Leakage metrics (PSNR, SSIM, LPIPS) on [0, 1] images under two matching protocols; utility.

Protocols for a client's reconstructions against its true images:
- ``best`` (the seed paper's and Hatamizadeh et al.'s): each reconstruction is scored against
  every image the client holds and keeps its best value, metric by metric; then averaged.
- ``strict``: reconstructions and true images are paired one to one by the assignment that
  maximises the total PSNR (``scipy.optimize.linear_sum_assignment``); each metric is then
  computed on those pairs and averaged.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity
from torch import Tensor

from gradguard.eval.datasets import shared_dir

if TYPE_CHECKING:
    from lpips import LPIPS  # untyped: its net, lins and L are unchecked

Protocol = Literal["best", "strict"]
PROTOCOLS: tuple[Protocol, ...] = ("best", "strict")
# PSNR of identical images is infinite; capping the MSE keeps means finite (100 dB).
_MIN_MSE = 1e-10
# lpips' AlexNet wrapper names torchvision's ``features.<i>`` layers ``slice<k>.<i>``.
_ALEX_SLICE_OF_LAYER = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


def _as_batch(images: Tensor, what: str) -> Tensor:
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"{what} must be [N, C, H, W] or [C, H, W] images, got shape {tuple(images.shape)}")
    return images.detach().float().cpu()


def _check_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a, b = _as_batch(a, "a"), _as_batch(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB of paired [0, 1] images, one value per pair ([N])."""
    a, b = _check_pair(a, b)
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(_MIN_MSE)
    return -10.0 * torch.log10(mse)


def pairwise_psnr(recon: Tensor, true: Tensor) -> Tensor:
    """PSNR of every reconstruction against every true image: [R, N]."""
    recon, true = _as_batch(recon, "recon"), _as_batch(true, "true")
    mse = torch.cdist(recon.flatten(1).double(), true.flatten(1).double()).pow(2) / recon[0].numel()
    return (-10.0 * torch.log10(mse.clamp_min(_MIN_MSE))).float()


def _ssim_one(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape[0] == 1:
        return float(structural_similarity(a[0], b[0], data_range=1.0))
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=0))


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Structural similarity (scikit-image, 7x7 window, data_range 1) of paired images: [N]."""
    a, b = _check_pair(a, b)
    return torch.tensor([_ssim_one(x, y) for x, y in zip(a.numpy(), b.numpy())])


def pairwise_ssim(recon: Tensor, true: Tensor) -> Tensor:
    """SSIM of every reconstruction against every true image: [R, N]."""
    recons, trues = _as_batch(recon, "recon").numpy(), _as_batch(true, "true").numpy()
    return torch.tensor([[_ssim_one(r, t) for t in trues] for r in recons])


class LPIPSMetric:
    """LPIPS(alex, v0.1) distance between [0, 1] images; lower means more alike.

    The AlexNet backbone comes from ``weights`` (a torchvision ``alexnet().features`` state
    dict), else from ``<shared>/weights/alexnet_features.pth`` when that file exists, else
    from torchvision's normal download. Grayscale images are repeated to 3 channels.
    """

    def __init__(self, *, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        import lpips  # eval extra

        path = Path(weights) if weights is not None else shared_dir() / "weights" / "alexnet_features.pth"
        if weights is not None and not path.is_file():
            raise FileNotFoundError(f"LPIPS backbone weights {path} not found; pass weights=None to download")
        offline = path.is_file()
        self.device = torch.device(device)
        with warnings.catch_warnings():  # lpips calls torchvision's deprecated ``pretrained=`` argument
            warnings.simplefilter("ignore", UserWarning)
            self.model: LPIPS = lpips.LPIPS(net="alex", version="0.1", pnet_rand=offline, verbose=False)
        if offline:
            self._load_backbone(path)
        self.model.eval().to(self.device)
        self.backbone_source = str(path) if offline else "torchvision download"

    def _load_backbone(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        renamed = {}
        for key, value in state.items():
            layer, _, field = key.partition(".")
            if int(layer) not in _ALEX_SLICE_OF_LAYER:
                raise ValueError(f"{path} has an unexpected key {key!r}; expected torchvision alexnet().features keys")
            renamed[f"slice{_ALEX_SLICE_OF_LAYER[int(layer)]}.{layer}.{field}"] = value
        self.model.net.load_state_dict(renamed, strict=True)

    def _prepare(self, images: Tensor, what: str) -> Tensor:
        images = _as_batch(images, what)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if images.shape[1] != 3:
            raise ValueError(f"LPIPS needs 1- or 3-channel images, {what} has {images.shape[1]}")
        return (images * 2 - 1).to(self.device)

    @torch.no_grad()
    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        """Distances of paired images: [N]."""
        a, b = _check_pair(a, b)
        return self.model(self._prepare(a, "a"), self._prepare(b, "b")).flatten().cpu()

    @torch.no_grad()
    def _features(self, images: Tensor, chunk: int) -> list[Tensor]:
        """lpips' unit-normalised backbone activations per layer, computed once per image."""
        import lpips

        parts = [self.model.net(self.model.scaling_layer(images[i:i + chunk])) for i in range(0, len(images), chunk)]
        return [lpips.normalize_tensor(torch.cat([p[k] for p in parts])) for k in range(self.model.L)]

    @torch.no_grad()
    def pairwise(self, recon: Tensor, true: Tensor, *, chunk: int = 256) -> Tensor:
        """Distances of every reconstruction to every true image: [R, N].

        The backbone runs once per image; the package's linear heads then score the pairs in
        chunks, exactly as ``lpips.LPIPS.forward`` scores one pair.
        """
        import lpips

        fr = self._features(self._prepare(recon, "recon"), chunk)
        ft = self._features(self._prepare(true, "true"), chunk)
        rows, cols = torch.meshgrid(torch.arange(len(fr[0])), torch.arange(len(ft[0])), indexing="ij")
        rows, cols = rows.flatten().to(self.device), cols.flatten().to(self.device)
        out = []
        for i in range(0, len(rows), chunk):
            r, c = rows[i:i + chunk], cols[i:i + chunk]
            out.append(sum(lpips.spatial_average(self.model.lins[k]((fr[k][r] - ft[k][c]) ** 2), keepdim=False)
                           for k in range(self.model.L)).flatten().cpu())
        return torch.cat(out).view(len(fr[0]), len(ft[0]))

def leakage(reconstructions: Tensor, originals: Tensor, *, lpips_metric: LPIPSMetric) -> dict[str, float]:
    """PSNR / SSIM / LPIPS of a client's reconstructions under both protocols.

    ``reconstructions`` [R, C, H, W] and ``originals`` [N, C, H, W] (the client's images; any
    R, N >= 1) are in [0, 1]. Keys are ``<metric>_<protocol>``, e.g. ``psnr_best``,
    ``lpips_strict``; ``strict`` pairs min(R, N) images.
    """
    recon, true = _as_batch(reconstructions, "reconstructions"), _as_batch(originals, "originals")
    if recon.shape[1:] != true.shape[1:]:
        raise ValueError(f"reconstructions {tuple(recon.shape[1:])} and originals {tuple(true.shape[1:])} "
                         "differ in image shape; resize the reconstructions to the data's size")
    table = {"psnr": pairwise_psnr(recon, true), "ssim": pairwise_ssim(recon, true),
             "lpips": lpips_metric.pairwise(recon, true)}
    rows, cols = linear_sum_assignment(table["psnr"].numpy(), maximize=True)
    result = {}
    for metric, values in table.items():
        best = values.min(dim=1).values if metric == "lpips" else values.max(dim=1).values
        result[f"{metric}_best"] = float(best.mean())
        result[f"{metric}_strict"] = float(values[rows, cols].mean())
    return result


def utility(y_true: Tensor | np.ndarray, y_pred: Tensor | np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, micro-F1 and macro-F1 of integer predictions.

    Micro-F1 equals accuracy for single-label tasks; macro-F1 averages the per-class F1 over
    all ``num_classes`` classes (a class never true nor predicted scores 0, as scikit-learn's
    ``zero_division=0`` does), so a model that collapses to the majority class is exposed.
    """
    true = np.asarray(y_true).reshape(-1).astype(np.int64)
    pred = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if true.shape != pred.shape or true.size == 0:
        raise ValueError(f"y_true and y_pred must be non-empty and equally long, got {true.size} and {pred.size}")
    if min(true.min(), pred.min()) < 0 or max(true.max(), pred.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); got values outside that range")
    confusion = np.bincount(true * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    tp = np.diag(confusion).astype(float)
    fp = confusion.sum(0) - tp
    fn = confusion.sum(1) - tp
    denom = 2 * tp + fp + fn
    per_class = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum())
    return {"accuracy": float(tp.sum() / true.size), "micro_f1": float(micro), "macro_f1": float(per_class.mean())}


# ---------------------------------------------------------------------------- the attacker's prior
def prior_guesses(public: Tensor, public_labels: Tensor, labels: Tensor, *, num_classes: int) -> dict[str, Tensor]:
    """The best guesses an attacker makes without any update, one image per reconstruction.

    ``public`` [M, C, H, W] are the attacker's own images of the same modality (``public_labels``
    [M] their classes), ``labels`` [R] the classes the attack recovered for its R images (iDLG).
    ``"mean"`` is R copies of the public mean image; ``"class_mean"`` gives each reconstruction
    the mean public image of its recovered class (the overall mean where a class has no public
    image).
    """
    if public.ndim != 4 or public_labels.shape != (len(public),):
        raise ValueError(f"public must be [M, C, H, W] with labels [M], got {tuple(public.shape)} and "
                         f"{tuple(public_labels.shape)}")
    mean = public.mean(dim=0)
    means = torch.stack([public[public_labels == c].mean(dim=0) if bool((public_labels == c).any()) else mean
                         for c in range(num_classes)])
    labels = labels.long().clamp(0, num_classes - 1)
    return {"mean": mean.expand(len(labels), *mean.shape).clone(), "class_mean": means[labels]}


def strongest_prior(scores: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]]:
    """The prior guess that scores best, metric by metric (highest PSNR and SSIM, lowest LPIPS),
    and the name of the one with the highest PSNR. ``scores`` maps guess name -> :func:`leakage`."""
    if not scores:
        raise ValueError("no prior guess was scored")
    best: dict[str, float] = {}
    for key in next(iter(scores.values())):
        values = [s[key] for s in scores.values()]
        best[key] = min(values) if key.startswith("lpips") else max(values)
    return max(scores, key=lambda name: scores[name]["psnr_best"]), best


def above_prior(attack: dict[str, float], prior: dict[str, float], *, protocol: Protocol = "best") -> dict[str, float]:
    """Leakage above the attacker's prior: the attack's PSNR and SSIM minus the prior's, and the
    prior's LPIPS minus the attack's (so for every metric, > 0 means the update told the attacker
    more than the guess it could make without it)."""
    return {"psnr": attack[f"psnr_{protocol}"] - prior[f"psnr_{protocol}"],
            "ssim": attack[f"ssim_{protocol}"] - prior[f"ssim_{protocol}"],
            "lpips": prior[f"lpips_{protocol}"] - attack[f"lpips_{protocol}"]}


def reidentification(reconstructions: Tensor, originals: Tensor, distractors: Tensor) -> float:
    """The fraction of the client's images that a reconstruction re-identifies, by SSIM.

    Reconstructions and the client's ``originals`` are paired one to one by the assignment that
    maximises total PSNR (the ``strict`` protocol); a pair counts when the reconstruction's
    nearest neighbour by SSIM in the gallery (``originals`` plus ``distractors``, images of the same
    split that the client does not hold) is its own original. Chance is
    :func:`reidentification_chance`.
    """
    recon, true = _as_batch(reconstructions, "reconstructions"), _as_batch(originals, "originals")
    gallery = torch.cat([true, _as_batch(distractors, "distractors")])
    rows, cols = linear_sum_assignment(pairwise_psnr(recon, true).numpy(), maximize=True)
    similarity = pairwise_ssim(recon[rows], gallery)
    return float((similarity.argmax(dim=1) == torch.as_tensor(cols)).float().mean())


def reidentification_chance(originals: int, distractors: int) -> float:
    """A guess's chance of naming the right image of a gallery of ``originals + distractors``."""
    return 1.0 / (originals + distractors)
