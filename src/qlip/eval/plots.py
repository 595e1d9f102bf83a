"""Evaluation pictures (matplotlib, Agg backend, PNG): what a person looks at before the numbers.

* :func:`plot_reconstruction_grid`: originals in the top row(s), their reconstructions below;
* :func:`plot_bit_usage`: per-bit mean and entropy of the tokens (a dead or stuck bit stands out);
* :func:`plot_confusion_matrix`: a zero-shot confusion matrix for a small label set (rows: true class);
* :func:`plot_loss_curves`: every loss term and every balancing weight over steps, from a training run directory's
  ``metrics.jsonl`` (see :func:`read_metrics_jsonl` for the keys it recognizes).

Each function writes one PNG and returns its path; none opens a window, so they run on headless machines.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display needed, and no GUI backend is ever imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..train.logger import metrics_file, read_metrics  # noqa: E402

logger = logging.getLogger(__name__)

_DPI = 110


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (creating folders) and close it; every qlip picture goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _hwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) uint8 (or float in [0, 1]) -> (B, H, W, 3) uint8 numpy."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images shaped (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def plot_reconstruction_grid(
    originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path, *, columns: int = 8, title: str = ""
) -> Path:
    """Originals over reconstructions, ``columns`` images per row pair.

    Args:
        originals: (B, 3, H, W) uint8 (or float in [0, 1]).
        reconstructions: same shape.
        path: PNG to write.
        columns: images per row.
        title: figure title.
    """
    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"originals {tuple(originals.shape)} and reconstructions {tuple(reconstructions.shape)} differ in shape"
        )
    orig, recon = _hwc(originals), _hwc(reconstructions)
    n = orig.shape[0]
    if n == 0:
        raise ValueError("no images to plot")
    cols = min(columns, n)
    row_pairs = math.ceil(n / cols)
    fig, axes = plt.subplots(2 * row_pairs, cols, figsize=(1.6 * cols, 3.3 * row_pairs), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        axes[2 * r, c].imshow(orig[i], interpolation="nearest")
        axes[2 * r + 1, c].imshow(recon[i], interpolation="nearest")
    for r in range(row_pairs):
        axes[2 * r, 0].set_title("original", fontsize=8, loc="left")
        axes[2 * r + 1, 0].set_title("reconstruction", fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_bit_usage(
    bit_mean: Sequence[float], bit_entropy: Sequence[float], path: str | Path, *, title: str = ""
) -> Path:
    """Bar chart of each bit's P(bit = 1) and binary entropy (bits); 0.5 and 1.0 are the balanced values."""
    mean, entropy = np.asarray(bit_mean, dtype=float), np.asarray(bit_entropy, dtype=float)
    if mean.shape != entropy.shape or mean.ndim != 1 or mean.size == 0:
        raise ValueError(f"bit_mean and bit_entropy must be equal-length vectors, got {mean.shape} and {entropy.shape}")
    d = mean.size
    x = np.arange(d)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * d + 2), 3.2))
    width = 0.4
    ax.bar(x - width / 2, mean, width, label="P(bit = 1)", color="tab:blue")
    ax.bar(x + width / 2, entropy, width, label="entropy (bits)", color="tab:orange")
    ax.axhline(0.5, color="tab:blue", lw=0.8, ls="--")
    ax.axhline(1.0, color="tab:orange", lw=0.8, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels([str(i) for i in x], fontsize=7)
    ax.set_xlabel("bit (most significant first)")
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "per-bit usage", fontsize=10)
    return save_figure(fig, path)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]] | np.ndarray, classnames: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """A confusion matrix (rows: true class, columns: predicted class), shown row-normalized with counts."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(classnames):
        raise ValueError(f"confusion matrix {m.shape} does not match {len(classnames)} class names")
    c = m.shape[0]
    rows = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = max(3.5, 0.45 * c + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    ax.set_xticklabels(classnames, rotation=60, ha="right", fontsize=7)
    ax.set_yticklabels(classnames, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if m[i, j]:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=6,
                            color="white" if rows[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_title(title or "confusion matrix", fontsize=10)
    return save_figure(fig, path)


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def is_loss_key(name: str) -> bool:
    """A loss term: any numeric metric whose name contains "loss"."""
    return "loss" in name.lower()


def is_weight_key(name: str) -> bool:
    """A balancing weight: ``w/<term>`` (the trainer's names), a name with "weight" (not "weight_decay" /
    "weight_norm"), or one starting with "alpha"."""
    low = name.lower()
    leaf = low.rsplit("/", 1)[-1]
    if "weight_decay" in low or "weight_norm" in low:
        return False
    return low.startswith("w/") or "/w/" in low or "weight" in low or leaf.startswith("alpha")


def read_metrics_jsonl(path: str | Path, kind: str | None = "train") -> dict[str, tuple[list[float], list[float]]]:
    """Series of a run's ``metrics.jsonl``: name -> (steps, values).

    The records come from :func:`qlip.train.logger.read_metrics` (records of one ``kind``; a torn last line is
    skipped); each has a ``step`` (or ``global_step``) and numeric fields, and nested objects are flattened with "/"
    (``{"loss": {"mse": 0.1}}`` -> ``loss/mse``).
    """
    series: dict[str, tuple[list[float], list[float]]] = {}
    for n, record in enumerate(read_metrics(path, kind=kind), 1):
        flat = _flatten({k: v for k, v in record.items() if k != "time"})
        step = flat.pop("step", flat.pop("global_step", float(n)))
        for name, value in flat.items():
            if math.isfinite(value):
                steps, values = series.setdefault(name, ([], []))
                steps.append(step)
                values.append(value)
    return series


def plot_loss_curves(run_dir: str | Path, path: str | Path, *, title: str = "") -> Path:
    """Loss terms (top, log scale when all positive) and balancing weights (bottom) over steps.

    Args:
        run_dir: a training run directory holding ``metrics.jsonl`` (or the file itself).
        path: PNG to write.
        title: figure title (defaults to the run directory's name).
    """
    run_dir = Path(run_dir)
    jsonl = metrics_file(run_dir)
    if not jsonl.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}; pass a training run directory (--run-dir)")
    series = read_metrics_jsonl(jsonl)
    losses = {k: v for k, v in series.items() if is_loss_key(k)}
    weights = {k: v for k, v in series.items() if is_weight_key(k) and not is_loss_key(k)}
    if not losses and not weights:
        raise ValueError(
            f"{jsonl} has no loss terms (keys containing 'loss') or balancing weights (keys containing 'weight' or "
            f"starting with 'alpha'); found keys: {sorted(series)[:20]}"
        )
    panels = [(n, s) for n, s in (("loss terms", losses), ("balancing weights", weights)) if s]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False, sharex=True)
    for ax, (label, group) in zip(axes[:, 0], panels):
        for name, (steps, values) in sorted(group.items()):
            ax.plot(steps, values, label=name, lw=1.2)
        if all(v > 0 for _, values in group.values() for v in values):
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title or run_dir.name, fontsize=10)
    return save_figure(fig, path)
