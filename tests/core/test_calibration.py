"""Calibrated noise: the bound, the per-sample amplitudes, the leakage estimate and what it covers."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from gradguard import GradGuard, GuardConfig
from gradguard.calibration import bound
from gradguard.calibration.probe import above_prior_db, gradient_probe
from gradguard.errors import ConfigError, GradGuardError, GradGuardWarning
from gradguard.eval.models import ConvNet, SmallCNN
from gradguard.masks import low_pass_noise
from gradguard.update import LeakageEstimate


def fedsgd(guard, model, images, labels, *, steps=1):
    model, optimizer = guard.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01))
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return guard.protected_update()


def flat_prior(images):
    return images.mean(dim=(2, 3), keepdim=True).expand_as(images)


def realised_and_expected(images, kind, draws=64):
    """The oracle Wiener filter's leakage over ``draws`` noise draws of RMS 0.3, and the bound's."""
    prior = flat_prior(images)
    spectrum = bound.noise_spectrum(images, kind=kind, smoothness=1.5)
    sigma = torch.full((len(images),), 0.3, dtype=torch.float64)
    errors = []
    for seed in range(draws):
        white = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        noise = low_pass_noise(white, sigma=1.5) if kind == "smooth" else white
        estimate = bound.wiener_estimate(images + 0.3 * noise, images, prior, sigma, spectrum=spectrum)
        errors.append((estimate - images).pow(2).flatten(1).mean(dim=1))
    realised = 10 * torch.log10((prior - images).pow(2).flatten(1).mean(dim=1) / torch.stack(errors).mean(dim=0))
    return realised, bound.wiener_leakage_db(images, prior, sigma, spectrum=spectrum)


def test_bound_is_the_realised_wiener_filters_error_and_falls_with_the_noise(chest_batch):
    images = chest_batch[0][:4].double()
    realised, expected = realised_and_expected(images, "gaussian")
    torch.testing.assert_close(realised, expected, atol=0.3, rtol=0)  # white noise: exact, 64 draws within 0.3 dB
    # Smooth noise is reflect-padded, not periodic: its edges add power the bound leaves out, so the
    # realised filter leaks less than the bound says (measured: 0.5-0.9 dB less), never more.
    realised, expected = realised_and_expected(images, "smooth")
    assert bool((realised <= expected + 0.1).all())
    spectrum = bound.noise_spectrum(images, kind="smooth", smoothness=1.5)
    louder = bound.wiener_leakage_db(images, flat_prior(images), torch.full((4,), 0.6), spectrum=spectrum)
    assert bool((louder < expected).all()) and bool((louder > 0).all())


def test_ssim_is_scikit_images(chest_batch):
    a, b = chest_batch[0][:3], chest_batch[0][3:6]
    mine = bound.ssim(a, b, data_range=torch.ones(3))
    theirs = torch.tensor([structural_similarity(x[0].numpy(), y[0].numpy(), data_range=1.0) for x, y in zip(a, b)],
                          dtype=mine.dtype)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_a_leaking_sample_gets_the_least_noise_that_meets_the_target(chest_batch):
    images, labels = chest_batch[0][:2], chest_batch[1][:2]
    guard = GradGuard(GuardConfig(threat="malicious_server", seed=0))
    update = fedsgd(guard, ConvNet(1, 2, width=4, image_size=32), images, labels)
    leakage = update.leakage
    assert leakage.met and leakage.noised_samples == 2 and leakage.estimators == ("noised_input_bound",)
    assert leakage.psnr_above_prior_max == pytest.approx(1.0, abs=1e-3)  # the target, not more noise than needed
    # The amplitude is the smallest that meets it: 5% less noise leaks more than the target.
    spectrum = bound.noise_spectrum(images, kind="smooth", smoothness=1.5)
    prior = torch.stack([images[1], images[0]])  # each image's prior: the mean of the others seen
    scale = images.flatten(1).amax(dim=1)
    calibrated = bound.calibrate_sigma(images, prior, target_db=1.0, spectrum=spectrum, max_sigma=10 * scale)
    assert bool((bound.wiener_leakage_db(images, prior, 0.95 * calibrated, spectrum=spectrum) > 1.0).all())
    assert float((calibrated / scale).max()) == pytest.approx(leakage.amplitude_max, rel=1e-4)


def test_an_update_that_does_not_leak_gets_no_noise_and_trains_as_without_the_guard(chest_batch):
    images, labels = chest_batch
    torch.manual_seed(0)
    model = SmallCNN(1, 2, width=8)
    clean = copy.deepcopy(model)
    # Batch 16 through a pooled model: the probe's estimate plus its margin stays below a 20 dB target.
    guard = GradGuard(GuardConfig(leakage_target_db=20.0, probe_steps=20, seed=0))
    update = fedsgd(guard, model, images, labels)
    assert update.leakage.noised_samples == 0 and update.leakage.amplitude_max == 0.0 and update.leakage.met
    assert update.leakage.estimators == ("noised_input_bound", "exact_recovery_check", "gradient_probe")
    optimizer = torch.optim.SGD(clean.parameters(), lr=0.01)
    before = copy.deepcopy(clean.state_dict())
    optimizer.zero_grad()
    F.cross_entropy(clean(images), labels).backward()
    optimizer.step()
    for name, delta in update.tensors.items():
        torch.testing.assert_close(delta, clean.state_dict()[name] - before[name])


def test_a_missed_target_is_never_sent_silently(chest_batch):
    images, labels = chest_batch[0][:1], chest_batch[1][:1]
    strict = GradGuard(GuardConfig(threat="malicious_server", max_amplitude=0.01, on_target_missed="raise", seed=0))
    with pytest.raises(GradGuardError, match="max_amplitude=0.01.*fix"):
        fedsgd(strict, ConvNet(1, 2, width=4, image_size=32), images, labels)
    flagged = GradGuard(GuardConfig(threat="malicious_server", max_amplitude=0.01, seed=0))  # flags by default
    with pytest.warns(GradGuardWarning, match="flagged"):
        update = fedsgd(flagged, ConvNet(1, 2, width=4, image_size=32), images, labels)
    assert not update.leakage.met and update.leakage.psnr_above_prior_max > 1.0
    assert "target missed" in repr(update)


def test_a_sample_keeps_one_noise_draw_for_the_round(chest_batch):
    """Several local steps over the same image must not hand out several draws to average."""
    images, labels = chest_batch[0][:2], chest_batch[1][:2]
    model = ConvNet(1, 2, width=4, image_size=32)
    seen = []
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    guard = GradGuard(GuardConfig(threat="malicious_server", seed=0))
    fedsgd(guard, model, images, labels, steps=3)
    views = seen[-3:]  # what the model's first layer saw at each step
    assert not torch.equal(views[0], images)
    torch.testing.assert_close(views[0], views[1])
    torch.testing.assert_close(views[0], views[2])


def batchnorm_model(images):
    """A BatchNorm SmallCNN, its first BatchNorm's momentum and running mean, and the clean batch's
    mean at that layer (what a shared delta of the running mean leaks, times the momentum)."""
    torch.manual_seed(0)
    model = SmallCNN(1, 2, width=8, norm="batch")
    bn = model.features[1]
    with torch.no_grad():
        clean_mean = model.features[0](images).mean(dim=(0, 2, 3))
    return model, bn, bn.momentum, bn.running_mean.clone(), clean_mean


@pytest.mark.parametrize("mode", ["local", "noised"])
def test_the_default_shares_no_clean_batchnorm_statistic(chest_batch, mode):
    images, labels = chest_batch[0][:4], chest_batch[1][:4]
    model, _, momentum, start, clean_mean = batchnorm_model(images)
    config = GuardConfig(threat="malicious_server", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)  # local's warning: the next test's subject
        update = fedsgd(GradGuard(config.with_(bn_statistics=mode)), model, images, labels)
    leaked = start + momentum * (clean_mean - start)
    shared = start + update.tensors["features.1.running_mean"]
    assert (shared - leaked).abs().max() > 1e-3  # not the clean batch's statistics
    if mode == "local":  # the default: a noised round's statistics stay on the client
        assert config.bn_statistics == "local"
        assert torch.count_nonzero(update.tensors["features.1.running_mean"]) == 0


def test_a_guard_that_noises_every_round_warns_that_no_batchnorm_statistic_is_shared(chest_batch):
    """Under the malicious-server threat (or a fixed rule) every round is noised, so with
    bn_statistics="local" the global model would never receive running statistics: wrap says so
    and names the fixes. Where some statistic can be shared, it says nothing."""
    images, labels = chest_batch[0][:4], chest_batch[1][:4]
    model = batchnorm_model(images)[0]
    with pytest.warns(GradGuardWarning, match="no BatchNorm running statistic leaves.*reestimate_batchnorm"):
        fedsgd(GradGuard(GuardConfig(threat="malicious_server", seed=0)), model, images, labels)
    with pytest.warns(GradGuardWarning, match="no BatchNorm running statistic leaves"):
        GradGuard(GuardConfig.preset("untargeted", bn_statistics="local")).wrap(
            model, torch.optim.SGD(model.parameters(), lr=0.01))
    quiet = [(GuardConfig(threat="malicious_server", bn_statistics="noised"), model),
             (GuardConfig(threat="malicious_server", update_kind="gradient"), model),
             (GuardConfig(threat="malicious_server"), SmallCNN(1, 2, width=8, norm="group")),
             (GuardConfig(probe_steps=5), model)]  # the honest server: unnoised rounds share theirs
    for config, net in quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("error", GradGuardWarning)
            guard = GradGuard(config)
            guard.wrap(net, torch.optim.SGD(net.parameters(), lr=0.01))
            guard.cleanup()


def test_calibration_refuses_what_its_bound_does_not_cover():
    with pytest.raises(ConfigError, match="calibration.*shadow='none'.*leakage_target_db=None"):
        GuardConfig(shadow="feature_inverter")
    with pytest.raises(ConfigError, match=r"leakage_target_db\)=0.0: must be > 0"):
        GuardConfig(leakage_target_db=0.0)
    with pytest.raises(ConfigError, match="did you mean 'malicious_server'"):
        GuardConfig(threat="malicious")
    assert GuardConfig.preset("chest_xray").calibration.enabled is False


def test_leakage_estimate_round_trips_and_refuses_malformed_fields():
    estimate = LeakageEstimate(threat="honest_server", estimators=("noised_input_bound", "gradient_probe"),
                               target_db=1.0, psnr_above_prior_max=math.inf, psnr_above_prior_mean=0.5,
                               ssim_above_prior_max=0.1, ssim_above_prior_mean=0.0, amplitude_max=0.0,
                               amplitude_mean=0.0, samples=3, noised_samples=0, met=False)
    data = estimate.to_dict()
    assert data["psnr_above_prior_max"] == "inf"
    assert LeakageEstimate.from_dict(data) == estimate
    for broken in ({**data, "samples": -1}, {**data, "met": "yes"}, {**data, "target_db": float("nan")},
                   {k: v for k, v in data.items() if k != "threat"}):
        with pytest.raises(ValueError):
            LeakageEstimate.from_dict(broken)


def test_the_prior_and_the_probe_survive_a_state_round_trip_and_a_new_guard(chest_batch, tmp_path):
    from safetensors.torch import load_file, save_file

    images, labels = chest_batch[0][:4], chest_batch[1][:4]
    guard = GradGuard(GuardConfig(probe_steps=5, seed=0))
    model = SmallCNN(1, 2, width=8)
    fedsgd(guard, model, images, labels)
    save_file(guard.state_dict(), str(tmp_path / "guard.safetensors"))
    fresh = GradGuard(GuardConfig(probe_steps=5, seed=0))
    fresh.load_state_dict(load_file(str(tmp_path / "guard.safetensors")))
    assert fresh._prior_ids == guard._prior_ids and len(fresh._prior_ids) == 4
    torch.testing.assert_close(fresh._prior_sum, guard._prior_sum)
    assert fresh._probed == guard._probed
    assert list(fresh._kept) == list(guard._kept) and len(fresh._kept) == 4
    for sid, (image, label) in guard._kept.items():
        torch.testing.assert_close(fresh._kept[sid][0], image)
        assert fresh._kept[sid][1] == label
    taker = GradGuard(GuardConfig(probe_steps=5, seed=0))
    taker.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01))  # takes over the guard on the model
    assert taker._probed == guard._probed and taker._prior_ids == guard._prior_ids and taker._kept is guard._kept


def test_the_probe_scores_nothing_before_its_attack_moves(chest_batch):
    """Zero attack steps on a batch of 4 with leave-one-out priors: the probe's guess holds nothing
    of the batch, so it is no better than the prior (it scored +4 dB when it started from the
    priors, each of which holds the batch's other images)."""
    images, labels = chest_batch[0][:4].double(), chest_batch[1][:4]
    prior = (images.sum(dim=0, keepdim=True) - images) / 3
    torch.manual_seed(0)
    model = ConvNet(1, 2, width=8, image_size=32).double()
    leak = gradient_probe(model, model, images, labels, prior, steps=0, seed=0)
    assert float(leak.max()) <= 0.1, leak.tolist()
    # A flat image at each image's own brightness is what the scoring grants any estimate: never above the prior.
    flat = images.mean(dim=(1, 2, 3), keepdim=True).expand_as(images)
    assert float(above_prior_db(flat, images, prior).max()) <= 1e-9


def test_sample_ids_of_any_length_and_alphabet_survive_the_state(chest_batch):
    """Ids "7", "42", "103" and a non-ASCII one: the state saved them as rows of one length and
    ASCII only, so a Flower node's second round (ids 0..199) failed to save its guard."""
    from safetensors.torch import load, save

    images, labels = chest_batch[0][:4], chest_batch[1][:4]
    guard = GradGuard(GuardConfig(probe_steps=5, seed=0))
    net = SmallCNN(1, 2, width=8)
    model, optimizer = guard.wrap(net, torch.optim.SGD(net.parameters(), lr=0.01))
    ids = ["7", "42", "103", "patienté-0009"]
    guard.set_sample_ids(ids)
    optimizer.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()
    fresh = GradGuard(GuardConfig(probe_steps=5, seed=0))
    fresh.load_state_dict(load(save(guard.state_dict())))
    assert fresh._prior_ids == set(ids)
    broken = {**guard.state_dict(), "prior.id_lengths": torch.tensor([1, 2, 3, 99])}
    with pytest.raises(GradGuardError, match="id_lengths"):
        GradGuard(GuardConfig(seed=0)).load_state_dict(broken)


def _delta_round(guard, model, images, labels, *, batch, dataset_size, round):
    """One local epoch of ``images`` in batches of ``batch`` (ids "0", "1", ...), shared as a delta."""
    guard.begin_round(round)
    model, optimizer = guard.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01), dataset_size=dataset_size)
    for start in range(0, len(images), batch):
        guard.set_sample_ids([str(i) for i in range(start, start + batch)], labels=labels[start:start + batch])
        optimizer.zero_grad()
        F.cross_entropy(model(images[start:start + batch]), labels[start:start + batch]).backward()
        optimizer.step()
    return guard.protected_update()


def test_a_delta_after_the_first_round_is_probed_as_the_gradient_of_the_images_it_mixes(chest_batch, monkeypatch):
    """A delta over 8 images in batches of 4 mixes all 8: from the second round on, the probe attacks
    the gradient of the first batch and the 4 images of the first round it did not see yet; the
    first round, which knows only its first batch, probes that batch alone."""
    import gradguard.guard as guard_module

    probed = []

    def spy(model, forward, images, *args, **kwargs):
        probed.append(len(images))
        return gradient_probe(model, forward, images, *args, **kwargs)

    monkeypatch.setattr(guard_module, "gradient_probe", spy)
    images, labels = chest_batch[0][:8], chest_batch[1][:8]
    guard = GradGuard(GuardConfig(probe_steps=5, seed=0))
    model = SmallCNN(1, 2, width=8)
    first = _delta_round(guard, model, images, labels, batch=4, dataset_size=8, round=0)
    assert set(probed) == {4} and first.leakage.met
    probed.clear()
    second = _delta_round(guard, model, images, labels, batch=4, dataset_size=8, round=1)
    assert set(probed) == {8} and second.leakage.met and guard._probed[2] == 8
    # A gradient (FedSGD) holds one batch only: no mix.
    probed.clear()
    fedsgd(GradGuard(GuardConfig(probe_steps=5, update_kind="gradient", seed=0)), SmallCNN(1, 2, width=8),
           images[:4], labels[:4])
    assert set(probed) == {4}


def test_a_delta_that_mixes_fewer_images_than_its_probe_assumed_is_flagged(chest_batch):
    """wrap(dataset_size=8) but the second round trains on 4: its probe mixed 8, so the estimate does
    not cover the update."""
    images, labels = chest_batch[0][:8], chest_batch[1][:8]
    guard = GradGuard(GuardConfig(probe_steps=5, seed=0))
    model = SmallCNN(1, 2, width=8)
    _delta_round(guard, model, images, labels, batch=4, dataset_size=8, round=0)
    with pytest.warns(GradGuardWarning, match=r"mix 8 images \(wrap's dataset_size=8\), but the round trained on 4"):
        update = _delta_round(guard, model, images[:4], labels[:4], batch=4, dataset_size=8, round=1)
    assert not update.leakage.met


@pytest.mark.parametrize("noised", [True, False])
def test_local_batchnorm_statistics_stay_on_the_client_exactly_when_the_round_was_noised(chest_batch, noised):
    # The bound noises every image; the probe finds nothing under a 20 dB target (as in the no-leak test
    # above), so that round is shared clean, and its statistics are the clean batch's, which the rest
    # of a clean update reveals anyway.
    images, labels = chest_batch
    model, bn, momentum, start, clean_mean = batchnorm_model(images)
    config = (GuardConfig(threat="malicious_server", bn_statistics="local", seed=0) if noised else
              GuardConfig(leakage_target_db=20.0, probe_steps=20, bn_statistics="local", seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)  # what the noised one warns of is tested above
        update = fedsgd(GradGuard(config), model, images, labels)
    assert (update.leakage.noised_samples > 0) == noised
    names = [n for n in update.tensors if n.endswith(("running_mean", "running_var"))]
    assert len(names) == 6 and "features.1.running_mean" in names
    if noised:
        assert all(torch.count_nonzero(update.tensors[n]) == 0 for n in names)
        assert bn.running_mean.ne(start).any()  # the client's own model keeps what it trained
    else:
        torch.testing.assert_close(start + update.tensors["features.1.running_mean"],
                                   start + momentum * (clean_mean - start))
    assert update.tensors["features.0.weight"].abs().max() > 0
