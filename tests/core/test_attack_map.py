"""The vulnerability map taken from the attack itself (shadow "gradient_attack")."""
import torch
from torch import nn

from gradguard import GradGuard, GuardConfig
from gradguard import masks as mk
from gradguard.calibration.probe import above_prior_db, recovered


def test_recovery_map_is_the_gain_over_the_prior_and_flat_where_nothing_is_recovered():
    prior_error = torch.full((2, 1, 2, 2), 0.5)
    error = torch.tensor([[[[0.1, 0.3], [0.5, 0.9]]], [[[0.5, 0.6], [0.7, 0.8]]]])
    # Gains 0.4, 0.2, 0, 0 (no better than the prior, or worse), peak 1; the second sample is
    # recovered nowhere, so no pixel needs the noise more than another.
    v = mk.recovery_map(error, prior_error, sigma=1e-3)
    torch.testing.assert_close(v[0, 0], torch.tensor([[1.0, 0.5], [0.0, 0.0]]))
    torch.testing.assert_close(v[1], torch.ones(1, 2, 2))
    # Blurred, the gain spreads to the neighbours and keeps its peak at 1.
    blurred = mk.recovery_map(error, prior_error, sigma=1.0)
    assert float(blurred[0, 0, 1, 1]) > 0 and float(blurred[0].max()) == 1.0


def test_recovered_is_the_estimate_the_probe_scores():
    images = torch.rand(3, 1, 8, 8)
    prior = images.mean(dim=0, keepdim=True).expand_as(images)
    # Estimates in another order than the images, one a rescaled copy (brightness and contrast
    # changed: the probe scores it after restoring them), the rest noise.
    noise = 0.05 * torch.randn(2, 1, 8, 8)
    estimates = torch.cat([torch.rand(4, 1, 8, 8), 0.5 * (images[2:3] + noise[:1]) + 0.2, images[0:1] + noise[1:]])
    best = recovered(estimates, images)
    alone = torch.stack([above_prior_db(best[i:i + 1], images[i:i + 1], prior[i:i + 1])[0] for i in range(3)])
    torch.testing.assert_close(alone, above_prior_db(estimates, images, prior))
    # The rescaled copy comes back at the image's brightness and contrast.
    torch.testing.assert_close(best[2], images[2] + noise[0], atol=0.05, rtol=0)


class _LeftHalf(nn.Module):
    """A conv net that sees only the image's left half: its gradient carries nothing of the right."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Sigmoid())
        self.classifier = nn.Linear(8 * 16 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros_like(x)
        keep[..., :8] = 1
        return self.classifier(self.features(x * keep).flatten(1))


def test_the_attack_map_puts_the_noise_where_the_attack_recovers_the_image():
    torch.manual_seed(0)
    # A smooth image: a bright disc off centre on a ramp.
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    images = (0.3 + 0.02 * cols + 0.5 * (((rows - 5) ** 2 + (cols - 4) ** 2) < 16).float())[None, None]
    labels = torch.tensor([1])
    model = _LeftHalf()
    guard = GradGuard(GuardConfig.preset("attack_targeted", relevance_method="none", shadow_steps_per_batch=300,
                                         mask_floor=0.0, seed=0))
    guard.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    explained = guard.explain(images, labels)
    left, right = explained.vulnerability[..., :8], explained.vulnerability[..., 8:]
    # The attack recovers the left half (its estimate beats the flat prior there) and cannot see the
    # right one, where its estimate is no better than a guess: no noise goes there, but for the
    # blur's spill over the border.
    assert float(left.mean()) > 0.2
    assert float(right.mean()) < 0.2 * float(left.mean())
    assert float(right[..., 4:].max()) < 0.05
    mask = explained.mask
    assert float(mask[..., :8].pow(2).mean()) > 5 * float(mask[..., 8:].pow(2).mean())
    torch.testing.assert_close(mask.pow(2).mean(), torch.tensor(1.0))  # the same energy as the uniform twin
