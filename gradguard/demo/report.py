"""The demo's report: figures, an HTML page and its Markdown twin, results.json and the tensors
behind the numbers (the final global model and the reconstructions), so every figure can be re-checked.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from torch import Tensor

from gradguard import MaskExplanation
from gradguard.demo.comparison import Outcome
from gradguard.demo.config import DemoConfig
from gradguard.transport.codec import write_tensors

MASK_FIGURE = "masks.png"
RECONSTRUCTION_FIGURE = "reconstructions.png"
COLUMNS = ("defense", "PSNR (dB) ↓", "SSIM ↓", "LPIPS ↑", "scored", "(ε, δ)")
SCORING = ("Each reconstruction is scored plain, after the adaptive attacker's blind denoising (tv: total "
           "variation, nlm: non-local means) and with each calibrated to the test split's brightness and contrast "
           "(+calibrated); the strongest (highest PSNR) counts, as in `make bench`.")


@dataclass
class DemoResult:
    """Everything the report shows.

    utility: the final global model's test metrics (:func:`gradguard.eval.bench.evaluate`'s, and
        test_images); None in the offline fallback, which trains no federation.
    figure_images / figure_captions: the images of the mask figure, one caption each.
    victim_caption: the attacked image (the first of ``figure_images``).
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
    lpips_source: str
    global_state: dict[str, Tensor]
    bytes_sent: int
    seconds: dict[str, float] = field(default_factory=dict)

    def table(self) -> list[list[str]]:
        """The leakage table's rows, formatted, in the order of :data:`COLUMNS`."""
        rows = []
        for o in self.outcomes:
            lpips = f"{o.lpips:.3f}" if o.lpips is not None else "n/a"
            guarantee = f"({o.epsilon:.2f}, {o.delta:g})" if o.epsilon is not None else "none"
            rows.append([o.label, f"{o.psnr:.2f}", f"{o.ssim:.3f}", lpips, o.variant, guarantee])
        return rows

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
        u, cfg = self.utility, self.config
        majority = f"the majority class is {u['majority_accuracy']:.3f} of the test images"
        verdict = f"it has collapsed to (almost) one class ({majority})" if u["collapsed"] else majority
        return (f"Global model after {cfg.rounds} rounds of GradGuard-protected FedAvg: test accuracy "
                f"{u['accuracy']:.3f}, macro-F1 {u['macro_f1']:.3f} on {u['test_images']} test images; {verdict}. "
                "A few rounds on a few hundred images is a smoke test, not a utility measurement: "
                "`make bench` runs the evaluation protocol.")

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "data_source": self.data_source, "fallback_reason": self.fallback_reason,
            "device": self.device, "utility": self.utility, "victim": self.victim_caption,
            "lpips_source": self.lpips_source, "bytes_sent": self.bytes_sent, "seconds": self.seconds,
            "leakage": [{"defense": o.defense, "label": o.label, "psnr": o.psnr, "ssim": o.ssim, "lpips": o.lpips,
                         "variant": o.variant, "epsilon": o.epsilon, "delta": o.delta} for o in self.outcomes],
        }


def _show(axis, image: Tensor, *, cmap: str = "gray", title: str = "") -> None:
    axis.imshow(image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy(),
                cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    if title:
        axis.set_title(title, fontsize=8)


def mask_figure(result: DemoResult, path: Path) -> None:
    """Per image: the image, its vulnerability, relevance and mask maps, and the noised input."""
    e = result.explanation
    columns = [("image", result.figure_images, "gray"), ("vulnerability", e.vulnerability, "magma"),
               ("relevance", e.relevance, "magma"), ("mask", e.mask / e.mask.flatten(1).amax(1).view(-1, 1, 1, 1),
                                                     "magma"),
               ("noised input", e.noised.clamp(0, 1), "gray")]
    rows = len(result.figure_images)
    fig = Figure(figsize=(1.7 * len(columns), 1.8 * rows + 0.3))
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for i in range(rows):
        for j, (name, images, cmap) in enumerate(columns):
            _show(axes[i][j], images[i], cmap=cmap, title=name if i == 0 else "")
        axes[i][0].set_ylabel(result.figure_captions[i], fontsize=6)
    fig.suptitle("GradGuard's maps (mask scaled to its peak; noised input clipped to [0, 1])", fontsize=9)
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


def markdown(result: DemoResult) -> str:
    table = [f"| {' | '.join(COLUMNS)} |", f"|{'---|' * len(COLUMNS)}"] + \
            [f"| {' | '.join(row)} |" for row in result.table()]
    settings = ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in result.settings()]
    return "\n".join([
        "# GradGuard demo report", "",
        "What a gradient inversion attack recovers of one patient image from its client's update, "
        "without a defense, with GradGuard and with Opacus DP-SGD.", "",
        "## Leakage (lower PSNR/SSIM and higher LPIPS mean less leaked)", "", *table, "", SCORING, "",
        f"![reconstructions]({RECONSTRUCTION_FIGURE})", "",
        "## Utility", "", result.utility_text(), "",
        "## GradGuard's masks", "",
        "Noise goes where the shadow attacker reconstructs well (vulnerability) and is kept away from "
        "where the global model looks for the diagnosis (relevance).", "",
        f"![masks]({MASK_FIGURE})", "",
        "## Settings", "", *settings, "",
        "One image, one seed: an illustration, not the benchmark (`make bench`).", ""])


def _html_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(result: DemoResult) -> str:
    settings = _html_table(["setting", "value"], [list(row) for row in result.settings()])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>GradGuard demo report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:.3em .6em;text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>GradGuard demo report</h1>
<p>What a gradient inversion attack recovers of one patient image from its client's update, without a
defense, with GradGuard and with Opacus DP-SGD.</p>
<h2>Leakage (lower PSNR/SSIM and higher LPIPS mean less leaked)</h2>
{_html_table(COLUMNS, result.table())}
<p>{html.escape(SCORING)}</p>
<img src="{RECONSTRUCTION_FIGURE}" alt="the attacked image and its reconstructions">
<h2>Utility</h2><p>{html.escape(result.utility_text())}</p>
<h2>GradGuard's masks</h2>
<p>Noise goes where the shadow attacker reconstructs well (vulnerability) and is kept away from where the
global model looks for the diagnosis (relevance).</p>
<img src="{MASK_FIGURE}" alt="image, vulnerability, relevance, mask and noised input per image">
<h2>Settings</h2>{settings}
<p>One image, one seed: an illustration, not the benchmark (<code>make bench</code>).</p>
</body></html>
"""


def write_report(result: DemoResult, out: Path) -> Path:
    """Write the report into ``out`` (created if needed); returns the path of index.html."""
    out.mkdir(parents=True, exist_ok=True)
    mask_figure(result, out / MASK_FIGURE)
    reconstruction_figure(result, out / RECONSTRUCTION_FIGURE)
    (out / "README.md").write_text(markdown(result))
    (out / "results.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    write_tensors(out / "global_model.safetensors", result.global_state)
    write_tensors(out / "reconstructions.safetensors",
                  {"attacked_image": result.figure_images[:1],
                   **{o.defense: o.reconstruction for o in result.outcomes}})
    page = out / "index.html"
    page.write_text(html_page(result))
    return page
