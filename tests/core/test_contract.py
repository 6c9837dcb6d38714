"""What a new user meets: strict configuration, errors with their fix, any forward, saved state."""
import copy

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from gradguard import ConfigError, DPConfig, GradGuard, GradGuardError, GuardConfig, NoiseConfig, UnsupportedModelError
from gradguard.eval.models import SmallCNN
from gradguard.relevance import gradcam


def step(model, optimizer, x, y, *extra, **kwargs):
    optimizer.zero_grad()
    out = model(x, *extra, **kwargs)
    logits = out[0] if isinstance(out, tuple) else out["logits"] if isinstance(out, dict) else out
    F.cross_entropy(logits, y).backward()
    optimizer.step()


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize("field, value, hint", [
    ("noise_kind", "smoth", "did you mean 'smooth'"), ("combine", "Product", "did you mean 'product'"),
    ("update_kind", "grad", "did you mean 'gradient'"), ("relevance_class", "pred", "did you mean 'predicted'"),
    ("bn_statistics", "x", "choose one of"), ("dp_delta", 5.0, r"in \(0, 1\)"), ("shadow_width", 0, ">= 1"),
    ("relevance_method", "gradcm", "did you mean 'gradcam'"), ("shadow", "inverter", "'feature_inverter'"),
    ("total_rounds", "3", "must be int"), ("noise_amplitude", float("nan"), "finite"),
    ("noise_amplitud", 0.1, "did you mean 'noise_amplitude'"),
])
def test_every_field_is_validated_when_the_config_is_built(field, value, hint):
    with pytest.raises(ConfigError, match=hint):
        GuardConfig(**{field: value})


def test_config_is_grouped_and_keeps_the_flat_names():
    grouped = GuardConfig(noise=NoiseConfig(amplitude=0.2, kind="gaussian"), dp=DPConfig(noise_multiplier=1.0))
    assert grouped == GuardConfig(noise_amplitude=0.2, noise_kind="gaussian", dp_noise_multiplier=1.0)
    assert grouped.noise_amplitude == grouped.noise.amplitude == 0.2 and grouped.dp.enabled
    assert GuardConfig.preset("shadowdef", shadow="none").shadow.steps_per_batch == 5  # the rest of the group kept
    with pytest.raises(ConfigError, match="did you mean 'shadowdef'"):
        GuardConfig.preset("shadowdf")


# ---------------------------------------------------------------- validate and early errors
def test_validate_lists_every_problem_with_its_fix():
    model = SmallCNN(1, 2, width=8)
    other = SmallCNN(1, 2, width=8)
    guard = GradGuard(GuardConfig(update_exponent=0.5))
    problems = guard.validate(model, torch.optim.SGD(other.parameters(), lr=0.1),
                              torch.full((2, 1, 8, 8), float("nan")))
    assert len(problems) == 3 and all("fix:" in p for p in problems)
    assert [p.split(":")[0] for p in problems] == ["dataset_size", "optimizer", "example_batch"]
    assert GradGuard().validate(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.rand(2, 1, 8, 8)) == []


@pytest.mark.parametrize("model, optimizer, kwargs, match", [
    (lambda x: x, "sgd", {}, "model: expected a torch.nn.Module, got function"),
    ("state", "sgd", {}, "got OrderedDict; fix: pass a state_dict: build the model"),
    ("model", None, {}, "optimizer: expected a torch.optim.Optimizer, got NoneType"),
    ("model", "sgd", {"dataset_size": "64"}, "dataset_size: expected a positive int"),
    ("model", "sgd", {"dataset_size": 2.5}, "dataset_size: expected a positive int"),
    ("model", "other", {}, "parameters are not the model's"),
])
def test_wrong_arguments_fail_at_wrap_naming_the_argument(model, optimizer, kwargs, match):
    net = SmallCNN(1, 2, width=8)
    model = {"model": net, "state": net.state_dict()}.get(model, model) if isinstance(model, str) else model
    optimizer = {"sgd": torch.optim.SGD(net.parameters(), lr=0.1),
                 "other": torch.optim.SGD(SmallCNN(1, 2, width=8).parameters(), lr=0.1)}.get(optimizer)
    with pytest.raises(UnsupportedModelError, match=match):
        GradGuard().wrap(model, optimizer, **kwargs)


def test_errors_at_the_first_step():
    model = SmallCNN(1, 2, width=8).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradGuard()
    guard.wrap(model, optimizer, dataset_size=4)
    with pytest.raises(ConfigError, match="dataset_size=4.*8 distinct samples"):
        model(torch.rand(8, 1, 8, 8))
    guard.wrap(model, optimizer)
    bad = torch.rand(2, 1, 8, 8)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(UnsupportedModelError, match="NaN or infinite"):
        model(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no such device"):
            GradGuard(device="cuda")


def test_a_guard_wrapped_onto_a_second_model_leaves_the_first():
    first, second = SmallCNN(1, 2, width=8), SmallCNN(1, 2, width=8)
    guard = GradGuard()
    guard.wrap(first, torch.optim.SGD(first.parameters(), lr=0.1))
    guard.wrap(second, torch.optim.SGD(second.parameters(), lr=0.1))
    assert not first._forward_pre_hooks and len(second._forward_pre_hooks) == 1


# ---------------------------------------------------------------- models as users write them
class WithMeta(nn.Module):
    """forward(meta, img, scale=...) returning (logits, features)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 + 3, 2)

    def forward(self, meta, img, scale=1.0):
        features = torch.cat([self.conv(img).mean(dim=(2, 3)), meta], dim=1) * scale
        return self.head(features), features


def test_noised_input_by_name_extra_arguments_and_tuple_outputs():
    model = WithMeta().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    meta, images, labels = torch.rand(4, 3), torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    guard = GradGuard(GuardConfig(noise_kind="gaussian", threat="malicious_server", seed=0))
    guard.wrap(model, optimizer, noised_input="img", example_batch=(meta, images))
    seen = []
    model.conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    optimizer.zero_grad()
    F.cross_entropy(model(meta, img=images, scale=2.0)[0], labels).backward()
    optimizer.step()
    assert not torch.allclose(seen[-1], images)  # the images were noised, the metadata passed through
    assert guard.protected_update().num_samples == 4
    dict_model = WithMeta()
    dict_model.forward = lambda meta, img: {"logits": WithMeta.forward(dict_model, meta, img)[0]}
    assert GradGuard().validate(dict_model, torch.optim.SGD(dict_model.parameters(), lr=0.1), (meta, images),
                                noised_input=1) == []
    assert GradGuard().validate(model, optimizer, (meta, images), noised_input=1,
                                logits=lambda out: out[1][:, 0])[0].startswith("logits:")


@pytest.mark.parametrize("layout", ["float64", "channels_last", "volume"])
def test_any_floating_dtype_channels_last_and_3d_volumes(layout):
    torch.manual_seed(0)
    if layout == "volume":
        model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(2), nn.Flatten(),
                              nn.Linear(32, 2))
        images = torch.rand(4, 1, 8, 8, 8)
    else:
        model = SmallCNN(1, 2, width=8)
        images = torch.rand(4, 1, 16, 16)
    if layout == "float64":
        model, images = model.double(), images.double()
    if layout == "channels_last":
        model, images = model.to(memory_format=torch.channels_last), images.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradGuard(GuardConfig.preset("targeted", shadow_train_every=1))
    guard.wrap(model.train(), optimizer, example_batch=images)
    for _ in range(2):
        step(model, optimizer, images, torch.tensor([0, 1, 0, 1]))
    update = guard.protected_update()
    assert all(torch.isfinite(t).all() for t in update.tensors.values())
    masks = list(guard.masks.masks.values())
    assert masks[0].shape == (1, *images.shape[2:]) and masks[0].dtype == images.dtype


def test_gradcam_matches_captums():
    from captum.attr import LayerGradCam

    model = SmallCNN(1, 2, width=8).eval()
    images, targets = torch.rand(3, 1, 16, 16), torch.tensor([0, 1, 1])
    layer = model.features[6]
    ours = gradcam(model, layer, images, targets)
    theirs = LayerGradCam(model, layer).attribute(images, target=targets, relu_attributions=True)
    theirs = F.interpolate(theirs, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, theirs)


# ---------------------------------------------------------------- state, gradient, repr
def _trained_guard(images, labels, config=None):
    model = SmallCNN(1, 2, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradGuard(config or GuardConfig.preset("targeted", shadow_train_every=1, seed=0))
    guard.wrap(model.train(), optimizer)
    for s in range(2):
        step(model, optimizer, images[4 * s:4 * s + 4], labels[4 * s:4 * s + 4])
    guard.protected_update()
    return guard, model


def test_state_dict_round_trips_through_safetensors_and_the_shadow_loads_into_a_new_guard(chest_batch):
    images, labels = chest_batch
    guard, model = _trained_guard(images, labels)
    state = guard.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())
    restored = safetensors.torch.load(safetensors.torch.save(state))
    fresh = GradGuard(GuardConfig.preset("targeted", shadow_train_every=1, seed=0))
    fresh.load_state_dict(restored)
    assert (fresh.round, fresh.total_steps, len(fresh.masks)) == (1, 2, 8)
    # Only the shadow, handed to a new guard: its error maps are the trained shadow's.
    pretrained = GradGuard(GuardConfig.preset("targeted", seed=1))
    pretrained.load_state_dict({k: v for k, v in state.items() if k.startswith("shadow.")})
    clone = copy.deepcopy(model)
    pretrained.wrap(clone, torch.optim.SGD(clone.parameters(), lr=0.1))
    torch.testing.assert_close(pretrained.explain(images[:4]).vulnerability, guard.explain(images[:4]).vulnerability)
    with pytest.raises(GradGuardError, match="unexpected keys"):
        fresh.load_state_dict({"nope": torch.zeros(1)})


def test_flower_state_is_safetensors_not_pickle(chest_batch):
    pytest.importorskip("flwr")
    from gradguard.integrations.flower import _restore_guard, _save_guard

    images, labels = chest_batch
    guard, _ = _trained_guard(images, labels)
    data = _save_guard(guard)
    assert safetensors.torch.load(data).keys() == guard.state_dict().keys()
    other = GradGuard(GuardConfig.preset("targeted", shadow_train_every=1, seed=0))
    _restore_guard(other, data)
    assert other.masks.masks.keys() == guard.masks.masks.keys()


def test_gradient_update_is_the_gradient_at_the_rounds_start_weights(chest_batch):
    images, labels = chest_batch
    model = SmallCNN(1, 2, width=8, norm="group").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradGuard(GuardConfig.preset("targeted", update_kind="gradient", noise_kind="mask", seed=0))
    guard.wrap(model, optimizer)
    start = copy.deepcopy(model)  # GroupNorm: eval mode computes what train mode does, without the hooks
    seen = []
    model.features[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    step(model, optimizer, images[:4], labels[:4])
    optimizer.zero_grad(set_to_none=True)  # the user's loop may clear the gradients after the step
    update = guard.protected_update()
    expected = torch.autograd.grad(F.cross_entropy(start.eval()(seen[-1]), labels[:4]),
                                   list(start.parameters()))
    for (name, _), g in zip(start.named_parameters(), expected):
        torch.testing.assert_close(update.tensors[name], g, atol=1e-6, rtol=1e-5)
    step(model, optimizer, images[:4], labels[:4])
    with pytest.raises(GradGuardError, match="FedSGD"):
        step(model, optimizer, images[4:8], labels[4:8])


def test_protected_update_prints_briefly(chest_batch):
    images, labels = chest_batch
    model = SmallCNN(1, 2, width=8, norm="group")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # The malicious-server threat: a leakage report from the bound alone, without the probe's attack.
    guard = GradGuard(GuardConfig(threat="malicious_server"))
    guard.wrap(model.train(), optimizer)
    step(model, optimizer, images[:4], labels[:4])
    update = guard.protected_update()
    assert update.leakage is not None
    text = repr(update)
    assert text.startswith("ProtectedUpdate(kind='delta', round=0") and "MiB" in text and len(text) < 200
