import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradguard import GradGuard, GuardConfig, ProtectedUpdate, UnsupportedModelError
from gradguard.eval.models import SmallCNN, resnet18
from gradguard.guard import _GUARDS
from gradguard.masks import combine


def targeted(**fields):
    """The fixed-amplitude masks these tests exercise (the default calibrates instead)."""
    return GuardConfig.preset("targeted", **fields)


def train(model, optimizer, images, labels, steps=3, batch=4):
    model.train()
    for s in range(steps):
        x, y = images[s * batch:(s + 1) * batch], labels[s * batch:(s + 1) * batch]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def added_rms_ratio(noised, clean):
    """Per image: RMS of the added noise over max|x|, the amplitude the guard's rule sets."""
    return (noised - clean).flatten(1).pow(2).mean(1).sqrt() / clean.flatten(1).abs().amax(1)


def test_two_line_quickstart(chest_batch):
    images, labels = chest_batch
    model = SmallCNN(1, 2, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    start = copy.deepcopy(model.state_dict())
    # --- the README's quick start ---
    guard = GradGuard(targeted(refresh_every=2), client_id="hospital-a")
    model, optimizer = guard.wrap(model, optimizer)
    # --------------------------------
    train(model, optimizer, images, labels, steps=3)
    update = guard.protected_update()
    assert isinstance(update, ProtectedUpdate)
    assert (update.kind, update.num_steps, update.num_samples, update.batch_size) == ("delta", 3, 12, 4)
    assert update.client_id == "hospital-a" and update.learning_rate == pytest.approx(0.1)
    now = model.state_dict()
    for name, delta in update.tensors.items():
        torch.testing.assert_close(delta, now[name] - start[name])
    assert "features.1.running_mean" in update.tensors  # BatchNorm statistics travel too
    with pytest.raises(RuntimeError, match="no protected training step"):
        guard.protected_update()


def test_noise_only_in_training_forward(chest_batch):
    images, _ = chest_batch
    model = SmallCNN(1, 2, width=8)
    reference = copy.deepcopy(model)
    guard = GradGuard(targeted(noise_amplitude=0.3, noise_kind="gaussian", seed=0))
    model, _ = guard.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model.eval(), reference.eval()
    torch.testing.assert_close(model(images[:4]), reference(images[:4]))
    seen = []
    model.features[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model.train()
    model(images[:4])
    added = seen[-1] - images[:4]
    rms = added.flatten(1).pow(2).mean(1).sqrt()
    peak = images[:4].flatten(1).amax(1)
    # mask RMS is 1 and the noise has unit variance: added RMS ~ w * max|x| per image
    torch.testing.assert_close(rms / peak, torch.full_like(rms, 0.3), atol=0.05, rtol=0)


def test_batch_exponent_spends_the_noise_on_small_batches(chest_batch):
    images, _ = chest_batch
    model = SmallCNN(1, 2, width=8)
    # noise_kind="mask" adds w * max|x| * M with RMS(M) = 1, so the added RMS is exactly the amplitude
    guard = GradGuard(targeted(noise_amplitude=0.4, noise_kind="mask", batch_exponent=0.5, seed=0))
    model, _ = guard.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    seen = []
    model.features[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model.train()
    for batch, expected in ((images[:1], 0.4), (images[:4], 0.4 / 2), (images[:16], 0.4 / 4)):
        model(batch)
        ratio = added_rms_ratio(seen[-1], batch)
        torch.testing.assert_close(ratio, torch.full_like(ratio, expected))


def test_update_exponent_spends_the_noise_on_clients_that_share_few_images(chest_batch):
    images, labels = chest_batch
    model = SmallCNN(1, 2, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = targeted(noise_amplitude=0.4, noise_kind="mask", batch_exponent=0.5, update_exponent=0.5, seed=0)
    seen = []
    model.features[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model.train()
    # w B^-0.5 N^-0.5: the batch rule and the update rule multiply
    for batch_size, dataset_size, expected in ((1, 1, 0.4), (4, 4, 0.4 / 4), (1, 16, 0.4 / 4), (4, 64, 0.4 / 16)):
        guard = GradGuard(config)
        guard.wrap(model, optimizer, dataset_size=dataset_size)
        batch = images[:batch_size]
        model(batch)
        ratio = added_rms_ratio(seen[-1], batch)
        torch.testing.assert_close(ratio, torch.full_like(ratio, expected))
    # Without N the rule cannot apply: a clear error, and the guard already installed keeps working.
    with pytest.raises(ValueError, match="dataset_size"):
        GradGuard(config).wrap(model, optimizer)
    assert _GUARDS[model] is guard and len(model._forward_pre_hooks) == 1
    train(model, optimizer, images, labels, steps=1)
    assert guard.protected_update().num_steps == 1


def test_rewrapping_is_safe_and_cleanup_removes_every_hook(chest_batch):
    images, labels = chest_batch
    model = SmallCNN(1, 2, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = GradGuard(targeted(refresh_every=1))
    first.wrap(model, optimizer)
    train(model, optimizer, images, labels, steps=2)
    first.protected_update()
    first.wrap(model, optimizer)  # the same guard again
    second = GradGuard(targeted(refresh_every=1))
    second.wrap(model, optimizer)  # a new guard next round takes over
    assert len(model._forward_pre_hooks) == 1
    assert len(model.classifier._forward_hooks) == 1
    assert len(optimizer._optimizer_step_post_hooks) == 1
    assert second.masks is first.masks and len(second.masks) == 8 and second.round == 1
    train(model, optimizer, images, labels, steps=1)
    assert second.protected_update().round == 1
    second.cleanup()
    assert not model._forward_pre_hooks and not model.classifier._forward_hooks
    assert not optimizer._optimizer_step_post_hooks
    assert model not in _GUARDS


@pytest.mark.parametrize("kind", ["feature_inverter", "generator"])
def test_shadows_built_at_once_in_threads_keep_their_seeds(kind):
    # Clients in threads of one process (the demo's) build their shadows at the same moment; each
    # shadow's weights must come from its own seed, whatever the other threads do meanwhile.
    from concurrent.futures import ThreadPoolExecutor

    from gradguard.shadow import build_shadow

    def weights(seed: int) -> list[torch.Tensor]:
        shadow = build_shadow(kind, feature_dim=64, image_shape=(1, 16, 16), width=8, lr=1e-3, steps=1,
                              device=torch.device("cpu"), dtype=torch.float32, seed=seed)
        return [p.detach().clone() for p in shadow.net.parameters()]

    alone = [weights(seed) for seed in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(weights, [seed for _ in range(4) for seed in range(8)]))
    for i, built in enumerate(together):
        assert all(torch.equal(a, b) for a, b in zip(built, alone[i % 8]))


def test_deterministic_under_a_seed(chest_batch):
    images, labels = chest_batch

    def run(seed):
        torch.manual_seed(0)
        model = SmallCNN(1, 2, width=8)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        guard = GradGuard(targeted(seed=seed, refresh_every=1))
        guard.wrap(model, optimizer)
        train(model, optimizer, images, labels, steps=2)
        return guard.protected_update(), guard

    (a, guard_a), (b, _), (c, _) = run(1), run(1), run(2)
    for name in a.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name])
    assert any(not torch.allclose(a.tensors[n], c.tensors[n]) for n in a.tensors)
    masks = list(guard_a.masks.masks.values())
    assert not torch.allclose(masks[0], masks[1])  # sample-specific


def test_masks_follow_shadow_error_and_avoid_relevance(chest_batch):
    images, labels = chest_batch
    model = SmallCNN(1, 2, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradGuard(targeted(relevance_weight_min=0.9, relevance_weight_max=0.9))
    guard.wrap(model, optimizer)
    train(model, optimizer, images, labels, steps=4)
    explained = guard.explain(images[:8], labels[:8])
    m, v, r = explained.mask, explained.vulnerability, explained.relevance
    # the same vulnerability without relevance: the ratio shows what relevance took away
    spared = m / combine(v, torch.zeros_like(r), weight=0.9, rule="product", floor=0.1)
    for i in range(8):
        vulnerable = v[i] >= v[i].flatten().quantile(0.75)
        relevant = r[i] > 0
        assert m[i][vulnerable & ~relevant].mean() > m[i][~vulnerable & ~relevant].mean()
        assert spared[i][relevant].mean() < 0.8 * spared[i][~relevant].mean()
    assert not torch.allclose(m[0], m[1])


@pytest.mark.parametrize("relevance_class", ["label", "predicted"])
def test_relevance_explains_the_label_or_the_prediction(chest_batch, relevance_class):
    images, labels = chest_batch
    model = SmallCNN(1, 2, width=8).eval()
    predicted = model(images[:8]).argmax(1)
    flipped = 1 - predicted  # labels that disagree with the model everywhere
    guard = GradGuard(targeted(relevance_class=relevance_class, shadow="none"))
    guard.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    explained = guard.explain(images[:8], flipped)
    expected = flipped if relevance_class == "label" else predicted
    assert torch.equal(explained.targets, expected)


def test_resnet18_with_batchnorm(chest_batch):
    images, labels = chest_batch
    model = resnet18(in_channels=1, num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = GradGuard(GuardConfig(probe_steps=5))  # the default's 500-step probe took a minute here
    guard.wrap(model, optimizer)
    train(model, optimizer, images, labels, steps=2)
    update = guard.protected_update()
    assert "layer4.1.bn2.running_var" in update.tensors and "fc.weight" in update.tensors
    assert all(torch.isfinite(t).all() for t in update.tensors.values())


def test_unsupported_layers_are_named_with_the_fix():
    no_head = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UnsupportedModelError, match="nn.Linear.*fix"):
        GradGuard(targeted()).wrap(no_head, torch.optim.SGD(no_head.parameters(), lr=0.1))
    model = SmallCNN(1, 2, width=8, norm="batch")
    dp = GradGuard(GuardConfig(dp_noise_multiplier=1.0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(16, 1, 8, 8)), batch_size=4)
    with pytest.raises(UnsupportedModelError, match=r"features\.1 \(BatchNorm2d\)(.|\n)*ModuleValidator\.fix"):
        dp.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader)
    vector_model = nn.Sequential(nn.Linear(8, 2))
    guard = GradGuard(targeted(relevance_method="saliency"))
    guard.wrap(vector_model, torch.optim.SGD(vector_model.parameters(), lr=0.1))
    with pytest.raises(UnsupportedModelError, match=r"\[N, C, H, W\] or volumes"):
        vector_model(torch.randn(3, 8))


def test_gradient_update_kind(chest_batch):
    images, labels = chest_batch
    model = SmallCNN(1, 2, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradGuard(targeted(update_kind="gradient"))
    guard.wrap(model, optimizer)
    train(model, optimizer, images, labels, steps=1)
    update = guard.protected_update()
    assert update.kind == "gradient"
    for name, p in model.named_parameters():
        torch.testing.assert_close(update.tensors[name], p.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda(chest_batch):
    images, labels = chest_batch
    model = SmallCNN(1, 2, width=8).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradGuard()
    guard.wrap(model, optimizer)
    train(model, optimizer, images.cuda(), labels.cuda(), steps=2)
    update = guard.protected_update()
    assert all(t.device.type == "cpu" for t in update.tensors.values())


def test_noise_seed_is_secret_by_default_and_never_shared(chest_batch):
    images, labels = chest_batch
    updates = []
    for _ in range(2):
        torch.manual_seed(0)
        model = SmallCNN(1, 2, width=8)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        guard = GradGuard(targeted())  # no seed given
        guard.wrap(model, optimizer)
        train(model, optimizer, images, labels, steps=1)
        updates.append(guard.protected_update())
    assert not torch.allclose(updates[0].tensors["features.0.weight"], updates[1].tensors["features.0.weight"])
    for update in updates:
        assert "seed" not in json.loads(update.metadata["config"])


@pytest.mark.parametrize("mode", ["clean", "noised"])
def test_batchnorm_statistics_follow_the_configured_inputs(chest_batch, mode):
    images, labels = chest_batch
    torch.manual_seed(0)
    model = SmallCNN(1, 2, width=8)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: only BN buffers move
    guard = GradGuard(targeted(noise_amplitude=0.5, bn_statistics=mode, seed=0))
    guard.wrap(model, optimizer)
    train(model, optimizer, images, labels, steps=2)
    reference.train()
    with torch.no_grad():
        for s in range(2):
            reference(images[4 * s:4 * s + 4])  # running statistics of the clean batches
    clean = torch.allclose(model.features[1].running_var, reference.features[1].running_var, atol=1e-6)
    assert clean == (mode == "clean")
    assert model.features[1].num_batches_tracked.item() == 2
    assert model.features[1].momentum == 0.1
