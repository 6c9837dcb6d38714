"""How tight the noised-input bound is: what denoisers that know the noise recover from exactly
recovered noised images (an imprint module's view), against the bound the calibrated noise is set by.

Per dataset, the test images get the guard's noise (smooth, unit RMS per image, the default kind)
at three rules: the calibrated default's per-image amplitude (the bound at the default target,
the public mean image as the prior) and the fixed presets' amplitude rule at N = 4 and N = 8
(amplitude x N^-0.5, without masks: their equal-energy twins). Each noised set is scored, in dB
above the prior, by: the bound (the oracle Wiener filter, expected), the Wiener filter with the
public images' mean spectrum (the best linear estimator an attacker can build), and the benchmark's
known-noise denoiser trained on the public (val) images with that exact rule at 150 steps (the
leakage benchmark's budget) and at 1500.

    python benchmarks/bound_tightness.py [--images 48] [--steps 150,1500]
        [--target-db DB --calibrated-only --name NAME]   # the calibrated rule at another target
"""
from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch
from _common import write_result

from gradguard import GuardConfig
from gradguard import masks as mk
from gradguard.calibration import bound
from gradguard.eval.datasets import load_medmnist
from gradguard.eval.known_noise import DenoiserConfig, KnownNoiseDenoiser

PRESETS = {"pneumoniamnist": "chest_xray", "retinamnist": "fundus"}


def unit_noise(images: torch.Tensor, generator: torch.Generator, smoothness: float) -> torch.Tensor:
    white = torch.randn(images.shape, generator=generator)
    return mk.normalize(mk.low_pass_noise(white, sigma=smoothness), "rms")


def rule_sigma(rule: str, x: torch.Tensor, *, prior: torch.Tensor, spectrum: torch.Tensor, amplitude: float,
               config: GuardConfig) -> torch.Tensor:
    """Each image's noise standard deviation under ``rule``: "calibrated" or "PRESET:N=n"."""
    scale = x.flatten(1).abs().amax(dim=1)
    if rule == "calibrated":
        target = config.calibration.leakage_target_db
        assert target is not None
        return bound.calibrate_sigma(x, prior.expand_as(x), target_db=target, spectrum=spectrum,
                                     max_sigma=config.calibration.max_amplitude * scale)
    return amplitude * int(rule.split("=")[1]) ** -0.5 * scale


def rule_noise(x: torch.Tensor, generator: torch.Generator, *, rule: str,
               sigma_of: Callable[[str, torch.Tensor], torch.Tensor], smoothness: float) -> torch.Tensor:
    """``x`` noised under ``rule``: the noise function the known-noise denoiser trains on."""
    return x + mk.per_sample(sigma_of(rule, x), x) * unit_noise(x, generator, smoothness)


def above_prior(estimate: torch.Tensor, images: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    error = (estimate - images).flatten(1).pow(2).mean(dim=1)
    return 10 * torch.log10((prior - images).flatten(1).pow(2).mean(dim=1) / error)


def summary(values: torch.Tensor) -> dict[str, float]:
    v = values.tolist()
    return {"median": round(statistics.median(v), 2), "max": round(max(v), 2), "min": round(min(v), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--steps", default="150,1500")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-db", type=float, help="the calibrated rule's target (default: GuardConfig's)")
    parser.add_argument("--calibrated-only", action="store_true",
                        help="leave out the presets' rules (they do not depend on the target)")
    parser.add_argument("--name", default="bound_tightness", help="results/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = GuardConfig() if args.target_db is None else GuardConfig(leakage_target_db=args.target_db)
    target, smoothness = config.calibration.leakage_target_db, config.noise.smoothness
    assert target is not None
    steps = [int(s) for s in args.steps.split(",")]
    figures: dict[str, dict] = {}
    for dataset, preset in PRESETS.items():
        public = load_medmnist(dataset, "val").images
        images = load_medmnist(dataset, "test").images[:args.images]
        prior = public.mean(dim=0, keepdim=True)
        spectrum = bound.noise_spectrum(images, kind="smooth", smoothness=smoothness)
        mean_power = torch.fft.fftn((public - prior).double(), dim=(2, 3), norm="ortho").abs().pow(2).mean(0)
        amplitude = GuardConfig.preset(preset).noise.amplitude
        sigma_of = functools.partial(rule_sigma, prior=prior, spectrum=spectrum, amplitude=amplitude, config=config)
        rows = {}
        for rule in ("calibrated",) if args.calibrated_only else ("calibrated", f"{preset}:N=4", f"{preset}:N=8"):
            generator = torch.Generator().manual_seed(args.seed)
            sigma = sigma_of(rule, images)
            noised = images + mk.per_sample(sigma, images) * unit_noise(images, generator, smoothness)
            noise_power = sigma.double()[:, None, None, None] ** 2 * spectrum
            gain = mean_power / (mean_power + noise_power)
            wiener = prior + torch.fft.ifftn(gain * torch.fft.fftn((noised - prior).double(), dim=(2, 3),
                                                                   norm="ortho"), dim=(2, 3), norm="ortho").real
            bound_db = bound.wiener_leakage_db(images, prior.expand_as(images), sigma, spectrum=spectrum)
            row = {"noise_energy": round(float((sigma ** 2 / images.flatten(1).pow(2).mean(1)).mean()), 3),
                   "bound": summary(bound_db),
                   "mean_spectrum_wiener": summary(above_prior(wiener.float().clamp(0, 1), images, prior))}
            noise_fn = functools.partial(rule_noise, rule=rule, sigma_of=sigma_of, smoothness=smoothness)
            for n in steps:
                denoiser = KnownNoiseDenoiser(DenoiserConfig(steps=n, seed=args.seed)).fit(public, noise_fn)
                found = above_prior(denoiser.apply(noised.clamp(0, 1)), images, prior)
                row[f"known_noise_{n}"] = summary(found)
                row[f"known_noise_{n}_over_bound_plus_1db"] = round(float((found > bound_db + 1).float().mean()), 3)
            rows[rule] = row
            print(dataset, rule, row, flush=True)
        figures[dataset] = rows
    write_result(args.name, {"datasets": figures},
                 {"images": args.images, "steps": steps, "seed": args.seed, "target_db": target,
                  "smoothness": smoothness, "prior": "mean of the val split", "public": "val split",
                  "scored": "test split"})


if __name__ == "__main__":
    main()
