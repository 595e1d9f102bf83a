"""Evaluation reports: ``report.json`` (machine-readable), ``report.md`` (a person's summary) and the pictures.

A report is one dict (see docs/evaluation.md for the schema)::

    {"model": ..., "data": ..., "split": ..., "created": ..., "qlip_version": ...,
     "zero_shot": {task: {"top1", "top5", "majority", "n", "num_classes", "classnames", "confusion"?}},
     "retrieval": {"i2t": {"R@1", "R@5", "R@10", "mean_rank", "median_rank"}, "t2i": {...}, "chance": {...},
                   "num_images", "num_captions"},
     "linear_probe": {task: {"features", "top1", "l2", "n_train", "n_test", ...}},
     "recon": {"psnr", "ssim", "lpips", "rfid", "usage", "compression_ratio", ...},
     "metrics": {"zs/<task>", "lp/<task>", "psnr", ...},
     "skipped_samples": {stage: {reason: count}},
     "figures": {name: relative PNG path}}

Sections are optional. ``metrics`` is the flat summary in the one evaluation vocabulary (:mod:`qlip.eval.schema`:
accuracies in percent), filled in from the sections by :func:`write_report`; the sections keep the detailed
results (their ``top1`` / ``top5`` are the calculators' shares in [0, 1]; every table shows percent).
``skipped_samples`` says, per stage, how many unreadable samples were dropped and why (:class:`qlip.eval.progress.
TrackedBatches` counts them). Non-finite numbers are written as the strings "inf" / "-inf" / "nan" so the JSON
stays standard. The same row builders feed the Markdown tables and the short tables the CLI prints.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..fileio import write_text_atomic
from .schema import metric_unit, percent, summary_metrics

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ formatting


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.{digits}f}"
    return str(value)


def _metric_cell(metric: Mapping[str, Any] | None, digits: int = 4) -> str:
    if not metric:
        return "-"
    return _fmt(metric.get("value"), digits) if metric.get("available") else "unavailable"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table with aligned columns (what the CLI prints)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table."""
    if not rows:
        return "_no rows_"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def _pct(share: float | None) -> str | None:
    """A calculator's share in [0, 1] as the percent a table shows."""
    return None if share is None else f"{percent(share):.2f}"


def _baselines(r: Mapping[str, Any]) -> dict[str, Any]:
    """Chance 1/C and the majority-class rate (always answering the most frequent class), in percent."""
    return {"chance %": _pct(1.0 / r["num_classes"]) if r.get("num_classes") else None,
            "majority %": _pct(r.get("majority"))}  # fmt: skip


def zero_shot_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per zero-shot task: classes, images, top-1 %, top-5 % (or "-" with fewer than 5 classes), chance %
    and majority-class %."""
    return [
        {"task": name, "classes": r.get("num_classes"), "images": r.get("n"), "top-1 %": _pct(r.get("top1")),
         "top-5 %": _pct(r.get("top5")), **_baselines(r)}
        for name, r in results.items()
    ]  # fmt: skip


def linear_probe_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per probed task: feature kind, top-1 %, top-5 %, chance % and majority-class %, chosen L2,
    train/test sizes."""
    return [
        {"task": name, "features": r.get("features"), "top-1 %": _pct(r.get("top1")), "top-5 %": _pct(r.get("top5")),
         **_baselines(r), "l2": r.get("l2"), "n_train": r.get("n_train"), "n_test": r.get("n_test")}
        for name, r in results.items()
    ]  # fmt: skip


def retrieval_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Two rows per direction (image -> text, text -> image): the model's Recall@K % and ranks, then chance's."""
    rows = []
    for direction, label, queries, candidates in (("i2t", "image->text", "num_images", "num_captions"),
                                                  ("t2i", "text->image", "num_captions", "num_images")):  # fmt: skip
        for who, r in (("model", result.get(direction, {})), ("chance", result.get("chance", {}).get(direction, {}))):
            row = {"direction": label if who == "model" else "  chance", "queries": result.get(queries),
                   "candidates": result.get(candidates)}  # fmt: skip
            row.update({f"R@{k} %": _pct(r.get(f"R@{k}")) for k in (1, 5, 10)})
            row["mean rank"] = r.get("mean_rank")
            row["median rank"] = r.get("median_rank")
            rows.append(row)
    return rows


def metric_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per flat metric (see :mod:`qlip.eval.schema`): key, value, unit."""
    return [{"metric": key, "value": value, "unit": metric_unit(key) or "-"} for key, value in metrics.items()]


def skipped_rows(skipped: Mapping[str, Mapping[str, int]]) -> list[dict[str, Any]]:
    """One row per (stage, reason) with skipped samples, with what the reason means."""
    from ..data.sample import BAD_REASONS

    return [{"stage": stage, "reason": reason, "samples": int(n), "meaning": BAD_REASONS.get(reason, reason)}
            for stage, counts in skipped.items() for reason, n in counts.items() if n]  # fmt: skip


def recon_rows(recon: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row of reconstruction metrics ("unavailable" where a feature network had no weights)."""
    usage = recon.get("usage", {})
    return [
        {
            "images": recon.get("num_images"),
            "PSNR (dB)": _metric_cell(recon.get("psnr"), 2),
            "SSIM": _metric_cell(recon.get("ssim")),
            "LPIPS": _metric_cell(recon.get("lpips")),
            "rFID": _metric_cell(recon.get("rfid"), 3),
            "distinct codes": usage.get("distinct_codes"),
            "code perplexity": usage.get("code_perplexity"),
            "mean bit entropy": usage.get("mean_bit_entropy"),
            "CR": recon.get("compression_ratio"),
        }
    ]


# ------------------------------------------------------------------------------------------------ writing


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write standard JSON atomically (non-finite floats as strings)."""
    return write_text_atomic(path, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


def make_figures(
    report: Mapping[str, Any],
    out_dir: str | Path,
    *,
    examples: tuple[torch.Tensor, torch.Tensor] | None = None,
    run_dir: str | Path | None = None,
) -> dict[str, str]:
    """Draw every picture the report's content allows; returns name -> path relative to ``out_dir``.

    Args:
        report: the report dict (sections as in the module docstring).
        out_dir: where the PNGs go (``figures/`` under it).
        examples: (originals, reconstructions) uint8 (K, 3, S, S) for the reconstruction grid.
        run_dir: a training run directory with ``metrics.jsonl`` for the loss curves.
    """
    from . import plots

    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    figures: dict[str, str] = {}

    def rel(p: Path) -> str:
        return p.relative_to(out_dir).as_posix()

    recon = report.get("recon")
    if examples is not None and examples[0].shape[0] > 0:
        figures["reconstructions"] = rel(plots.plot_reconstruction_grid(
            examples[0], examples[1], fig_dir / "reconstructions.png", title=f"{report.get('model', '')}"))  # fmt: skip
    if recon and "usage" in recon:
        u = recon["usage"]
        title = f"per-bit usage ({u['distinct_codes']} distinct codes, perplexity {u['code_perplexity']:.1f})"
        figures["bit_usage"] = rel(plots.plot_bit_usage(u["bit_mean"], u["bit_entropy"], fig_dir / "bit_usage.png",
                                                        title=title))  # fmt: skip
    for task, r in (report.get("zero_shot") or {}).items():
        if r.get("confusion") is not None and r.get("classnames"):
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in task)
            figures[f"confusion_{task}"] = rel(plots.plot_confusion_matrix(
                r["confusion"], r["classnames"], fig_dir / f"confusion_{safe}.png",
                title=f"zero-shot {task}: top-1 {percent(r.get('top1', float('nan'))):.1f}%"))  # fmt: skip
    if run_dir is not None:
        try:
            figures["loss_curves"] = rel(plots.plot_loss_curves(run_dir, fig_dir / "loss_curves.png"))
        except (FileNotFoundError, ValueError) as err:
            logger.warning("no loss curves: %s", err)
    return figures


def render_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown summary of a report dict (figures linked by their relative paths)."""
    lines = [f"# Evaluation of {report.get('model', '?')}", ""]
    meta = [("data", report.get("data")), ("split", report.get("split")), ("images", report.get("limit")),
            ("device", report.get("device")), ("created", report.get("created")),
            ("qlip", report.get("qlip_version"))]  # fmt: skip
    lines += [f"* {k}: `{v}`" for k, v in meta if v is not None] + [""]
    figures = report.get("figures") or {}
    if report.get("metrics"):
        lines += ["## Summary", "", "Accuracies in percent; the keys are those of the training log and the experiments "
                  "(see docs/evaluation.md).", "", markdown_table(metric_rows(report["metrics"])), ""]  # fmt: skip
    if report.get("zero_shot"):
        lines += ["## Zero-shot classification", "",
                  "Class-name prompts through the templates, averaged per class (cosine similarity, top-k).", "",
                  markdown_table(zero_shot_rows(report["zero_shot"])), ""]  # fmt: skip
        for name in report["zero_shot"]:
            if f"confusion_{name}" in figures:
                lines += [f"![confusion matrix, {name}]({figures[f'confusion_{name}']})", ""]
    if report.get("retrieval"):
        lines += ["## Retrieval", "",
                  "Every image ranks every caption and every caption every image (cosine similarity). An image is "
                  "right at K when any of its captions is among the K best; ties count against the model. The chance "
                  "rows are a random ranking's.", "",
                  markdown_table(retrieval_rows(report["retrieval"])), ""]  # fmt: skip
    if report.get("linear_probe"):
        lines += ["## Linear probe", "",
                  "Multinomial logistic regression (L-BFGS) on frozen, standardized features; L2 strength chosen on "
                  "a held-out part of the training split, then refitted on all of it.", "",
                  markdown_table(linear_probe_rows(report["linear_probe"])), ""]  # fmt: skip
    recon = report.get("recon")
    if recon:
        lines += ["## Reconstruction", "", markdown_table(recon_rows(recon)), ""]
        for key, label in (("lpips", "LPIPS"), ("rfid", "rFID")):
            m = recon.get(key) or {}
            if not m.get("available", True):
                lines.append(f"* {label} unavailable: {m.get('reason')}")
            elif m.get("note"):
                lines.append(f"* {label}: {m['note']}")
        u = recon.get("usage", {})
        if u:
            lines += [
                f"* tokens: {u['num_tokens']} of {u['num_bits']} bits; {u['distinct_codes']} distinct codes of "
                f"{u['codebook_size']}; code entropy {u['code_entropy']:.2f} bits (max {u['max_code_entropy']:.2f}), "
                f"perplexity {u['code_perplexity']:.1f}; mean bit entropy {u['mean_bit_entropy']:.3f}",
                f"* compression ratio 24 p^2 / d = {recon.get('compression_ratio', float('nan')):.1f}",
            ]
        lines.append("")
        for key, label in (("reconstructions", "originals (top) and reconstructions"), ("bit_usage", "per-bit usage")):
            if key in figures:
                lines += [f"![{label}]({figures[key]})", ""]
    if "loss_curves" in figures:
        lines += ["## Training curves", "", f"![loss terms and balancing weights]({figures['loss_curves']})", ""]
    if "skipped_samples" in report:
        rows = skipped_rows(report["skipped_samples"])
        lines += ["## Skipped samples", ""]
        lines += ([markdown_table(rows), ""] if rows else ["None: every sample was readable.", ""])
    return "\n".join(lines)


def write_report(
    report: dict[str, Any],
    out_dir: str | Path,
    *,
    examples: tuple[torch.Tensor, torch.Tensor] | None = None,
    run_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Fill in the flat ``metrics`` summary, draw the pictures, then write ``report.json`` and ``report.md``.

    Returns:
        ``{"json": path, "markdown": path, **figures}`` (absolute paths).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "metrics" not in report:
        metrics = summary_metrics(zero_shot=report.get("zero_shot"), linear_probe=report.get("linear_probe"),
                                  recon=report.get("recon"), retrieval=report.get("retrieval"))  # fmt: skip
        if metrics:
            report["metrics"] = metrics
    report["figures"] = {**report.get("figures", {}), **make_figures(report, out_dir, examples=examples,
                                                                     run_dir=run_dir)}  # fmt: skip
    json_path = write_json(report, out_dir / "report.json")
    md_path = write_text_atomic(out_dir / "report.md", render_markdown(report))
    return {"json": json_path, "markdown": md_path, **{k: out_dir / v for k, v in report["figures"].items()}}
