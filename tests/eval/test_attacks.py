"""Undefended, the attacks work: reconstructions against the true images, labels against the truth.

Iteration counts are small so the file runs in about a minute on a CPU; the configs' defaults
are the full-size settings. Updates come from the benchmark's own client (the "none" defense).
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache

import pytest
import torch
from torch import Tensor, nn

from gradguard.eval.attacks import ATTACKS, InvertingGradients, build_attack, register_attack
from gradguard.eval.attacks.bn_fedavg import _revealed_statistics
from gradguard.eval.attacks.objectives import simulated_gradient
from gradguard.eval.attacks.observation import observe
from gradguard.eval.datasets import ImageSet, data_dir, load_medmnist
from gradguard.eval.defenses import build_defense
from gradguard.eval.metrics import pairwise_psnr, psnr
from gradguard.eval.models import SmallCNN
from gradguard.update import ProtectedUpdate

SHAPE = (1, 32, 32)


@lru_cache(maxsize=2)
def _pneumonia(split: str) -> ImageSet:
    path = data_dir() / "pneumoniamnist.npz"
    assert path.is_file(), f"{path} is missing: the attack tests need the shared MedMNIST data (GRADGUARD_SHARED)"
    return load_medmnist("pneumoniamnist", split)


def _images(indices: list[int]) -> tuple[Tensor, Tensor]:
    data = _pneumonia("train")
    return data.images[indices], data.labels[indices]


def _update(model: nn.Module, images: Tensor, labels: Tensor, *, share: str = "gradient", steps: int = 1,
            lr: float = 0.1) -> ProtectedUpdate:
    """What an undefended client shares after ``steps`` SGD steps on one batch."""
    return build_defense("none", share=share).local_update(model, [(images, labels)] * steps, lr=lr, round=0,
                                                          total_rounds=1, client_id="c0")


def _leaky_cnn() -> nn.Module:
    """DLG's setting: three convs and a Linear head on the whole feature map. SmallCNN's 2x2
    average pool hides most of the image (IG reaches only about 20 dB on it undefended)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64 * 8 * 8, 2))


def _small_cnn(norm: str = "batch") -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(1, 2, width=16, norm=norm)


def _reconstruct(name: str, model: nn.Module, update: ProtectedUpdate, labels: Tensor | None = None, **overrides):
    attack = build_attack(name, progress=False, **overrides)
    return attack.reconstruct(model=model, update=update, image_shape=SHAPE, num_classes=2, labels=labels)


def _best_match(reconstruction: Tensor, originals: Tensor) -> float:
    """The paper's protocol: each reconstruction scored against its best-matching original."""
    return pairwise_psnr(reconstruction, originals).max(dim=1).values.mean().item()


# ---------------------------------------------------------------------------- the attacks work


@pytest.mark.parametrize("name, overrides", [
    ("inverting_gradients", {"iterations": 200, "restarts": 1, "lr": 0.03, "tv_weight": 3e-3}),
    ("dlg", {"iterations": 15, "restarts": 1}),
])
def test_attack_recovers_one_image_from_its_gradient(name: str, overrides: dict) -> None:
    images, labels = _images([0])
    model = _leaky_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _reconstruct(name, model, _update(model, images, labels), **overrides)
    assert result.images.shape == images.shape and 0 <= result.images.min() and result.images.max() <= 1
    assert psnr(result.images, images).item() >= 20.0
    assert result.labels.tolist() == labels.tolist()  # iDLG
    assert len(result.history) == overrides["iterations"] and result.loss < result.history[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the caller's model changed"


def test_idlg_recovers_the_label_of_one_image_of_either_class() -> None:
    labels_all = _pneumonia("train").labels
    indices = [*torch.nonzero(labels_all == 0)[:4, 0].tolist(), *torch.nonzero(labels_all == 1)[:4, 0].tolist()]
    model = _small_cnn()
    for index in indices:
        images, labels = _images([index])
        result = _reconstruct("dlg", model, _update(model, images, labels), iterations=0)
        assert result.labels.tolist() == labels.tolist(), f"image {index}"


@pytest.mark.parametrize("share, steps, allowed_misses", [("gradient", 1, 0), ("delta", 3, 1)])
def test_label_counts_of_a_batch_are_recovered(share: str, steps: int, allowed_misses: int) -> None:
    """Exact for a gradient; a 3-step delta only approximates the average gradient (39/40 measured)."""
    model = _small_cnn()
    generator = torch.Generator().manual_seed(0)
    misses = 0
    for _ in range(20):
        images, labels = _images(torch.randint(len(_pneumonia("train")), (4,), generator=generator).tolist())
        result = _reconstruct("dlg", model, _update(model, images, labels, share=share, steps=steps), iterations=0)
        misses += sorted(result.labels.tolist()) != sorted(labels.tolist())
    assert misses <= allowed_misses


def test_delta_reveals_the_batch_statistics_of_batchnorm() -> None:
    images, labels = _images([20, 21, 22, 23])
    model = _small_cnn()
    observation = observe(_small_cnn(), _update(model, images, labels, share="delta"), image_shape=SHAPE,
                          num_classes=2)
    revealed = _revealed_statistics(observation, "features.1", observation.model.features[1], steps=1)
    with torch.no_grad():
        first = model.features[0](images)
    torch.testing.assert_close(revealed.mean, first.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(revealed.var, first.var(dim=(0, 2, 3)), rtol=1e-3, atol=1e-5)


def test_replaying_the_local_steps_on_the_true_batch_gives_the_shared_delta() -> None:
    images, labels = _images([20, 21, 22, 23])
    model = _small_cnn()
    observation = observe(_small_cnn(), _update(model, images, labels, share="delta", steps=3), image_shape=SHAPE,
                          num_classes=2)
    replayed = simulated_gradient(observation, images, labels, steps=3)
    for got, want in zip(replayed, observation.target.values()):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    one_step = simulated_gradient(observation, images, labels)  # the FedAvg approximation is not exact
    assert not all(torch.allclose(g, w, rtol=1e-3, atol=1e-6) for g, w in zip(one_step, observation.target.values()))


def test_bn_aware_attack_beats_inverting_gradients_on_a_multistep_fedavg_delta() -> None:
    images, labels = _images([20, 21, 22, 23])
    model = _small_cnn()
    update = _update(model, images, labels, share="delta", steps=3)
    shared = {"iterations": 150, "restarts": 1, "lr": 0.1, "tv_weight": 0.1}
    plain = _reconstruct("inverting_gradients", model, update, labels, **shared)
    aware = _reconstruct("bn_fedavg", model, update, labels, **shared)
    assert _best_match(aware.images, images) >= _best_match(plain.images, images) + 1.0


def test_learned_decoder_beats_the_prior_mean_on_held_out_images() -> None:
    prior = _pneumonia("test").images  # the attacker's data: the public test split
    model = _small_cnn()
    attack = build_attack("learned_decoder", prior_images=prior, iterations=0, fit_steps=400, fit_batch=32,
                          progress=False)
    images, labels = _images(list(range(100, 106)))
    decoded = torch.cat([attack.reconstruct(model=model, update=_update(model, x[None], y[None]), image_shape=SHAPE,
                                            num_classes=2).images for x, y in zip(images, labels)])
    mean_image = prior.mean(dim=0, keepdim=True).expand_as(images)
    assert psnr(decoded, images).mean() >= psnr(mean_image, images).mean() + 1.0


def test_learned_decoder_refinement_moves_towards_the_images() -> None:
    """On a model without BatchNorm, the few IG steps after decoding gain (about 2 dB measured)."""
    model = _small_cnn(norm="none")
    attack = build_attack("learned_decoder", iterations=0, fit_steps=400, fit_batch=32, progress=False)
    attack.fit(model, _pneumonia("test").images)
    images, labels = _images(list(range(100, 104)))
    updates = [_update(model, x[None], y[None]) for x, y in zip(images, labels)]

    def attack_all() -> Tensor:
        return torch.cat([attack.reconstruct(model=model, update=u, image_shape=SHAPE, num_classes=2).images
                          for u in updates])

    decoded = attack_all()
    attack.config = dataclasses.replace(attack.config, iterations=200)  # the same fitted decoder, refined
    refined = attack_all()
    assert psnr(refined, images).mean() >= psnr(decoded, images).mean() + 1.0


# ---------------------------------------------------------------------------- interface


def test_registry_builds_every_attack_with_documented_defaults() -> None:
    assert set(ATTACKS) >= {"inverting_gradients", "dlg", "bn_fedavg", "learned_decoder"}
    for name, cls in ATTACKS.items():
        attack = build_attack(name, seed=3)
        assert isinstance(attack.config, cls.config_class) and attack.config.seed == 3
        assert cls.config_class.__doc__ and "full-size" in cls.config_class.__doc__
    with pytest.raises(KeyError, match="registered"):
        build_attack("nope")
    with pytest.raises(TypeError, match="no field"):
        build_attack("dlg", tv_weight=1.0)
    with pytest.raises(ValueError, match="restarts"):
        build_attack("dlg", restarts=0)
    with pytest.raises(ValueError, match="already registered"):
        register_attack(type("Twin", (InvertingGradients,), {"name": "inverting_gradients"}))


def test_restarts_are_seeded_and_the_lowest_loss_wins() -> None:
    images, labels = _images([0])
    model = _leaky_cnn()
    update = _update(model, images, labels)
    runs = [_reconstruct("inverting_gradients", model, update, iterations=5, restarts=1, seed=s) for s in (0, 1)]
    both = _reconstruct("inverting_gradients", model, update, iterations=5, restarts=2, seed=0)
    assert not torch.equal(runs[0].images, runs[1].images)
    assert both.loss == min(r.loss for r in runs)
    assert torch.equal(both.images, min(runs, key=lambda r: r.loss).images)


def test_bad_inputs_get_clear_errors() -> None:
    images, labels = _images([0, 1])
    model = _small_cnn()
    update = _update(model, images, labels, share="delta")
    with pytest.raises(ValueError, match="labels must have shape"):
        _reconstruct("inverting_gradients", model, update, labels[:1], iterations=1)
    with pytest.raises(ValueError, match="learning_rate"):
        _reconstruct("inverting_gradients", model, dataclasses.replace(update, learning_rate=None), iterations=1)
    with pytest.raises(ValueError, match="lacks"):
        _reconstruct("inverting_gradients", _leaky_cnn(), update, iterations=1)
    with pytest.raises(ValueError, match="prior_images"):
        _reconstruct("learned_decoder", model, update, iterations=1)
