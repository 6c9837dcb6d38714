"""The benchmark's report: results.json, a Markdown table per dataset, image grids, a privacy-utility plot.

How the numbers are aggregated (the tables say it too):

- Leakage of a defense setting: for every captured update (attacked seed's run, round, client)
  the strongest attack counts, i.e. the one with the highest best-match PSNR (each attack
  already scored as the stronger of its plain and adaptive results); metrics are then averaged
  over the captured updates of every attacked run. ``best`` is the seed paper's protocol (each
  reconstruction against its best-matching client image), ``strict`` the one-to-one matching.
- Utility: mean and sample standard deviation over seeds of the final global model's test
  scores; a run is flagged when the model collapsed to (about) one class.
- Goals: the seed paper's headline gains of GradGuard over no defense (Jiang et al., Medical Image
  Analysis 105 (2025) 103673: -3.73 dB PSNR and -0.2 SSIM on chest X-rays), and
  GradGuard against every other setting at matched F1 (micro-F1 within 1 point).

Figures use matplotlib's object API with the Agg canvas, so no global backend is touched.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch

METRICS = ("psnr_best", "ssim_best", "lpips_best", "psnr_strict", "ssim_strict", "lpips_strict")
UTILITY = ("accuracy", "micro_f1", "macro_f1")
REFERENCE = "none"  # the setting every delta is taken against
F1_MATCH = 0.01  # "matched F1": micro-F1 within 1 point
GRID_IMAGES_PER_CLIENT = 4


@dataclass(frozen=True)
class Goal:
    """The seed paper's gains over no defense on the dataset this one stands in for."""

    psnr_drop: float
    ssim_drop: float
    lpips_ratio: float = 1.5
    f1_points: float = 1.0


GOALS: dict[str, Goal] = {
    "pneumoniamnist": Goal(psnr_drop=3.73, ssim_drop=0.2),  # ChestXRay in the paper
    "retinamnist": Goal(psnr_drop=2.78, ssim_drop=0.166),  # EyePACS in the paper
}


def slugify(label: str) -> str:
    """A setting's label as a file name: ``dpsgd(noise_multiplier=1.0)`` -> ``dpsgd-noise_multiplier=1.0``."""
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", label.replace("(", "-").rstrip(")"))


# ---------------------------------------------------------------------------- aggregation
def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def strongest_cells(cells: Iterable[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Per (dataset, defense): for each captured update (seed, round, client) the cell of the
    strongest attack, ordered by seed, round and client."""
    best: dict[tuple[str, str, int, int, str], dict[str, Any]] = {}
    for cell in cells:
        key = (cell["dataset"], cell["defense"], cell["seed"], cell["round"], cell["client"])
        if key not in best or cell["psnr_best"] > best[key]["psnr_best"]:
            best[key] = cell
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for (dataset, defense, *_), cell in sorted(best.items(), key=lambda kv: kv[0][2:]):
        grouped[dataset, defense].append(cell)
    return grouped


def _mean_leakage(cells: list[dict[str, Any]]) -> dict[str, float]:
    return {m: float(np.mean([c[m] for c in cells])) for m in METRICS}


def summarize(runs: list[dict[str, Any]], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (dataset, defense setting), in the order the runs list them."""
    by_setting: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_setting[run["dataset"], run["defense"]].append(run)
    strongest = strongest_cells(cells)
    summaries = []
    for (dataset, defense), group in by_setting.items():
        summary: dict[str, Any] = {"dataset": dataset, "defense": defense, "defense_name": group[0]["defense_name"],
                                   "defense_params": group[0]["defense_params"],
                                   "seeds": [r["seed"] for r in group]}
        for metric in UTILITY:
            summary[f"{metric}_mean"], summary[f"{metric}_sd"] = _mean_sd([r[metric] for r in group])
        epsilons = [r["epsilon"] for r in group if r["epsilon"] is not None]
        summary["epsilon"] = max(epsilons) if len(epsilons) == len(group) else None  # all runs bounded
        summary["delta"] = group[0]["delta"]
        summary["seconds"] = _mean_sd([r["seconds"] for r in group])[0]
        summary["collapsed_runs"] = sum(r["collapsed"] for r in group)
        summary["majority_accuracy"] = group[0]["majority_accuracy"]
        # The same models with BatchNorm statistics of the server's public images (runs that have them).
        public: list[dict[str, Any]] = [r["bn_public"] for r in group if r.get("bn_public") is not None]
        summary["bn_public"] = None if len(public) < len(group) else {
            **{f"{m}_{k}": v for m in UTILITY for k, v in zip(("mean", "sd"), _mean_sd([p[m] for p in public]))},
            "collapsed_runs": sum(p["collapsed"] for p in public)}
        summary["noise_by_client"] = noise_by_client([r.get("noise_history") for r in group])
        chosen = strongest.get((dataset, defense), [])
        summary["captures"] = len(chosen)
        summary["attack_seeds"] = sorted({c["seed"] for c in chosen})
        summary["leakage"] = _mean_leakage(chosen) if chosen else None
        # Per attacked client too: a client whose undefended update already leaks nothing beyond the
        # mean image dilutes the average, so the goals are also checked client by client.
        summary["leakage_by_client"] = {client: _mean_leakage([c for c in chosen if c["client"] == client])
                                        for client in sorted({c["client"] for c in chosen})}
        # Per attacked run: how much the figures depend on which run (which images) is attacked.
        summary["leakage_by_seed"] = {str(seed): _mean_leakage([c for c in chosen if c["seed"] == seed])
                                      for seed in summary["attack_seeds"]}
        summary["mean_image_psnr_by_client"] = {
            client: float(np.mean([c["mean_image"]["psnr_best"] for c in chosen if c["client"] == client]))
            for client in summary["leakage_by_client"]}
        # The same captured clients score the attacker's mean image: leakage's floor without any update.
        summary["mean_image"] = ({m: float(np.mean([c["mean_image"][m] for c in chosen])) for m in METRICS}
                                 if chosen else None)
        per_attack: dict[str, list[float]] = defaultdict(list)
        for cell in cells:
            if (cell["dataset"], cell["defense"]) == (dataset, defense):
                per_attack[cell["attack"]].append(cell["psnr_best"])
        summary["psnr_best_per_attack"] = {a: float(np.mean(v)) for a, v in per_attack.items()}
        per_capture: dict[str, list[float]] = defaultdict(list)  # over the attacked seeds
        for c in chosen:
            per_capture[f"round{c['round']}-{c['client']}"].append(c["psnr_best"])
        summary["psnr_best_per_capture"] = {k: float(np.mean(v)) for k, v in per_capture.items()}
        summaries.append(summary)
    return summaries


def noise_by_client(histories: list[list[dict[str, Any]] | None]) -> dict[str, dict[str, float]] | None:
    """Where a calibrated defense's noise went, per client over the runs (None unless every run kept
    its history): the client's images, the share of its rounds that were noised, its mean amplitude
    in those rounds, and its share of all the noise (images x amplitude^2, summed over rounds)."""
    if not histories or any(h is None for h in histories):
        return None
    by_client: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for history in histories:
        for entry in history or ():
            by_client[entry["client"]].append(entry)
    energy = {c: sum(e["noised_samples"] * e["amplitude_mean"] ** 2 for e in mine) for c, mine in by_client.items()}
    total = sum(energy.values()) or 1.0
    out = {}
    for client in sorted(by_client, key=lambda c: (len(c), c)):
        mine = by_client[client]
        noised = [e["amplitude_mean"] for e in mine if e["noised_samples"]]
        out[client] = {"images": float(np.mean([e["samples"] for e in mine])),
                       "noised_round_share": len(noised) / len(mine),
                       "amplitude_when_noised": float(np.mean(noised)) if noised else 0.0,
                       "noise_share": energy[client] / total}
    return out


def _noise_tables(rows: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for s in rows:
        clients = s.get("noise_by_client")
        if not clients:
            continue
        lines += ["", f"### Where `{s['defense']}`'s noise went", "",
                  "Per client over every round of every seed: the share of rounds it noised, its mean amplitude "
                  "(RMS over the image's largest value) in those rounds, and its share of all the noise "
                  "(images x amplitude², summed over rounds).", "",
                  "| client | images | rounds noised | amplitude when noised | share of the noise |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c} | {v['images']:.0f} | {100 * v['noised_round_share']:.0f}% "
                  f"| {v['amplitude_when_noised']:.3f} | {100 * v['noise_share']:.1f}% |" for c, v in clients.items()]
    return lines


def _reference(summaries: list[dict[str, Any]], dataset: str) -> dict[str, Any] | None:
    return next((s for s in summaries if s["dataset"] == dataset and s["defense"] == REFERENCE), None)


# ---------------------------------------------------------------------------- verdicts
def goal_checks(summary: dict[str, Any], reference: dict[str, Any], goal: Goal, *,
                client: str | None = None) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for a GradGuard setting against no defense, over every captured
    update or over one attacked ``client``'s."""
    if client is None:
        ours, ref = summary["leakage"], reference["leakage"]
    else:
        ours, ref = summary["leakage_by_client"][client], reference["leakage_by_client"][client]
    psnr_drop = ref["psnr_best"] - ours["psnr_best"]
    ssim_drop = ref["ssim_best"] - ours["ssim_best"]
    ratio = ours["lpips_best"] / max(ref["lpips_best"], 1e-12)
    collapsed = _collapsed(summary, reference)
    checks = [
        (f"PSNR lower by >= {goal.psnr_drop} dB", f"{psnr_drop:+.2f} dB lower", psnr_drop >= goal.psnr_drop),
        (f"SSIM lower by >= {goal.ssim_drop}", f"{ssim_drop:+.3f} lower", ssim_drop >= goal.ssim_drop),
        (f"LPIPS at least {goal.lpips_ratio}x", f"{ratio:.2f}x", ratio >= goal.lpips_ratio),
    ]
    for metric in ("micro_f1", "macro_f1"):
        loss = 100 * (reference[f"{metric}_mean"] - summary[f"{metric}_mean"])
        checks.append((f"{metric.replace('_f1', '-F1')} within {goal.f1_points} point of no defense",
                       f"{loss:+.1f} points lost" + (" (collapsed runs: utility not measured)" if collapsed else ""),
                       loss <= goal.f1_points and not collapsed))
    return checks


def _collapsed(*summaries: dict[str, Any]) -> bool:
    return any(s["collapsed_runs"] for s in summaries)


def leakage_above_prior(summary: dict[str, Any]) -> float:
    """Best-match PSNR above the mean image's (dB), 0 at or below it: there the update reveals nothing
    the attacker's own data does not (the raw PSNR where a summary has no mean image)."""
    psnr = summary["leakage"]["psnr_best"]
    prior = summary.get("mean_image")
    return psnr if prior is None else max(psnr - prior["psnr_best"], 0.0)


Side = Literal["less", "same", "more"]


def compare_at_matched_f1(ours: tuple[float, float], other: tuple[float, float]) -> tuple[Side, Side]:
    """GradGuard's (leakage, micro-F1) against another setting's: whether its leakage is less, the
    same or more, and its F1 (the same within :data:`F1_MATCH`). The verdict rule of both reports."""
    (our_leak, our_f1), (other_leak, other_f1) = ours, other
    leak: Side = "same" if our_leak == other_leak else "less" if our_leak < other_leak else "more"
    f1: Side = "same" if abs(our_f1 - other_f1) <= F1_MATCH else "less" if our_f1 < other_f1 else "more"
    return leak, f1


# GradGuard's (leakage, F1) against the other setting's -> the federation report's verdict.
_MATCHED_F1_VERDICTS: dict[tuple[Side, Side], str] = {
    ("same", "same"): "tie (the same leakage at matched F1)",
    ("same", "more"): "GradGuard wins (more F1 at the same leakage)",
    ("same", "less"): "**GradGuard loses** (other: more F1 at the same leakage)",
    ("less", "same"): "GradGuard leaks less",
    ("more", "same"): "**GradGuard loses** (other leaks less at matched F1)",
    ("less", "less"): "trade-off: other has more F1 and leaks more",
    ("more", "less"): "**GradGuard loses** (other: more F1 and less leakage)",
    ("less", "more"): "GradGuard dominates (more F1, less leakage)",
    ("more", "more"): "trade-off: other has less F1 and leaks less",
}


def matched_f1_verdict(ours: dict[str, Any], other: dict[str, Any]) -> str:
    """How a GradGuard setting fares against another setting, judged at matched micro-F1.

    A collapsed run has no utility to match, so then only the leakage is compared. Leakage counts
    above the attacker's prior (two settings at or below it leak the same: nothing) and as the table
    prints it (0.01 dB): a difference it rounds away is the same leakage, not a verdict."""
    leak, f1 = compare_at_matched_f1((round(leakage_above_prior(ours), 2), ours["micro_f1_mean"]),
                                     (round(leakage_above_prior(other), 2), other["micro_f1_mean"]))
    if _collapsed(ours, other):
        return f"no verdict (collapsed runs); GradGuard leaks {'as much' if leak == 'same' else leak}"
    return _MATCHED_F1_VERDICTS[leak, f1]


# ---------------------------------------------------------------------------- Markdown
def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _epsilon(summary: dict[str, Any]) -> str:
    """A DP setting's epsilon; a delta without an epsilon is a run without noise (no guarantee)."""
    if summary["delta"] is not None and summary["epsilon"] is None:
        return "∞"
    return _fmt(summary["epsilon"])


def _f1(summary: dict[str, Any], metric: str) -> str:
    mean, sd = summary[f"{metric}_mean"], summary[f"{metric}_sd"]
    return f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _public_f1(summary: dict[str, Any]) -> str:
    """Micro- / macro-F1 with BatchNorm statistics of the server's public images, collapsed runs counted."""
    public = summary.get("bn_public")
    if public is None:
        return "–"
    collapsed = f" (**{public['collapsed_runs']}** collapsed)" if public["collapsed_runs"] else ""
    return f"{100 * public['micro_f1_mean']:.1f} / {100 * public['macro_f1_mean']:.1f}{collapsed}"


def _delta(value: float, ref: float | None, spec: str) -> str:
    return "" if ref is None else f" ({value - ref:{spec}})"


def markdown_table(dataset: str, summaries: list[dict[str, Any]], config: dict[str, Any]) -> str:
    rows = [s for s in summaries if s["dataset"] == dataset]
    ref = _reference(summaries, dataset)
    ref_leak = ref["leakage"] if ref and ref["leakage"] else None
    attacked = sorted({seed for s in rows for seed in s["attack_seeds"]})
    lines = [
        f"# {dataset}: leakage and utility per defense setting", "",
        f"Model {config['model']}" + (f" (width {config['width']})" if config["model"] == "smallcnn" else "")
        + f", {config['image_size']} px, 9-client layout at scale {config['scale']} ({config['distribution']}), "
        f"{config['rounds']} FedAvg rounds at lr {config['lr']} ({config.get('lr_schedule', 'constant')}), "
        f"seeds {list(config['seeds'])}. "
        f"Attacks: {', '.join(config['attacks'])}; rounds attacked {config['capture_rounds']} "
        f"in the runs of seed{'s' if len(attacked) > 1 else ''} {', '.join(map(str, attacked)) or '–'}.", "",
        "Leakage: for each captured update the strongest attack (plain or an adaptive variant: denoised and/or "
        "intensity-calibrated, whichever has the higher PSNR), averaged over the captured updates"
        + (" of every attacked run" if len(attacked) > 1 else "") + "; "
        "*best* = best match over the client's images "
        "(the paper's protocol), *strict* = one-to-one matching. Differences (in brackets) are to no defense; "
        "LPIPS as a ratio. F1 and accuracy in points, mean ± sd over seeds. *collapsed*: runs (of all seeds) "
        f"whose model predicts about one class (majority-class accuracy {100 * rows[0]['majority_accuracy']:.1f}). "
        "*public BN*: the same final models with BatchNorm statistics re-estimated on the public validation split "
        "(the server's own images), mean over seeds.",
        "",
        "| defense | PSNR best (Δ dB) | SSIM best (Δ) | LPIPS best (×) | PSNR strict (Δ) | SSIM strict "
        "| LPIPS strict | micro-F1 (Δ) | macro-F1 | ε | s/run | collapsed | micro / macro-F1, public BN |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        leak = s["leakage"]
        ref_f1 = ref["micro_f1_mean"] * 100 if ref else None
        if leak is None:
            cells = ["–"] * 6
        else:
            lpips_ratio = f" ({leak['lpips_best'] / ref_leak['lpips_best']:.2f}×)" if ref_leak else ""
            cells = [f"{leak['psnr_best']:.2f}" + _delta(leak["psnr_best"], ref_leak and ref_leak["psnr_best"], "+.2f"),
                     f"{leak['ssim_best']:.3f}" + _delta(leak["ssim_best"], ref_leak and ref_leak["ssim_best"], "+.3f"),
                     f"{leak['lpips_best']:.3f}{lpips_ratio}",
                     f"{leak['psnr_strict']:.2f}"
                     + _delta(leak["psnr_strict"], ref_leak and ref_leak["psnr_strict"], "+.2f"),
                     f"{leak['ssim_strict']:.3f}", f"{leak['lpips_strict']:.3f}"]
        f1 = _f1(s, "micro_f1") + _delta(100 * s["micro_f1_mean"], ref_f1, "+.1f")
        collapsed = f"**{s['collapsed_runs']}/{len(s['seeds'])}**" if s["collapsed_runs"] else "0"
        lines.append(f"| {s['defense']} | " + " | ".join(
            [*cells, f1, _f1(s, "macro_f1"), _epsilon(s), f"{s['seconds']:.0f}", collapsed, _public_f1(s)]) + " |")
    floor = next((s["mean_image"] for s in rows if s["mean_image"]), None)
    if floor is not None:
        lines.append("| *mean image (no update)* | " + " | ".join(
            f"{floor[m]:.{2 if m.startswith('psnr') else 3}f}" for m in METRICS) + " | – | – | – | – | – | – |")
        lines += ["", "*mean image*: the attacker's own data's mean image (the validation split), scored against "
                      "the same clients; it needs no update, so leakage at or below it reveals nothing beyond "
                      "the data distribution."]
    lines += _detail_tables(rows, ref, several_runs=len(attacked) > 1)
    lines += _verdicts(dataset, rows, ref)
    lines += _noise_tables(rows)
    return "\n".join(lines) + "\n"


def _detail_tables(rows: list[dict[str, Any]], ref: dict[str, Any] | None, *, several_runs: bool) -> list[str]:
    attacks = sorted({a for s in rows for a in s["psnr_best_per_attack"]})
    captures = list(dict.fromkeys(k for s in rows for k in s["psnr_best_per_capture"]))
    lines: list[str] = []
    if several_runs:
        seeds = sorted({seed for s in rows for seed in s["leakage_by_seed"]}, key=int)
        lines += ["", "## Leakage per attacked run: PSNR best in dB (Δ to no defense), SSIM best, LPIPS best", "",
                  "| defense | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
                  "|---|" + "---|" * len(seeds)]
        for s in rows:
            values = []
            for seed in seeds:
                leak, base = s["leakage_by_seed"].get(seed), ref and ref["leakage_by_seed"].get(seed)
                values.append("–" if leak is None else f"{leak['psnr_best']:.2f}"
                              + _delta(leak["psnr_best"], base["psnr_best"] if base else None, "+.2f")
                              + f" / {leak['ssim_best']:.3f} / {leak['lpips_best']:.3f}")
            lines.append(f"| {s['defense']} | " + " | ".join(values) + " |")
    over = "captured updates of every attacked run" if several_runs else "captured updates"
    lines += ["", f"## PSNR (best protocol, dB) per attack, mean over {over}", "",
             "| defense | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    lines += [f"| {s['defense']} | " + " | ".join(_fmt(s["psnr_best_per_attack"].get(a)) for a in attacks) + " |"
              for s in rows]
    lines += ["", "## PSNR (best protocol, dB) of the strongest attack per captured update"
              + (", mean over the attacked runs" if several_runs else ""), "",
              "| defense | " + " | ".join(captures) + " |", "|---|" + "---|" * len(captures)]
    lines += [f"| {s['defense']} | " + " | ".join(_fmt(s["psnr_best_per_capture"].get(c)) for c in captures) + " |"
              for s in rows]
    return lines


def _verdicts(dataset: str, rows: list[dict[str, Any]], ref: dict[str, Any] | None) -> list[str]:
    ours_rows = [s for s in rows if s["defense_name"] == "gradguard" and s["leakage"]]
    lines: list[str] = []
    goal = GOALS.get(dataset)
    for ours in ours_rows:
        if ref is not None and ref["leakage"] and goal is not None:
            clients = [c for c in ours.get("leakage_by_client", {}) if c in ref.get("leakage_by_client", {})]
            scopes = [("every captured update", None)] + [(f"{c}'s updates", c) for c in clients]
            lines += ["", f"## Goals: {ours['defense']} against no defense (the seed paper's gains)", "",
                      "| goal | " + " | ".join(name for name, _ in scopes) + " |", "|---|" + "---|" * len(scopes)]
            checks = [goal_checks(ours, ref, goal, client=c) for _, c in scopes]
            for i, (name, _, _) in enumerate(checks[0]):
                lines.append(f"| {name} | " + " | ".join(
                    f"{check[i][1]}" + ("" if check[i][2] else " (**not met**)") for check in checks) + " |")
            floors = "; ".join(f"{c}: {ref['leakage_by_client'][c]['psnr_best']:.2f} dB undefended, mean image "
                               f"{ref['mean_image_psnr_by_client'][c]:.2f} dB" for c in clients)
            if floors:
                lines += ["", f"Best-match PSNR of the strongest attack: {floors}. A client whose undefended "
                              "update leaks no more than the mean image gives a defense nothing to remove."]
        lines += ["", f"## {ours['defense']} against every other setting at matched F1 "
                      f"(micro-F1 within {100 * F1_MATCH:.0f} point)", "",
                  "| setting | micro-F1 − GradGuard's (points) | PSNR best above the prior − GradGuard's (dB) "
                  "| verdict |",
                  "|---|---|---|---|"]
        for other in rows:
            if other is ours or other["leakage"] is None:
                continue
            lines.append(f"| {other['defense']} | {100 * (other['micro_f1_mean'] - ours['micro_f1_mean']):+.1f} | "
                         f"{leakage_above_prior(other) - leakage_above_prior(ours):+.2f} | "
                         f"{matched_f1_verdict(ours, other)} |")
    return lines


# ---------------------------------------------------------------------------- figures
def privacy_utility_plot(dataset: str, summaries: list[dict[str, Any]], path: Path) -> None:
    """Attack PSNR (best protocol) against micro- and macro-F1, one point per defense setting.

    Points carry numbers and a key lists the settings: with two dozen settings, full labels
    beside the points overlap and run off the axes.
    """
    from matplotlib.figure import Figure

    rows = [s for s in summaries if s["dataset"] == dataset and s["leakage"]]
    figure = Figure(figsize=(19, 6.5), constrained_layout=True)
    grid = figure.add_gridspec(1, 3, width_ratios=(1, 1, 1.25))
    axes = [figure.add_subplot(grid[0, 0])]
    axes.append(figure.add_subplot(grid[0, 1], sharey=axes[0]))
    for ax, metric in zip(axes, ("micro_f1", "macro_f1")):
        for number, s in enumerate(rows, 1):
            x, y = 100 * s[f"{metric}_mean"], s["leakage"]["psnr_best"]
            sd = 100 * s[f"{metric}_sd"] if s[f"{metric}_sd"] is not None else None
            ours = s["defense_name"] == "gradguard"
            ax.errorbar(x, y, xerr=sd, fmt="x" if s["collapsed_runs"] else ("*" if ours else "o"),
                        markersize=12 if ours else 7, color="tab:red" if ours else "tab:blue", capsize=3,
                        alpha=0.8)
            ax.annotate(str(number), (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
        floor = next((s["mean_image"] for s in rows if s["mean_image"]), None)
        if floor is not None:
            ax.axhline(floor["psnr_best"], color="grey", linestyle="--", linewidth=1,
                       label="attacker's mean image (no update)")
            ax.legend(loc="upper left", fontsize=7)
        ax.set_xlabel(f"{metric.replace('_', '-')} (points, mean ± sd over seeds)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("attack PSNR, best protocol (dB; lower is more private)")
    key = figure.add_subplot(grid[0, 2])
    key.axis("off")
    key.text(0, 1, "\n".join(f"{n:>2}  {s['defense']}" + (" (collapsed)" if s["collapsed_runs"] else "")
                             for n, s in enumerate(rows, 1)),
             va="top", ha="left", fontsize=7, family="monospace", transform=key.transAxes)
    figure.suptitle(f"{dataset}: privacy against utility (strongest attack, adaptive included; "
                    "red stars: GradGuard settings)")
    figure.savefig(path, dpi=130)


def image_grid(cells: list[dict[str, Any]], root: Path, title: str, path: Path) -> None:
    """Originals against reconstructions: a row per defense, an (original, reconstruction) pair per image."""
    from matplotlib.figure import Figure

    clients = list(dict.fromkeys(c["client"] for c in cells))
    rows = list(dict.fromkeys(c["defense"] for c in cells))
    loaded = {(c["defense"], c["client"]): (c, torch.load(root / c["images"], weights_only=True)) for c in cells}
    widths = {cl: min(GRID_IMAGES_PER_CLIENT, max(len(v[1]["reconstruction"]) for k, v in loaded.items()
                                                   if k[1] == cl)) for cl in clients}
    columns = 2 * sum(widths.values())
    figure = Figure(figsize=(1.1 * columns + 2.2, 1.2 * len(rows) + 0.8), constrained_layout=True)
    axes = np.atleast_2d(figure.subplots(len(rows), columns, squeeze=False))
    for r, defense in enumerate(rows):
        col = 0
        for client in clients:
            cell, images = loaded.get((defense, client), (None, None))
            for i in range(widths[client]):
                for kind in ("original", "reconstruction"):
                    ax = axes[r, col]
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if images is not None and i < len(images[kind]):
                        image = images[kind][i].permute(1, 2, 0).numpy()
                        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1,
                                  interpolation="nearest")  # the pixels as they are; small PNGs
                    if r == 0:
                        ax.set_title(f"{client}\n{'orig' if kind == 'original' else 'recon'} {i + 1}", fontsize=7)
                    col += 1
        first = loaded.get((defense, clients[0]))
        label = defense if first is None else f"{defense}\n{first[0]['psnr_best']:.1f} dB ({first[0]['variant']})"
        axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=110)


# ---------------------------------------------------------------------------- entry point
def write_report(results: dict[str, Any], out: str | Path, *, cache: str | Path | None = None) -> list[Path]:
    """Complete ``results`` (per-setting summaries, each cell's utility), write results.json,
    a table per dataset and the figures into ``out``; returns the files written.

    ``cache`` is the benchmark directory that the cells' ``images`` paths are relative to
    (default ``out``)."""
    root = Path(out)
    cache_root = Path(cache) if cache is not None else root
    figures = root / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    summaries = summarize(results["runs"], results["cells"])
    by_setting = {(s["dataset"], s["defense"]): s for s in summaries}
    results["defenses"] = summaries
    for cell in results["cells"]:
        s = by_setting[cell["dataset"], cell["defense"]]
        cell["utility"] = {k: s[k] for k in (*(f"{m}_mean" for m in UTILITY), "epsilon", "seconds", "collapsed_runs")}
    files = [root / "results.json"]
    files[0].write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    for dataset in results["config"]["datasets"]:
        table = root / f"table_{dataset}.md"
        table.write_text(markdown_table(dataset, summaries, results["config"]))
        plot = figures / f"privacy_utility_{dataset}.png"
        privacy_utility_plot(dataset, summaries, plot)
        files += [table, plot]
        groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
        first = results["config"]["seeds"][0]  # the grids show the first attacked run's images
        for cell in results["cells"]:
            if cell["dataset"] == dataset and cell["seed"] == first:
                groups[cell["attack"], cell["round"]].append(cell)
        for (attack, round_), group in groups.items():
            grid = figures / f"grid_{dataset}_{slugify(attack)}_round{round_}.png"
            image_grid(group, cache_root, f"{dataset}, {attack}, round {round_}: originals vs reconstructions "
                                    "(row label: PSNR of the first client, variant)", grid)
            files.append(grid)
    return files
