"""breaching's own Inverting-Gradients attacker, a peer attack, leaks above the attacker's prior.

The setting where updates leak: an untrained ConvNet, one PneumoniaMNIST image at 32 px,
its FedSGD gradient. The prior is the attacker's best guess without the update, the mean
training image. breaching is an extra of its own (``gradguard[breaching]``, part of ``dev``):
without it these tests fail, saying how to install it.
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from gradguard.eval.attacks import build_attack
from gradguard.eval.attacks.breaching_ig import GreyFromRGB, import_breaching
from gradguard.eval.datasets import load_medmnist
from gradguard.eval.defenses import build_defense
from gradguard.eval.metrics import psnr
from gradguard.eval.models import ConvNet

SHAPE = (1, 32, 32)


def _victim() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(1, 2)


def test_breaching_beats_the_prior_on_a_fedsgd_batch1_update() -> None:
    """Measured at 200 steps: 40.8 dB against a prior of 19.1 dB on this image (+20 to +23 dB on
    the first three images)."""
    import_breaching()  # fails with the install command when breaching is missing
    train = load_medmnist("pneumoniamnist", "train")
    images, labels = train.images[:1], train.labels[:1]
    model = _victim()
    update = build_defense("none", share="gradient").local_update(model, [(images, labels)], lr=0.1, round=0,
                                                                  total_rounds=1, client_id="c0")
    result = build_attack("breaching_ig", iterations=200, progress=False).reconstruct(
        model=model, update=update, image_shape=SHAPE, num_classes=2)
    prior = psnr(train.images.mean(dim=0, keepdim=True), images).item()
    got = psnr(result.images, images).item()
    assert result.images.shape == images.shape and result.labels.tolist() == labels.tolist()
    assert got >= prior + 10.0, f"breaching {got:.2f} dB, prior {prior:.2f} dB"
    assert len(result.history) == 200 and result.loss < result.history[0]


def test_the_rgb_view_of_a_grey_victim_has_the_grey_gradient() -> None:
    """breaching's TV needs RGB: the view feeds the channel mean, so a replicated grey image
    gives the victim's own gradient."""
    model = _victim()
    grey = load_medmnist("pneumoniamnist", "val").images[:2]
    labels = torch.tensor([0, 1])
    direct = torch.autograd.grad(F.cross_entropy(model(grey), labels), list(model.parameters()))
    viewed = torch.autograd.grad(F.cross_entropy(GreyFromRGB(model)(grey.repeat(1, 3, 1, 1)), labels),
                                 list(model.parameters()))
    for a, b in zip(direct, viewed):
        torch.testing.assert_close(a, b)


def test_missing_breaching_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "breaching", None)  # import breaching now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "gradguard\[breaching\]"'):
        import_breaching()


def test_breaching_refuses_a_multistep_delta() -> None:
    train = load_medmnist("pneumoniamnist", "train")
    model = _victim()
    update = build_defense("none", share="delta").local_update(model, [(train.images[:1], train.labels[:1])] * 2,
                                                               lr=0.1, round=0, total_rounds=1, client_id="c0")
    with pytest.raises(ValueError, match="simulate_steps"):
        build_attack("breaching_ig", iterations=1).reconstruct(model=model, update=update, image_shape=SHAPE,
                                                               num_classes=2)
