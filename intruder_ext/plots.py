"""Plots (matplotlib, PNG, Agg backend) and the Markdown report that embeds them.

Everything here draws from numbers already computed: the per-layer records of a report and the
layer views of :func:`intruder_ext.detection.layer_view` (base spectrum and the top-k of the
tuned weight by the fast path). Nothing is recomputed here with another method.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import torch

from .checkpoints import atomic_file

import matplotlib

matplotlib.use("Agg")  # no display: files only, safe on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402

# The thresholds of the "intruder count against epsilon" plots.
EPSILONS = [round(0.05 * i, 2) for i in range(1, 20)]


def _save(fig, path: str) -> str:
    """Written atomically (a temporary name, then renamed): never a truncated PNG."""
    fig.tight_layout()
    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def plot_similarity(sim: torch.Tensor, title: str, path: str,
                    intruders: Sequence[int] = ()) -> str:
    """Heatmap of |U_tuned^T U_base|; rows of intruders are marked on the y axis."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(sim.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_xlabel("base singular vector (by rank)")
    ax.set_ylabel("tuned singular vector (by rank)")
    ax.set_title(title, fontsize=9)
    rows = [j for j in intruders if j < sim.shape[0]]
    for j in rows:
        ax.axhline(j, color="crimson", lw=0.6, ls=":")
    if rows:  # named in the title: labels on adjacent rows would print on top of each other
        ax.set_title(f"{title}\nintruders (red dotted rows): {', '.join(map(str, rows))}",
                     fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="|cosine|")
    return _save(fig, path)


def plot_counts_per_layer(names: Sequence[str], counts: Sequence[int], title: str,
                          path: str) -> str:
    """Bar chart: number of intruders among the top-k of each layer."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.32 * len(names) + 1.5), 3.8))
    ax.bar(range(len(names)), counts, color="tab:red")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("intruders in top-k")
    ax.set_title(title, fontsize=9)
    ax.yaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


def count_vs_epsilon(max_cos_per_layer: Iterable[Sequence[float]],
                     epsilons: Sequence[float]) -> list[int]:
    """Total intruders over layers for each epsilon, from each layer's top-k max |cos|."""
    values = [float(v) for layer in max_cos_per_layer for v in layer]
    return [sum(v < eps for v in values) for eps in epsilons]


def null_range(records) -> tuple[float, float]:
    """The chance level to mark on a plot of several layers: the largest null median and 99th
    percentile of max |cos| over the records (the widest layer sets the lowest)."""
    return (max(r.null_max_cos for r in records), max(r.null_max_cos_p99 for r in records))


def plot_count_vs_epsilon(series: Mapping[str, Sequence[int]], epsilons: Sequence[float],
                          title: str, path: str, null: tuple[float, float] | None = None) -> str:
    """One line per run: total intruder count against the threshold epsilon. ``null``
    (median, p99 of a random direction's max |cos|, from :func:`null_range`) is shaded: an
    epsilon there counts chance-level directions as aligned."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    if null is not None:
        ax.axvspan(0, null[1], color="0.85", zorder=0,
                   label=f"random direction: max |cos| up to p99 {null[1]:.3f}")
        ax.axvline(null[0], color="0.45", ls="--", lw=1,
                   label=f"random direction: median {null[0]:.3f}")
    for label, counts in series.items():
        ax.plot(epsilons, counts, marker="o", ms=3, label=label)
    ax.set_xlabel("epsilon (intruder if max |cos| < epsilon)")
    ax.set_ylabel("intruders, all layers")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_series(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str,
                ylabel: str, title: str, path: str, logx: bool = False,
                hlines: Mapping[str, float] | None = None, counts: bool = False) -> str:
    """Lines ``label -> (xs, ys)`` on common axes (intruders against steps or rank, forgetting
    against rank, ...); ``hlines``: labelled horizontal references (e.g. full fine-tuning);
    ``counts``: integer y ticks from 0."""
    fig, ax = plt.subplots(figsize=(6.0, 3.9))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, color=f"C{len(series) + i}", ls="--", lw=1.2, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if counts:
        ax.set_ylim(bottom=0, top=max(1, ax.get_ylim()[1]))
        ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_spectrum(s_base: torch.Tensor, s_tuned: torch.Tensor, intruders: Sequence[int],
                  title: str, path: str, n: int = 40) -> str:
    """Leading singular values of W0 and W; intruders (indices into W's spectrum) marked."""
    n = min(n, s_base.numel(), s_tuned.numel())
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    ax.plot(range(n), s_base[:n].numpy(), "o-", ms=3, color="tab:blue", label="W0 (base)")
    ax.plot(range(n), s_tuned[:n].numpy(), "s-", ms=3, color="tab:orange", label="W (tuned)")
    marked = [j for j in intruders if j < n]
    if marked:
        ax.scatter(marked, s_tuned[marked].numpy(), s=90, facecolors="none",
                   edgecolors="crimson", linewidths=1.5, label="intruder", zorder=3)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value")
    lo = float(torch.cat([s_base[:n], s_tuned[:n]]).clamp(min=1e-12).min())
    if float(max(s_base[0], s_tuned[0])) > 50 * lo:  # large intruders would flatten the rest
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_bars(labels: Sequence[str], values: Sequence[float], ylabel: str, title: str,
              path: str, color: str = "tab:purple") -> str:
    """Generic labelled bar chart (one bar per run)."""
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(labels) + 1.5), 3.6))
    bars = ax.bar(range(len(labels)), values, color=color)
    ax.bar_label(bars, fmt="%g", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_grouped_bars(labels: Sequence[str], groups: Mapping[str, Sequence[float | None]],
                      ylabel: str, title: str, path: str) -> str:
    """Bars grouped per run (e.g. tuned / mitigated); a None value leaves its bar out."""
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(labels) + 1.5), 3.6))
    width = 0.8 / max(len(groups), 1)
    for g, (name, values) in enumerate(groups.items()):
        xs = [i + (g - (len(groups) - 1) / 2) * width for i, v in enumerate(values) if v is not None]
        vs = [v for v in values if v is not None]
        bars = ax.bar(xs, vs, width=width, label=name)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_markdown(path: str, title: str, sections: Sequence[tuple[str, str]],
                   images: Sequence[tuple[str, str]] = ()) -> str:
    """Markdown report: text sections, then the images (caption, file) linked relative to it."""
    base = os.path.dirname(os.path.abspath(path))
    lines = [f"# {title}", ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", body.rstrip(), ""]
    if images:
        lines += ["## Plots", ""]
        for caption, image in images:
            rel = os.path.relpath(os.path.abspath(image), base).replace(os.sep, "/")
            lines += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    with atomic_file(path) as f:
        f.write("\n".join(lines))
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def short_name(name: str) -> str:
    """A layer name without the leading model path (``model.layers.0.x`` -> ``layers.0.x``)."""
    for marker in ("model.", "encoder.", "transformer."):
        if marker in name:
            return name.split(marker, 1)[-1]
    return name


def report_plots(report, directory: str, epsilons=None) -> list[tuple[str, str]]:
    """Intruders per layer and count against epsilon, from a report's records."""
    epsilons = EPSILONS if epsilons is None else epsilons
    names = [short_name(m.name) for m in report]
    return [
        ("Intruders per layer", plot_counts_per_layer(
            names, [m.num_intruders for m in report],
            f"Intruders in top-{report.top_k} (epsilon={report.epsilon})",
            os.path.join(directory, "intruders_per_layer.png"))),
        ("Intruder count against epsilon", plot_count_vs_epsilon(
            {"all layers": count_vs_epsilon([m.max_cos.tolist() for m in report], epsilons)},
            epsilons, f"Intruder count against epsilon (top-{report.top_k})",
            os.path.join(directory, "count_vs_epsilon.png"),
            null_range(report.modules) if len(report) else None)),
    ]


def layer_plots(view, directory: str, suffix: str, label: str = "") -> dict:
    """Similarity heatmap and spectra of one layer view (``detection.LayerView``):
    ``{"heatmap": (caption, path), "spectrum": (caption, path)}``."""
    name = (label + ": " if label else "") + short_name(view.name)
    return {
        "heatmap": (f"Similarity |U_tuned^T U_base|: {name}", plot_similarity(
            view.similarity, f"|U_tuned^T U_base|, {name}",
            os.path.join(directory, f"heatmap{suffix}.png"), view.intruders)),
        "spectrum": (f"Spectrum of W and W0: {name}", plot_spectrum(
            view.sigma_base, view.sigma_tuned, view.intruders, f"singular values, {name}",
            os.path.join(directory, f"spectrum{suffix}.png"))),
    }


def report_summary(report, base: str, tuned: str) -> str:
    """The Markdown summary of a detection: totals, then one row per layer."""
    rows = [[m.name, "x".join(map(str, m.shape)), m.num_intruders,
             f"{float(m.max_cos.min()):.3f}" if len(m.max_cos) else "-",
             f"{m.null_max_cos:.3f} / {m.null_max_cos_p99:.3f}",
             f"{float(m.alignment.min()):.3f}" if len(m.alignment) else "-",
             len(m.basis_sensitive)] for m in report]
    t = report.totals
    text = (f"BASE: `{base}`  \nTUNED: `{tuned}`  \n"
            f"top-k = {report.top_k}, epsilon = {report.epsilon}: **{t['intruders']} intruders** "
            f"in {t['modules_with_intruders']} of {t['modules']} layers.\n\n"
            + markdown_table(["layer", "shape", "intruders", "min max|cos|",
                              "random direction median / p99", "min alignment",
                              "basis-dependent"], rows)
            + "\n\nalignment = (max|cos| - random median) / (1 - random median), clipped to "
              "[0, 1]; basis-dependent: vectors whose intruder status changes with the choice "
              f"of base singular vectors among near-equal values (basis_rtol = "
              f"{report.basis_rtol:g}).")
    if t["modules_epsilon_below_null"]:
        text += (f"\n\n**Warning**: epsilon is at or below the 99th percentile of a random "
                 f"direction's max|cos| in {t['modules_epsilon_below_null']} layers: there "
                 f"chance-level directions count as aligned.")
    if report.skipped:
        text += "\n\nSkipped:\n\n" + "\n".join(f"- `{s.name}`: {s.reason}"
                                                 for s in report.skipped)
    return text
