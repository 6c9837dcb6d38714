import math

import pytest
import torch

from gradguard import GuardConfig
from gradguard import masks as mk


def test_equalize_is_rank_based():
    x = torch.tensor([[[[3.0, 1.0], [2.0, 10.0]]]])
    torch.testing.assert_close(mk.equalize(x), torch.tensor([[[[2 / 3, 0.0], [1 / 3, 1.0]]]]))


def test_vulnerability_is_high_where_error_is_low():
    error = torch.rand(2, 1, 8, 8)
    v = mk.vulnerability_map(error, temperature=0.25)
    assert v.amax() == pytest.approx(1.0)
    lowest = error.flatten(1).argmin(1)
    highest = error.flatten(1).argmax(1)
    for i in range(2):
        assert v.flatten(1)[i, lowest[i]] == pytest.approx(1.0)
        assert v.flatten(1)[i, highest[i]] == pytest.approx(math.exp(-1 / 0.25))


def test_relevance_keeps_only_the_top_fraction():
    attribution = torch.arange(100.0).view(1, 1, 10, 10)
    r = mk.relevance_map(attribution, top_fraction=0.3, temperature=0.25)
    assert (r > 0).sum() == 30 and r.flatten()[-1] == pytest.approx(1.0)
    assert (r.flatten()[:70] == 0).all()


def test_paper_relevance_is_nearly_uniform():
    """The paper's formulas' weakness: with T = 20 the CAM term varies by only ~5%."""
    cam = torch.rand(1, 1, 16, 16)
    r = mk.shadowdef_relevance_map(cam)
    assert r.sum() == pytest.approx(1.0)
    assert r.max() / r.min() == pytest.approx(math.exp(1 / 20), rel=1e-3)


@pytest.mark.parametrize("rule", ["product", "subtract"])
def test_combine_spares_relevant_pixels_and_normalizes(rule):
    v = torch.full((1, 1, 4, 4), 0.5)
    r = torch.zeros(1, 1, 4, 4)
    r[..., 0, :] = 1.0
    m = mk.combine(v, r, weight=0.5, rule=rule, floor=0.1, normalization="rms")
    assert m.pow(2).mean() == pytest.approx(1.0)
    assert m[..., 0, :].max() < m[..., 1:, :].min()
    peak = mk.combine(v, r, weight=0.5, rule=rule, floor=0.1, normalization="peak")
    assert peak.max() == pytest.approx(1.0)


def test_equal_rms_means_equal_energy_whatever_the_shape():
    shaped = mk.combine(torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8), weight=0.5, rule="product", floor=0.1)
    uniform = mk.combine(torch.ones(3, 1, 8, 8), torch.zeros(3, 1, 8, 8), weight=0.5, rule="product", floor=0.1)
    torch.testing.assert_close(shaped.pow(2).mean(dim=(1, 2, 3)), uniform.pow(2).mean(dim=(1, 2, 3)))


def test_schedules_follow_the_paper():
    assert mk.relevance_weight(0, 100, low=0.1, high=0.5) == 0.1
    assert mk.relevance_weight(30, 100, low=0.1, high=0.5) == pytest.approx(0.3)
    assert mk.relevance_weight(90, 100, low=0.1, high=0.5) == 0.5
    assert mk.noise_amplitude(100, 100, base=0.19, growth=1.0) == pytest.approx(0.19 * math.e)
    assert mk.averaged_amplitude(0.6, 4, exponent=0.5) == pytest.approx(0.3)
    assert mk.averaged_amplitude(0.6, 8, exponent=0.0) == 0.6
    with pytest.raises(ValueError, match="at least one image"):
        mk.averaged_amplitude(0.6, 0, exponent=0.5)


def test_store_smooths_with_momentum():
    store = mk.MaskStore()
    store.update(["a"], torch.ones(1, 1, 2, 2), momentum=0.1, step=0)
    store.update(["a"], torch.zeros(1, 1, 2, 2), momentum=0.1, step=5)
    torch.testing.assert_close(store.masks["a"], torch.full((1, 2, 2), 0.1))
    assert store.refreshed_at["a"] == 5


def test_sample_id_is_stable_and_distinct():
    a, b = torch.rand(1, 4, 4), torch.rand(1, 4, 4)
    assert mk.sample_id(a) == mk.sample_id(a.clone()) != mk.sample_id(b)


def test_config_rejects_bad_values_and_knows_presets():
    with pytest.raises(ValueError, match="mask_momentum"):
        GuardConfig(mask_momentum=1.5)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        GuardConfig.preset("nope")
    paper = GuardConfig.preset("shadowdef")
    assert (paper.noise_amplitude, paper.amplitude_growth, paper.vulnerability_temperature) == (0.19, 1.0, 20.0)
    assert (paper.relevance_weight_min, paper.relevance_weight_max, paper.mask_momentum) == (0.1, 0.5, 0.1)


def test_low_pass_noise_has_unit_variance_and_is_spatially_correlated():
    white = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    smooth = mk.low_pass_noise(white, sigma=1.5)
    torch.testing.assert_close(smooth.flatten(1).std(dim=1), torch.ones(4))

    def neighbour_correlation(x):
        return torch.corrcoef(torch.stack([x[..., :, 1:].flatten(), x[..., :, :-1].flatten()]))[0, 1]

    assert abs(neighbour_correlation(white)) < 0.1 < 0.7 < neighbour_correlation(smooth)
