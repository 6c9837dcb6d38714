"""The leakage benchmark's report: results.json, summary.json, a table per dataset, image grids and
a privacy-utility plot with leakage above the attacker's prior on the y axis.

Figures use matplotlib's object API with the Agg canvas, so no global backend is touched.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from safetensors.torch import load_file

from gradguard.eval.report import F1_MATCH, compare_at_matched_f1, slugify

if TYPE_CHECKING:
    from gradguard.eval.bench.experiment import Experiment
    from gradguard.eval.bench.leakage import LeakageCell, SummaryRow

SUMMARY_KEYS = ("dataset", "setting", "defense", "twin_of", "attacks", "psnr_above_prior", "ssim_above_prior",
                "lpips", "reid_top1", "reid_chance", "micro_f1", "macro_f1", "f1_seeds", "energy_ratio",
                "undefended_psnr_above_prior", "micro_f1_public_bn", "macro_f1_public_bn")
# What every GradGuard row adds: its input-noise energy and how often its own estimate was conservative.
GRADGUARD_KEYS = ("noise_energy", "report_conservative_rate")
GRID_IMAGES = 4


def _leaks(row: SummaryRow) -> bool:
    from gradguard.eval.bench.leakage import LEAK_THRESHOLD_DB

    return row.undefended_psnr_above_prior is not None and row.undefended_psnr_above_prior >= LEAK_THRESHOLD_DB


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


# GradGuard's (leakage, F1) against the other defense's -> the leakage report's verdict.
_VERDICTS = {
    ("same", "same"): "tie (both at the prior, F1 matched)",
    ("same", "more"): "GradGuard wins (both at the prior, more F1)",
    ("same", "less"): "**GradGuard loses** (both at the prior, less F1)",
    ("less", "same"): "GradGuard wins (less leakage, F1 matched)",
    ("more", "same"): "**GradGuard loses** (more leakage, F1 matched)",
    ("less", "more"): "GradGuard dominates (less leakage, more F1)",
    ("more", "more"): "trade-off (GradGuard: more leakage, more F1)",
    ("less", "less"): "trade-off (GradGuard: less leakage, less F1)",
    ("more", "less"): "**GradGuard loses** (more leakage, less F1)",
}


def verdict(ours: SummaryRow, other: SummaryRow) -> str:
    """How a GradGuard setting fares against another defense on one leaking setting.

    Leakage counts only above the prior (below it an attack has learned nothing about the patient,
    so pushing it further buys nothing): both at or below the prior is equal privacy, decided
    by F1. Otherwise the lower leakage wins at matched micro-F1 (within a point)."""
    if ours.micro_f1 is None or other.micro_f1 is None:
        return "no verdict (no F1 measured)"
    return _VERDICTS[compare_at_matched_f1((max(ours.psnr_above_prior, 0.0), ours.micro_f1),
                                           (max(other.psnr_above_prior, 0.0), other.micro_f1))]


def markdown_table(dataset: str, rows: Sequence[SummaryRow], twins: Sequence[dict[str, Any]],
                   experiment: Experiment) -> str:
    """Rows: settings; columns: defenses; cells: PSNR / SSIM above the prior, re-identification, micro-F1."""
    from gradguard.eval.bench.leakage import LEAK_THRESHOLD_DB

    mine = [r for r in rows if r.dataset == dataset]
    settings = list(dict.fromkeys(r.setting for r in mine))
    defenses = list(dict.fromkeys(r.defense for r in mine))
    cell = {(r.setting, r.defense): r for r in mine}
    lines = [f"# {dataset}: leakage above the attacker's prior", "",
             f"Each cell: PSNR (dB) / SSIM of the strongest attack (every attack, every adaptive variant, per metric) "
             f"minus the attacker's prior (the better of the public mean and class-mean image), the "
             f"re-identification rate (SSIM nearest neighbour among the client's images and "
             f"{experiment.distractors} distractors; chance in the setting column) and micro-F1 (points, mean of "
             f"{len(experiment.utility.seeds)} FedAvg seeds; `!` a collapsed run, followed by the same runs' score "
             f"with BatchNorm statistics re-estimated on public images where they have them). Means over "
             f"{experiment.attack_seeds} attacked updates. A setting whose undefended update is less than "
             f"{LEAK_THRESHOLD_DB:g} dB above the prior has no leakage to defend and ranks no defense.", ""]
    header = ["setting (undefended dB above prior; re-id chance)"] + [f"`{d}`" for d in defenses]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting in settings:
        any_row = next(r for r in mine if r.setting == setting)
        und = any_row.undefended_psnr_above_prior
        status = "leaks" if _leaks(any_row) else "**no leakage to defend**"
        head = (f"`{setting}` ({'-' if und is None else f'{und:+.1f}'}; {_pct(any_row.reid_chance)}%) {status}")
        values = []
        for defense in defenses:
            r = cell.get((setting, defense))
            if r is None:
                values.append("-")
                continue
            f1 = "-" if r.micro_f1 is None else f"{100 * r.micro_f1:.1f}" + ("!" if r.collapsed_runs else "")
            if r.collapsed_runs and r.micro_f1_public_bn is not None:  # the weights learned; the statistics did not
                f1 += f" ({100 * r.micro_f1_public_bn:.1f} public BN)"
            values.append(f"{r.psnr_above_prior:+.1f} / {r.ssim_above_prior:+.2f} / {_pct(r.reid_top1)}% / {f1}")
        lines.append(f"| {head} | " + " | ".join(values) + " |")
    ours = [d for d in defenses if any(r.twin_of == d for r in mine)]
    if ours:
        lines += ["", "## Verdicts on the settings that leak", "",
                  f"Leakage above the prior counts (below it, nothing is learned); F1 matched within "
                  f"{100 * F1_MATCH:g} point.", ""]
        for setting in settings:
            if not _leaks(next(r for r in mine if r.setting == setting)):
                continue
            for defense in ours:
                me = cell.get((setting, defense))
                if me is None:
                    continue
                others = [cell[setting, d] for d in defenses if d not in (defense, "none") and (setting, d) in cell
                          and d not in ours]
                lines.append(f"- `{setting}`, `{defense}` ({me.psnr_above_prior:+.1f} dB): " + "; ".join(
                    f"vs `{o.defense}`{' (its twin)' if o.twin_of == defense else ''} {o.psnr_above_prior:+.1f} dB: "
                    f"{verdict(me, o)}" for o in others))
    paired = [t for t in twins if t["pairs"] and t["dataset"] == dataset]
    if paired:
        lines += ["", "## GradGuard settings against their equal-energy twins", "",
                  "Over the settings that leak: the same updates' images and seeds, shadow and relevance map off "
                  "in the twin. Difference: setting minus twin in PSNR above the prior (< 0: the targeting "
                  "protects more).", "",
                  "| setting | twin | pairs | difference (dB, mean ± sd) | setting leaks less / twin leaks less | "
                  "sign test p | energy ratio (twin / setting) |", "|---|---|---|---|---|---|---|"]
        for t in paired:
            sd = "-" if t["psnr_difference_sd"] is None else f"{t['psnr_difference_sd']:.2f}"
            ratio = "-" if t["energy_ratio"] is None else f"{t['energy_ratio']:.4f}"
            lines.append(f"| `{t['defense']}` | `{t['twin']}` | {t['pairs']} | {t['psnr_difference_mean']:+.2f} ± {sd} "
                         f"| {t['setting_leaks_less']} / {t['twin_leaks_less']} | {t['sign_test_p']:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def privacy_utility_plot(dataset: str, rows: Sequence[SummaryRow], path: Path) -> None:
    """PSNR above the prior (mean over the settings that leak) against micro-F1, a point per defense."""
    from matplotlib.figure import Figure

    leaking = [r for r in rows if r.dataset == dataset and _leaks(r)]
    defenses = list(dict.fromkeys(r.defense for r in leaking))
    figure = Figure(figsize=(13, 6), constrained_layout=True)
    grid = figure.add_gridspec(1, 2, width_ratios=(1.2, 1))
    ax = figure.add_subplot(grid[0, 0])
    for number, defense in enumerate(defenses, 1):
        mine = [r for r in leaking if r.defense == defense]
        f1 = [r.micro_f1 for r in mine if r.micro_f1 is not None]
        if not f1:
            continue
        x, y = 100 * float(np.mean(f1)), float(np.mean([r.psnr_above_prior for r in mine]))
        ours = defense.startswith(("gradguard", "chest_xray", "fundus"))
        ax.plot(x, y, "*" if ours else "o", markersize=12 if ours else 7, color="tab:red" if ours else "tab:blue",
                alpha=0.8)
        ax.annotate(str(number), (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.axhline(0, color="grey", linestyle="--", linewidth=1, label="the attacker's prior (no update)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("micro-F1 (points, mean over seeds)")
    ax.set_ylabel("strongest attack's PSNR above the prior (dB; lower is more private)")
    ax.grid(alpha=0.3)
    key = figure.add_subplot(grid[0, 1])
    key.axis("off")
    key.text(0, 1, "\n".join(f"{n:>2}  {d}" for n, d in enumerate(defenses, 1)), va="top", ha="left", fontsize=7,
             family="monospace", transform=key.transAxes)
    figure.suptitle(f"{dataset}: leakage above the prior against utility, mean over the "
                    f"{len(set(r.setting for r in leaking))} settings that leak (red stars: GradGuard settings)")
    figure.savefig(path, dpi=120)


def image_grid(cells: Sequence[LeakageCell], cache: Path, title: str, path: Path) -> None:
    """Originals (top row) and each defense's strongest reconstruction, first attacked seed."""
    from matplotlib.figure import Figure

    loaded = [(c, load_file(str(cache / c.images))) for c in cells]
    width = min(GRID_IMAGES, max(len(images["original"]) for _, images in loaded))
    figure = Figure(figsize=(1.3 * width + 2.6, 1.3 * (len(loaded) + 1) + 0.6), constrained_layout=True)
    axes = figure.subplots(len(loaded) + 1, width, squeeze=False)
    rows = [("original", loaded[0][1]["original"])] + [
        (f"{c.defense}\n{c.above_prior()['psnr']:+.1f} dB", images["reconstruction"]) for c, images in loaded]
    for r, (label, images) in enumerate(rows):
        for i in range(width):
            ax = axes[r, i]
            ax.set_xticks([])
            ax.set_yticks([])
            if i < len(images):
                image = images[i].permute(1, 2, 0).numpy()
                ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
        axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=110)


def write_leakage_report(*, experiment: Experiment, cells: Sequence[LeakageCell], runs: Sequence[dict[str, Any]],
                         rows: Sequence[SummaryRow], twins: Sequence[dict[str, Any]], out: Path, cache: Path,
                         command: str | None, seconds: float) -> list[Path]:
    """Write every output of the leakage benchmark into ``out``; returns the files written."""
    from gradguard.eval.bench.leakage import datasets_of

    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    summary = [{k: getattr(r, k) for k in SUMMARY_KEYS + (GRADGUARD_KEYS if r.gradguard else ())} for r in rows]
    results = {"command": command, "experiment": experiment.source, "seconds": seconds,
               "settings": [dataclasses.asdict(s) for s in experiment.settings],
               "utility": experiment.utility.fingerprint(), "utility_seeds": list(experiment.utility.seeds),
               "attack_seeds": experiment.attack_seeds, "distractors": experiment.distractors,
               "rows": [dataclasses.asdict(r) for r in rows], "twins": list(twins),
               "cells": [dataclasses.asdict(c) for c in cells], "runs": list(runs)}
    files = [out / "results.json", out / "summary.json"]
    files[0].write_text(json.dumps(results, indent=1, allow_nan=False, default=str) + "\n")
    files[1].write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    for dataset in datasets_of(cells):
        table = out / f"table_{dataset}.md"
        table.write_text(markdown_table(dataset, rows, twins, experiment))
        plot = figures / f"privacy_utility_{dataset}.png"
        privacy_utility_plot(dataset, rows, plot)
        files += [table, plot]
        for setting in experiment.settings:
            group = [c for c in cells if c.dataset == dataset and c.setting == setting.name and c.seed == 0]
            if group:
                grid = figures / f"grid_{dataset}_{slugify(setting.name)}.png"
                image_grid(group, cache, f"{dataset}, {setting.name}: originals and each defense's strongest "
                                         "reconstruction (label: PSNR above the prior)", grid)
                files.append(grid)
    return files
