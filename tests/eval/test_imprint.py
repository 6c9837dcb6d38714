"""The malicious server's imprint attack recovers a client's inputs exactly, noised ones included.

Real PneumoniaMNIST images at 32 px; the server's thresholds come from the val split, the
clients' images from train. 40 dB is an RMS error of 1% of the range: no optimisation-based
attack in this suite gets near it, and the attacker's prior scores about 18 dB.
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from gradguard.calibration.exact import linear_row_inputs
from gradguard.calibration.probe import above_prior_db
from gradguard.eval.attacks import build_attack
from gradguard.eval.attacks.imprint import (ImprintConfig, ImprintedModel, brightness, brightness_thresholds,
                                            imprint_model, invert_imprint)
from gradguard.eval.datasets import ImageSet, load_medmnist
from gradguard.eval.defenses import build_defense
from gradguard.eval.metrics import pairwise_psnr
from gradguard.eval.models import ConvNet, SmallCNN
from gradguard.update import ProtectedUpdate

SHAPE = (1, 32, 32)
EXACT_DB = 40.0


def _pneumonia(split: str) -> ImageSet:
    return load_medmnist("pneumoniamnist", split)  # a clear DatasetError names the missing shared data


def _malicious(victim: str = "convnet") -> ImprintedModel:
    torch.manual_seed(0)
    model = ConvNet(1, 2) if victim == "convnet" else SmallCNN(1, 2, width=16)
    return imprint_model(model, public=_pneumonia("val").images)


def _update(model: ImprintedModel, images: Tensor, labels: Tensor, *, defense: str = "none",
            share: str = "gradient") -> ProtectedUpdate:
    return build_defense(defense, share=share).local_update(model, [(images, labels)], lr=0.1, round=0,
                                                           total_rounds=1, client_id="c0")


def _recover(model: ImprintedModel, update: ProtectedUpdate) -> Tensor:
    return build_attack("imprint", progress=False).reconstruct(model=model, update=update, image_shape=SHAPE,
                                                              num_classes=2).images


def _per_image_psnr(recovered: Tensor, originals: Tensor) -> Tensor:
    """Each original's PSNR against the recovered image closest to it."""
    return pairwise_psnr(recovered, originals).max(dim=0).values


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("victim, share", [("convnet", "gradient"), ("convnet", "delta"), ("smallcnn", "gradient"),
                                           ("smallcnn", "delta")])
def test_imprint_recovers_every_undefended_input_exactly(batch: int, victim: str, share: str) -> None:
    """Every image of the batch above 40 dB (measured: 100 dB, the PSNR cap, in every case), on
    the leaky victim and on the BatchNorm one."""
    train = _pneumonia("train")
    images, labels = train.images[:batch], train.labels[:batch]
    model = _malicious(victim)
    recovered = _recover(model, _update(model, images, labels, share=share))
    assert len(recovered) == batch
    per_image = _per_image_psnr(recovered, images)
    assert per_image.min() > EXACT_DB, per_image.tolist()


def test_against_input_noise_the_imprint_recovers_the_noised_input() -> None:
    """GradGuard's default noise: the attack reads the noised image the forward pass saw, to
    within 40 dB (measured: 100 dB), while that image is 13-14 dB from the clean one."""
    train = _pneumonia("train")
    images, labels = train.images[:4], train.labels[:4]
    model = _malicious()
    seen: list[Tensor] = []
    hook = model.imprint.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        update = _update(model, images, labels, defense="gradguard")
    finally:
        hook.remove()
    noised = seen[-1].clamp(0, 1)  # the reconstruction lives in [0, 1]
    recovered = _recover(model, update)
    assert _per_image_psnr(recovered, noised).min() > EXACT_DB
    clean_psnr = _per_image_psnr(noised, images)
    assert clean_psnr.max() < 35.0, "the defense added no noise to speak of"
    assert _per_image_psnr(recovered, images).max() <= clean_psnr.max() + 0.1


def test_the_honest_server_default_sees_an_imprint_and_noises_against_it() -> None:
    """The one-step FedAvg update of 8 images: the gradient-inversion probe finds nothing at this
    batch size, but the imprint reads every image; the guard's analytic check makes the round take
    the bound's noise, and what the imprint recovers stays within the report's estimate + 1 dB."""
    train = _pneumonia("train")
    images, labels = train.images[:8], train.labels[:8]
    model = _malicious()
    update = _update(model, images, labels, defense="gradguard", share="delta")
    report = update.leakage
    assert report is not None and "exact_recovery_check" in report.estimators
    assert report.noised_samples == 8 and report.met
    recovered = _recover(model, update)
    prior = (images.sum(dim=0, keepdim=True) - images) / (len(images) - 1)  # the guard's leave-one-out prior
    measured = float(above_prior_db(recovered.clamp(0, 1), images, prior).max())
    assert measured <= report.psnr_above_prior_max + 1.0, (measured, report.psnr_above_prior_max)


def test_linear_row_inputs_read_a_lone_sample_exactly() -> None:
    """A plain Linear layer at batch 1: every row with a gradient is the input itself."""
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(6, 3), torch.rand(1, 6)
    layer(x).square().sum().backward()
    rows = linear_row_inputs(layer.weight.grad, layer.bias.grad)
    torch.testing.assert_close(rows.float(), x.expand(len(rows), 6))


def test_imprint_separates_the_public_brightness_into_equal_bins() -> None:
    public = _pneumonia("val").images
    thresholds = brightness_thresholds(public, 16)
    counts = torch.bucketize(brightness(_pneumonia("test").images), thresholds).bincount(minlength=17)
    assert counts[0] == 0, "some image fires no bin"
    share = counts[1:].float() / counts.sum()
    assert share.min() > 0.25 / 16 and share.max() < 2.5 / 16  # equal mass per bin, held-out data


def test_invert_imprint_divides_neighbouring_bin_differences() -> None:
    """Two images in bins 1 and 3 of 4 (cumulative: bin i fires for both images above t_i)."""
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    ca, cb = 0.5, -2.0
    weight = torch.stack([ca * a + cb * b, ca * a + cb * b, cb * b, cb * b])
    bias = torch.tensor([ca + cb, ca + cb, cb, cb])
    got = invert_imprint(weight, bias, count=2)
    torch.testing.assert_close(got, torch.stack([a, b]))


def test_a_removed_imprint_gradient_reads_nothing() -> None:
    train = _pneumonia("train")
    model = _malicious()
    update = _update(model, train.images[:2], train.labels[:2])
    for name in ("imprint.bins.weight", "imprint.bins.bias"):
        update.tensors[name] = torch.zeros_like(update.tensors[name])
    result = build_attack("imprint", progress=False).reconstruct(model=model, update=update, image_shape=SHAPE,
                                                                num_classes=2)
    assert torch.equal(result.images, torch.zeros(1, *SHAPE)) and result.loss == 2.0


def test_imprint_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="bins"):
        ImprintConfig(bins=1)
    with pytest.raises(ValueError, match="distinct"):
        brightness_thresholds(torch.zeros(10, *SHAPE), 4)
    with pytest.raises(ValueError, match="imprint_model"):
        train = _pneumonia("train")
        victim = ConvNet(1, 2)
        build_attack("imprint").reconstruct(model=victim, update=_update(victim, train.images[:1], train.labels[:1]),
                                            image_shape=SHAPE, num_classes=2)
