import pytest
import torch
import torch.nn.functional as F
from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

from gradguard import GradGuard, GradGuardError, GuardConfig, UnsupportedModelError
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


def _dp_round(model, optimizer, loader):
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_hybrid_dp_samples_like_opacus_and_reports_its_accountants_epsilon(chest_batch):
    """The guard takes the DataLoader, samples it as the accountant assumes (Poisson) and charges the
    accountant what Opacus' own make_private charges on the same loader, over every round."""
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    images, labels = chest_batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4, shuffle=True)
    model = SmallCNN(1, 2, width=8, norm="group")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # A 25-step probe: it runs as the default's does (and must not touch the accountant), only shorter.
    guard = GradGuard(GuardConfig(dp_noise_multiplier=1.1, dp_max_grad_norm=1.0, dp_delta=1e-5, probe_steps=25))
    with pytest.raises(UnsupportedModelError, match="data_loader=loader"):
        guard.wrap(model, optimizer)  # fixed-size batches would make the reported epsilon wrong
    dp_model, dp_optimizer, dp_loader = guard.wrap(model, optimizer, data_loader=loader)
    assert dp_model is not model and isinstance(dp_loader, DPDataLoader)
    assert isinstance(dp_loader.batch_sampler, UniformWithReplacementSampler)
    assert dp_loader.batch_sampler.sample_rate == 4 / 16

    reference_model = SmallCNN(1, 2, width=8, norm="group")
    engine = PrivacyEngine(accountant="rdp")
    ref_model, ref_optimizer, ref_loader = engine.make_private(
        module=reference_model, optimizer=torch.optim.SGD(reference_model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.1, max_grad_norm=1.0)
    for _ in range(2):  # two rounds, re-wrapped: the guard's accountant spans them
        _dp_round(dp_model, dp_optimizer, dp_loader)
        _dp_round(ref_model, ref_optimizer, ref_loader)
        update = guard.protected_update()
        assert update.epsilon == pytest.approx(engine.get_epsilon(delta=1e-5), rel=1e-9)
        dp_model, dp_optimizer, dp_loader = guard.wrap(model, optimizer, data_loader=loader)
    assert guard.epsilon() == pytest.approx(engine.get_epsilon(delta=1e-5), rel=1e-9) and guard.epsilon() > 0
    assert engine.accountant.history == guard._accountant.history
    guard.cleanup()
    assert not model._forward_pre_hooks


def test_hybrid_dp_refuses_training_the_unwrapped_objects(chest_batch):
    """wrap's contract: with DP the returned objects train; stepping the originals raises at once."""
    images, labels = chest_batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    model = SmallCNN(1, 2, width=8, norm="group")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradGuard(GuardConfig(dp_noise_multiplier=1.0, probe_steps=25))  # a short probe, as above
    dp_model, dp_optimizer, _ = guard.wrap(model, optimizer, data_loader=loader)
    model.train()
    with pytest.raises(GradGuardError, match=r"train the model wrap\(\) returned"):
        model(images[:4])
    F.cross_entropy(dp_model(images[:4]), labels[:4]).backward()
    with pytest.raises(GradGuardError, match=r"step the optimizer wrap\(\) returned"):
        optimizer.step()
    with pytest.raises(RuntimeError, match="no protected training step"):
        guard.protected_update()  # nothing was earned: no epsilon to report
    dp_optimizer.step()
    assert guard.protected_update().epsilon > 0


def test_hybrid_dp_shows_none_of_the_warnings_it_causes(chest_batch):
    """Opacus' per-sample hooks make torch warn on every backward, and its RDP accountant about its
    alphas; neither says anything the user can act on."""
    import warnings

    images, labels = chest_batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    model = SmallCNN(1, 2, width=8, norm="group")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard = GradGuard(GuardConfig(dp_noise_multiplier=0.3, dp_delta=1e-9, probe_steps=25))
        dp_model, dp_optimizer, dp_loader = guard.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                       data_loader=loader)
        _dp_round(dp_model, dp_optimizer, dp_loader)
        assert guard.protected_update().epsilon > 0
