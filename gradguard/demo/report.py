"""The demo's report: figures, an HTML page and its Markdown twin, results.json and the tensors
behind the numbers (the final global model and the reconstructions), so every figure can be re-checked.
"""
from __future__ import annotations

import dataclasses
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from torch import Tensor

from gradguard import MaskExplanation
from gradguard.demo.comparison import Outcome, Prior
from gradguard.demo.config import DemoConfig
from gradguard.transport.codec import write_tensors

MASK_FIGURE = "masks.png"
RECONSTRUCTION_FIGURE = "reconstructions.png"
PRIVACY_UTILITY_FIGURE = "privacy_utility.png"
COLUMNS = ("defense", "accuracy ↑", "macro-F1 ↑", "PSNR above prior (dB) ↓", "SSIM above prior ↓", "PSNR (dB)",
           "SSIM", "LPIPS ↑", "scored", "(ε, δ) of the attacked update")
SCORING = ("Each reconstruction is scored plain, after the adaptive attacker's blind denoising (tv: total "
           "variation, nlm: non-local means) and with each calibrated to the public split's brightness and "
           "contrast (+calibrated); the strongest (highest PSNR) counts, as in `make bench`. *Above prior*: its "
           "PSNR and SSIM minus those of the best guess the attacker makes without any update, the public "
           "split's mean image (overall or of the attacked image's class); at or below 0 the update told the "
           "attacker nothing it could see. Accuracy and macro-F1: the test split, each defense's own "
           "federation (the same clients, data order and training, only the defense differs). The attack runs "
           "on the GradGuard federation's final global model for every defense, so the three updates differ "
           "only in their defense.")


def global_model_file(defense: str) -> str:
    """The file of ``defense``'s final global model in the report folder."""
    return f"global_model_{defense}.safetensors"


def _number(value: float | None, digits: int, *, sign: bool = False) -> str:
    return "n/a" if value is None else f"{value:{'+' if sign else ''}.{digits}f}"


@dataclass
class DemoResult:
    """Everything the report shows.

    utility: per defense, its federation's final global model's test metrics
        (:func:`gradguard.eval.bench.evaluate`'s, test_images, and DP-SGD's (epsilon, delta) over
        all rounds); None in the offline fallback, which trains no federation.
    figure_images / figure_captions: the images of the mask figure, one caption each.
    victim_caption: the attacked image (the first of ``figure_images``).
    prior: the attacker's guess without an update; None without public images (the fallback).
    global_states: per defense, its federation's final global model (the fallback: GradGuard's
        locally warmed-up model only).
    """

    config: DemoConfig
    data_source: str
    fallback_reason: str
    device: str
    utility: dict[str, Any] | None
    explanation: MaskExplanation
    figure_images: Tensor
    figure_captions: list[str]
    victim_caption: str
    outcomes: list[Outcome]
    prior: Prior | None
    lpips_source: str
    global_states: dict[str, dict[str, Tensor]]
    bytes_sent: int
    seconds: dict[str, float] = field(default_factory=dict)

    def table(self) -> list[list[str]]:
        """The leakage table's rows, formatted, in the order of :data:`COLUMNS`."""
        rows = []
        for o in self.outcomes:
            utility = (self.utility or {}).get(o.defense, {})
            guarantee = f"({o.epsilon:.2f}, {o.delta:g})" if o.epsilon is not None else "none"
            rows.append([o.label, _number(utility.get("accuracy"), 3), _number(utility.get("macro_f1"), 3),
                         _number(o.psnr_above_prior, 2, sign=True), _number(o.ssim_above_prior, 3, sign=True),
                         f"{o.psnr:.2f}", f"{o.ssim:.3f}", _number(o.lpips, 3), o.variant, guarantee])
        return rows

    def prior_text(self) -> str:
        if self.prior is None:
            return "No public images (no MedMNIST data), so no attacker's prior: nothing is scored above it."
        p = self.prior
        guess = "mean image of its class" if p.guess == "class_mean" else "mean image"
        return (f"The attacker's prior: the public (validation) split's {guess} scores PSNR {p.psnr:.2f} dB, "
                f"SSIM {p.ssim:.3f} against the attacked image.")

    def settings(self) -> list[tuple[str, str]]:
        cfg = self.config
        rows = [("data", self.data_source)]
        if self.fallback_reason:
            rows.append(("why not MedMNIST", self.fallback_reason))
        else:
            rows.append(("federation", f"{cfg.clients} GradGuard clients x {cfg.images_per_client} images (IID), "
                                       f"batch {cfg.batch_size}, {cfg.rounds} rounds of {cfg.local_epochs} local "
                                       f"epoch(s) (Adam, lr {cfg.lr:g}); FedAvg over gRPC on loopback"))
            rows.append(("bytes sent by the clients", f"{self.bytes_sent:,}"))
        rows += [("model", f"SmallCNN (width {cfg.model_width}, BatchNorm), {cfg.image_size} px"),
                 ("attacked image", self.victim_caption),
                 ("attack", f"Inverting Gradients, {cfg.attack_iterations} steps, 1 restart, seed {cfg.seed}, "
                            "true label given, on the batch-1 update (one SGD step) of the client's first image; "
                            "the model: " + ("the locally warmed-up one" if self.fallback_reason
                                             else "the final global one")),
                 ("DP-SGD", f"Opacus, noise multiplier {cfg.dpsgd_noise_multiplier}, clipping norm "
                            f"{cfg.dpsgd_max_grad_norm}, BatchNorm on running statistics"),
                 ("LPIPS backbone", self.lpips_source), ("device", self.device),
                 ("run time", f"{sum(self.seconds.values()):.0f} s")]
        return rows

    def utility_text(self) -> str:
        if self.utility is None:
            return "No federation ran (no MedMNIST data), so there is no global-model accuracy."
        cfg, labels = self.config, {o.defense: o.label for o in self.outcomes}
        parts = []
        for defense, u in self.utility.items():
            collapsed = ", collapsed to (almost) one class" if u["collapsed"] else ""
            guarantee = f", (ε, δ) = ({u['epsilon']:.2f}, {u['delta']:g}) over all rounds" \
                if u["epsilon"] is not None else ""
            parts.append(f"{labels[defense]}: accuracy {u['accuracy']:.3f}, macro-F1 {u['macro_f1']:.3f}"
                         f"{guarantee}{collapsed}")
        majority = next(iter(self.utility.values()))["majority_accuracy"]
        return (f"Final global models after {cfg.rounds} rounds of FedAvg, one federation per defense, on "
                f"{next(iter(self.utility.values()))['test_images']} test images (the majority class is "
                f"{majority:.3f} of them): " + "; ".join(parts) + ". A few rounds on a few hundred images is a "
                "smoke test, not a utility measurement: `make bench` runs the evaluation protocol.")

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "data_source": self.data_source, "fallback_reason": self.fallback_reason,
            "device": self.device, "utility": self.utility, "victim": self.victim_caption,
            "prior": dataclasses.asdict(self.prior) if self.prior is not None else None,
            "lpips_source": self.lpips_source, "bytes_sent": self.bytes_sent, "seconds": self.seconds,
            "leakage": [{"defense": o.defense, "label": o.label, "psnr": o.psnr, "ssim": o.ssim, "lpips": o.lpips,
                         "psnr_above_prior": o.psnr_above_prior, "ssim_above_prior": o.ssim_above_prior,
                         "variant": o.variant, "epsilon": o.epsilon, "delta": o.delta} for o in self.outcomes],
        }


def _show(axis: Axes, image: Tensor, *, cmap: str = "gray", title: str = "", vmin: float = 0.0,
          vmax: float = 1.0) -> AxesImage:
    shown = axis.imshow(image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy(),
                        cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    if title:
        axis.set_title(title, fontsize=8)
    return shown


def mask_figure(result: DemoResult, path: Path) -> None:
    """Per image: the image, its vulnerability, relevance and mask maps, the noise and the noised
    input, each map with a colorbar. A column shares one colour scale, so images compare."""
    e = result.explanation
    noise = e.noised - result.figure_images
    reach = max(float(noise.abs().max()), 1e-12)
    # (title, images, colour map, colour range: None spans the column's values)
    columns: list[tuple[str, Tensor, str, tuple[float, float] | None]] = [
        ("image", result.figure_images, "gray", (0.0, 1.0)), ("vulnerability", e.vulnerability, "magma", None),
        ("relevance", e.relevance, "magma", None), ("mask", e.mask, "magma", None),
        ("noise (noised − image)", noise, "RdBu_r", (-reach, reach)),
        ("noised input", e.noised.clamp(0, 1), "gray", (0.0, 1.0))]
    rows = len(result.figure_images)
    fig = Figure(figsize=(2.2 * len(columns), 1.9 * rows + 0.4))
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for j, (name, images, cmap, span) in enumerate(columns):
        low, high = span if span is not None else (float(images.min()), float(images.max()))
        for i in range(rows):
            shown = _show(axes[i][j], images[i], cmap=cmap, title=name if i == 0 else "", vmin=low, vmax=high)
            if j > 0:  # the clean image needs no scale
                fig.colorbar(shown, ax=axes[i][j], fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    for i in range(rows):
        axes[i][0].set_ylabel(result.figure_captions[i], fontsize=6)
    fig.suptitle("GradGuard's maps (noised input clipped to [0, 1] for display)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def reconstruction_figure(result: DemoResult, path: Path) -> None:
    """The attacked image and the attack's reconstruction under each defense, with its PSNR."""
    panels = [("attacked image", result.figure_images[0])] + \
             [(f"{o.defense} ({o.variant})\n{o.psnr:.1f} dB", o.reconstruction[0]) for o in result.outcomes]
    fig = Figure(figsize=(1.9 * len(panels), 2.3))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for axis, (title, image) in zip(axes[0], panels):
        _show(axis, image, title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def privacy_utility_figure(result: DemoResult, path: Path) -> bool:
    """Leakage above the prior against macro-F1, a labelled point per defense; False (no figure)
    without utility or a prior (the offline fallback)."""
    if result.utility is None or result.prior is None:
        return False
    fig = Figure(figsize=(6.4, 4.4))
    axis = fig.subplots()
    for o in result.outcomes:
        x, y = result.utility[o.defense]["macro_f1"], o.psnr_above_prior
        assert y is not None  # scored above the prior, which exists here
        axis.plot(x, y, "*" if o.defense == "gradguard" else "o", markersize=12 if o.defense == "gradguard" else 8,
                  color={"none": "tab:grey", "gradguard": "tab:red"}.get(o.defense, "tab:blue"))
        axis.annotate(o.label, (x, y), fontsize=8, xytext=(5, 4), textcoords="offset points")
    axis.axhline(0, color="grey", linestyle="--", linewidth=1, label="the attacker's prior (no update)")
    axis.margins(x=0.25, y=0.2)
    axis.legend(loc="best", fontsize=8)
    axis.set_xlabel("macro-F1, test split (its own federation; higher is better)")
    axis.set_ylabel("PSNR above the prior (dB; lower leaks less)")
    axis.set_title("Privacy against utility: down and to the right is better", fontsize=9)
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


INTRO = ("What a gradient inversion attack recovers of one patient image from its client's update, without a "
         "defense, with GradGuard and with Opacus DP-SGD, and what each defense costs the federation's model.")
MASKS = ("Noise goes where the shadow attacker reconstructs well (vulnerability) and is kept away from where the "
         "global model looks for the diagnosis (relevance).")
CAVEAT = "One image, one seed: an illustration, not the benchmark (`make bench`)."


def markdown(result: DemoResult, *, plot: bool) -> str:
    table = [f"| {' | '.join(COLUMNS)} |", f"|{'---|' * len(COLUMNS)}"] + \
            [f"| {' | '.join(row)} |" for row in result.table()]
    settings = ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in result.settings()]
    figure = [f"![privacy against utility]({PRIVACY_UTILITY_FIGURE})", ""] if plot else []
    return "\n".join([
        "# GradGuard demo report", "", INTRO, "",
        "## Leakage and utility (lower leakage above the prior and higher accuracy/F1 are better)", "",
        *table, "", result.prior_text(), "", SCORING, "", *figure,
        f"![reconstructions]({RECONSTRUCTION_FIGURE})", "",
        "## Utility", "", result.utility_text(), "",
        "## GradGuard's masks", "", MASKS, "", f"![masks]({MASK_FIGURE})", "",
        "## Settings", "", *settings, "", CAVEAT, ""])


def _html_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(result: DemoResult, *, plot: bool) -> str:
    settings = _html_table(["setting", "value"], [list(row) for row in result.settings()])
    figure = (f'<img src="{PRIVACY_UTILITY_FIGURE}" alt="leakage above the prior against macro-F1, per defense">'
              if plot else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>GradGuard demo report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:.3em .6em;text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>GradGuard demo report</h1>
<p>{html.escape(INTRO)}</p>
<h2>Leakage and utility (lower leakage above the prior and higher accuracy/F1 are better)</h2>
{_html_table(COLUMNS, result.table())}
<p>{html.escape(result.prior_text())}</p>
<p>{html.escape(SCORING)}</p>
{figure}
<img src="{RECONSTRUCTION_FIGURE}" alt="the attacked image and its reconstructions">
<h2>Utility</h2><p>{html.escape(result.utility_text())}</p>
<h2>GradGuard's masks</h2>
<p>{html.escape(MASKS)}</p>
<img src="{MASK_FIGURE}" alt="image, vulnerability, relevance, mask, noise and noised input per image">
<h2>Settings</h2>{settings}
<p>{html.escape(CAVEAT)}</p>
</body></html>
"""


def write_report(result: DemoResult, out: Path) -> Path:
    """Write the report into ``out`` (created if needed); returns the path of index.html."""
    out.mkdir(parents=True, exist_ok=True)
    mask_figure(result, out / MASK_FIGURE)
    reconstruction_figure(result, out / RECONSTRUCTION_FIGURE)
    plot = privacy_utility_figure(result, out / PRIVACY_UTILITY_FIGURE)
    (out / "README.md").write_text(markdown(result, plot=plot))
    (out / "results.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    for defense, state in result.global_states.items():
        write_tensors(out / global_model_file(defense), state)
    write_tensors(out / "reconstructions.safetensors",
                  {"attacked_image": result.figure_images[:1],
                   **{o.defense: o.reconstruction for o in result.outcomes}})
    page = out / "index.html"
    page.write_text(html_page(result, plot=plot))
    return page
