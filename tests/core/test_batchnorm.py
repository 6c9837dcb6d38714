"""The server's re-estimate of BatchNorm statistics from public images: exact statistics, nothing
else touched, and a clear error where there is nothing to re-estimate."""
import numpy as np
import pytest
import torch
from torch import nn

from gradguard import reestimate_batchnorm


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(4, 2, 8, 8) * 5 + 3)  # running statistics of other data (noised inputs, say)
    return model


def test_statistics_are_the_public_images_and_the_model_is_left_alone():
    model = _model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(37, 2, 8, 8, dtype=torch.float32)
    public = reestimate_batchnorm(model, images)
    assert not public.training and model.training
    x = images.double().numpy()
    np.testing.assert_allclose(public[0].running_mean.numpy(), x.mean(axis=(0, 2, 3)), rtol=1e-5)
    per_channel = x.transpose(1, 0, 2, 3).reshape(2, -1)
    np.testing.assert_allclose(public[0].running_var.numpy(), per_channel.var(axis=1, ddof=1), rtol=1e-5)
    # The second layer's statistics are those of its input at the first layer's new statistics.
    with torch.no_grad():
        hidden = public[1](public[0](images)).double().numpy()
    np.testing.assert_allclose(public[2].running_mean.numpy(), hidden.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    # Weights unchanged; the given model keeps its own statistics and its momentum.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(public[1].weight, model[1].weight) and public[0].momentum == model[0].momentum == 0.1
    assert not torch.allclose(public[0].running_mean, model[0].running_mean)


def test_batches_of_a_loader_average_their_statistics():
    images = torch.rand(40, 2, 8, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(40)), batch_size=10)
    public = reestimate_batchnorm(_model(), loader)
    x = images.double().numpy().reshape(4, 10, 2, 8, 8)
    np.testing.assert_allclose(public[0].running_mean.numpy(), x.mean(axis=(1, 3, 4)).mean(axis=0), rtol=1e-5)
    batch_vars = x.transpose(0, 2, 1, 3, 4).reshape(4, 2, -1).var(axis=2, ddof=1)
    np.testing.assert_allclose(public[0].running_var.numpy(), batch_vars.mean(axis=0), rtol=1e-5)


def test_a_model_without_batchnorm_has_nothing_to_reestimate():
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        reestimate_batchnorm(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.rand(3, 1, 2, 2))
