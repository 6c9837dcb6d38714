import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

from gradguard import GradGuard, GuardConfig
from gradguard.eval.models import SmallCNN
from gradguard.guard import final_linear
from gradguard.per_sample import per_sample_gradients


def test_opacus_microbatch_check_passes_for_supported_layers(chest_batch):
    images, _ = chest_batch
    model = SmallCNN(1, 2, width=8, norm="group")
    assert check_per_sample_gradients_are_correct(images[:6], model, batch_first=True, atol=1e-5, rtol=1e-4)


def test_per_sample_gradients_match_microbatch_reference(chest_batch):
    images, labels = chest_batch
    model = SmallCNN(1, 2, width=8, norm="group")
    ours = per_sample_gradients(model, images[:5], labels[:5])
    # the micro-batch reference: one backward per sample
    params = dict(model.named_parameters())
    for i in range(5):
        grads = torch.autograd.grad(F.cross_entropy(model(images[i:i + 1]), labels[i:i + 1]), list(params.values()))
        for name, g in zip(params, grads):
            torch.testing.assert_close(ours[name][i], g, atol=1e-5, rtol=1e-4)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_last_layer_gradient_reveals_the_features_the_shadow_reads(chest_batch):
    """The shadow's input is what an attacker reads off the final Linear's per-sample gradient."""
    images, labels = chest_batch
    model = SmallCNN(1, 2, width=8, norm="group")
    captured = []
    final_linear(model)[1].register_forward_hook(lambda m, a, o: captured.append(a[0].detach()))
    grads = per_sample_gradients(model, images[:4], labels[:4])
    features = captured[-1]
    rows = grads["classifier.weight"][torch.arange(4), labels[:4]]  # g_i[y_i] * h_i
    bias = grads["classifier.bias"][torch.arange(4), labels[:4]]
    torch.testing.assert_close(rows / bias[:, None], features, atol=1e-4, rtol=1e-3)


def test_hybrid_dp_reports_the_opacus_accountant_epsilon(chest_batch):
    images, labels = chest_batch
    model = SmallCNN(1, 2, width=8, norm="group")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradGuard(GuardConfig(dp_noise_multiplier=1.1, dp_max_grad_norm=1.0, dp_delta=1e-5))
    dp_model, dp_optimizer = guard.wrap(model, optimizer, batch_size=4, dataset_size=16)
    assert dp_model is not model
    for s in range(4):
        dp_optimizer.zero_grad()
        F.cross_entropy(dp_model(images[4 * s:4 * s + 4]), labels[4 * s:4 * s + 4]).backward()
        dp_optimizer.step()
    update = guard.protected_update()
    reference = RDPAccountant()
    for _ in range(4):
        reference.step(noise_multiplier=1.1, sample_rate=4 / 16)
    assert update.epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    assert update.delta == 1e-5 and update.num_steps == 4
    # the next round (re-wrapped) keeps spending from the same budget
    dp_model, dp_optimizer = guard.wrap(model, optimizer, batch_size=4, dataset_size=16)
    for s in range(2):
        dp_optimizer.zero_grad()
        F.cross_entropy(dp_model(images[4 * s:4 * s + 4]), labels[4 * s:4 * s + 4]).backward()
        dp_optimizer.step()
    for _ in range(2):
        reference.step(noise_multiplier=1.1, sample_rate=4 / 16)
    assert guard.protected_update().epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    guard.cleanup()
    assert not model._forward_pre_hooks
