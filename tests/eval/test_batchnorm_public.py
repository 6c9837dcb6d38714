"""The federation benchmark's public-BatchNorm evaluation re-estimates statistics exactly and
touches nothing else."""
import numpy as np
import torch
from torch import nn

from gradguard.eval.bench.federation import batchnorm_reestimated


def test_statistics_are_the_public_images_and_the_model_is_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(4, 2, 8, 8) * 5 + 3)  # running statistics of other data (noised inputs, say)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(37, 2, 8, 8, dtype=torch.float32)
    public = batchnorm_reestimated(model, images, device=torch.device("cpu"))
    assert public is not None and not public.training
    x = images.double().numpy()
    np.testing.assert_allclose(public[0].running_mean.numpy(), x.mean(axis=(0, 2, 3)), rtol=1e-5)
    per_channel = x.transpose(1, 0, 2, 3).reshape(2, -1)
    np.testing.assert_allclose(public[0].running_var.numpy(), per_channel.var(axis=1, ddof=1), rtol=1e-5)
    # The second layer's statistics are those of its input at the first layer's new statistics.
    with torch.no_grad():
        hidden = public[1](public[0](images)).double().numpy()
    np.testing.assert_allclose(public[2].running_mean.numpy(), hidden.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    # Weights unchanged; the given model keeps its own statistics.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(public[1].weight, model[1].weight)
    assert not torch.allclose(public[0].running_mean, model[0].running_mean)


def test_a_model_without_batchnorm_has_nothing_to_reestimate():
    assert batchnorm_reestimated(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.rand(3, 1, 2, 2),
                                 device=torch.device("cpu")) is None
