"""Pictures of the experiments (matplotlib, Agg, PNG).

* :func:`plot_pareto`: zero-shot accuracy against PSNR, one point per variant (error bars = std over seeds), the
  Pareto front (no other point is better in both) drawn through the non-dominated points;
* :func:`plot_metrics_vs_ratio`: each metric against the weight ratio a_r / a_a on a log axis, with the two
  single-objective runs (1:0, 0:1) at the ends and the post-hoc ratio as a vertical line;
* :func:`plot_bars`: one bar per variant for a few metrics (balancing modes, recipes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from ..eval.plots import save_figure  # also selects the headless Agg backend


def _stat(row: Mapping[str, Any], key: str) -> tuple[float, float]:
    m = row["metrics"].get(key)
    if m is None:
        return float("nan"), 0.0
    return m["mean"], m["std"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (maximizing both), sorted by x."""
    keep = []
    for i, (x, y) in enumerate(points):
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y)
            for j, (x2, y2) in enumerate(points)
            if j != i and math.isfinite(x2) and math.isfinite(y2)
        )
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: str | Path, *, x: str = "psnr", y: str = "zs/mean",
                labels: Sequence[str] | None = None, highlight: Sequence[str] = (),
                title: str = "") -> Path:  # fmt: skip
    """Zero-shot (y) against PSNR (x), one labelled point per row; ``highlight`` names rows drawn as stars."""
    labels = list(labels or [r["variant"] for r in rows])
    pts = [(_stat(r, x)[0], _stat(r, y)[0]) for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for r, label, (px, py) in zip(rows, labels, pts):
        if not (math.isfinite(px) and math.isfinite(py)):
            continue
        star = r["variant"] in highlight
        ax.errorbar(px, py, xerr=_stat(r, x)[1], yerr=_stat(r, y)[1], fmt="*" if star else "o",
                    ms=13 if star else 6, color="tab:red" if star else "tab:blue", capsize=3)  # fmt: skip
        ax.annotate(label, (px, py), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = pareto_front(pts)
    if len(front) > 1:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="gray", label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(f"{x} (dB)" if x == "psnr" else x)
    ax.set_ylabel("mean zero-shot top-1 (%)" if y == "zs/mean" else y)
    ax.set_title(title or "zero-shot vs reconstruction")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def ratio_positions(ratios: Sequence[float]) -> tuple[list[float], list[float], list[str]]:
    """x positions (log10 of a_r / a_a) for ``ratios`` with 0 (1:0) and inf (0:1) placed one decade beyond the
    finite ones; returns positions, tick positions and tick labels."""
    finite = [math.log10(r) for r in ratios if 0 < r < math.inf]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    pos = [lo - 1 if r == 0 else hi + 1 if r == math.inf else math.log10(r) for r in ratios]
    ticks = sorted(set(pos))
    names = {lo - 1: "1:0", hi + 1: "0:1"}
    tick_labels = [names.get(t, f"1:{10 ** t:g}") for t in ticks]
    return pos, ticks, tick_labels


def plot_metrics_vs_ratio(rows: Sequence[Mapping[str, Any]], path: str | Path, metrics: Sequence[tuple[str, str]],
                          *, posthoc_ratio: float | None = None, default_ratio: float | None = None,
                          title: str = "") -> Path:  # fmt: skip
    """One panel per metric (key, label) against a_a : a_r; rows need ``meta["ratio"]`` (a_r / a_a, 0 or inf)."""
    rows = [r for r in rows if isinstance(r["meta"].get("ratio"), (int, float))]
    rows = sorted(rows, key=lambda r: r["meta"]["ratio"])
    ratios = [float(r["meta"]["ratio"]) for r in rows]
    pos, ticks, tick_labels = ratio_positions(ratios)
    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, metrics):
        means = [_stat(r, key)[0] for r in rows]
        stds = [_stat(r, key)[1] for r in rows]
        ax.errorbar(pos, means, yerr=stds, fmt="o-", capsize=3)
        for p_ratio, style, name in ((posthoc_ratio, "r--", "post-hoc"), (default_ratio, "g:", "default")):
            if p_ratio is not None and 0 < p_ratio < math.inf:
                ax.axvline(math.log10(p_ratio), color=style[0], linestyle=style[1:], label=f"{name} 1:{p_ratio:.3g}")
        ax.set_xticks(ticks)
        ax.set_xticklabels(tick_labels, rotation=45, fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="upper right", fontsize=8)
    fig.suptitle(title or "metrics against a_a : a_r")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_bars(rows: Sequence[Mapping[str, Any]], path: str | Path, metrics: Sequence[tuple[str, str]],
              *, title: str = "") -> Path:  # fmt: skip
    """One panel per metric, one bar per variant (error bars = std over seeds)."""
    names = [r["variant"] for r in rows]
    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, metrics):
        means = [_stat(r, key)[0] for r in rows]
        stds = [_stat(r, key)[1] for r in rows]
        ax.bar(range(len(rows)), [m if math.isfinite(m) else 0.0 for m in means], yerr=stds, capsize=3,
               color="tab:blue")  # fmt: skip
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
