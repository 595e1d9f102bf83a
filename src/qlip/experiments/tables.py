"""Seed aggregation and the JSON / Markdown tables of an experiment.

A *row* is one variant: its ``meta`` (e.g. the weight ratio), the seeds it ran with, and for every metric the mean,
the sample standard deviation over seeds (0 with one seed) and n. Markdown cells read ``mean ± std`` when several
seeds ran, so a reader can tell a difference from noise.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def result_values(result: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one job result: its metrics, total time and peak memory, and per-stage time / throughput."""
    values: dict[str, float] = {}
    for key, value in result.get("metrics", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key] = float(value)
    if isinstance(result.get("time_s"), (int, float)):
        values["time_s"] = float(result["time_s"])
    if isinstance(result.get("peak_rss_mb"), (int, float)):
        values["peak_rss_mb"] = float(result["peak_rss_mb"])
    for stage, info in result.get("stages", {}).items():
        for key, value in info.items():
            if (key in ("time_s", "img_per_s", "steps", "peak_rss_mb") or key.startswith(("w/", "loss/"))) and \
                    isinstance(value, (int, float)):  # fmt: skip
                values[f"{stage}/{key}"] = float(value)
    return values


def aggregate(results: Sequence[Mapping[str, Any]], order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per variant: ``{"variant", "meta", "seeds", "metrics": {key: {"mean", "std", "n"}}}``.

    Args:
        results: job results (see :func:`qlip.experiments.worker.execute_job`).
        order: variant order of the rows (default: first appearance).
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["variant"], []).append(r)
    names = list(order) if order else list(groups)
    rows = []
    for name in names:
        if name not in groups:
            continue
        runs = groups[name]
        per_key: dict[str, list[float]] = {}
        for r in runs:
            for key, value in result_values(r).items():
                per_key.setdefault(key, []).append(value)
        metrics = {}
        for key, vals in per_key.items():
            finite = [v for v in vals if math.isfinite(v)]
            mean = statistics.fmean(finite) if finite else float("nan")
            std = statistics.stdev(finite) if len(finite) > 1 else 0.0
            metrics[key] = {"mean": mean, "std": std, "n": len(vals)}
        extra = {k: v for r in runs for k, v in r.get("stages", {}).get("probe", {}).items()
                 if k in ("converged", "weights")}  # fmt: skip
        rows.append({"variant": name, "meta": dict(runs[0].get("meta", {})), "seeds": [r["seed"] for r in runs],
                     **({"probe": extra} if extra else {}), "metrics": metrics})  # fmt: skip
    return rows


def cell(row: Mapping[str, Any], key: str, digits: int = 1) -> str:
    """``mean ± std`` (several seeds), ``mean`` (one), or "-" (not measured)."""
    m = row["metrics"].get(key)
    if m is None or not math.isfinite(m["mean"]):
        return "-"
    text = f"{m['mean']:.{digits}f}"
    if m["n"] > 1:
        text += f" ± {m['std']:.{digits}f}"
    return text


def mean(row: Mapping[str, Any], key: str) -> float:
    m = row["metrics"].get(key)
    return m["mean"] if m is not None else float("nan")


# The sweep's criterion for the default ratio: within this many zero-shot points of the sweep's best AND this
# many dB of its best PSNR.
CRITERION_ZS_POINTS = 5.0
CRITERION_PSNR_DB = 1.0


def within_criterion(rows: Sequence[Mapping[str, Any]], best_zs: float, best_psnr: float) -> list[str]:
    """Labels of the rows within CRITERION_ZS_POINTS of ``best_zs`` and CRITERION_PSNR_DB of ``best_psnr``."""
    return [r["meta"].get("label", r["variant"]) for r in rows
            if best_zs - mean(r, "zs/mean") <= CRITERION_ZS_POINTS
            and best_psnr - mean(r, "psnr") <= CRITERION_PSNR_DB]  # fmt: skip


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, int]],
                   lead: Sequence[tuple[str, Any]] = ()) -> str:  # fmt: skip
    """A Markdown table: ``lead`` columns (header, row -> text) then metric ``columns`` (header, key, digits)."""
    headers = [h for h, _ in lead] + [h for h, _, _ in columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [str(fn(row)) for _, fn in lead] + [cell(row, key, digits) for _, key, digits in columns]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_table(table: Mapping[str, Any], path: str | Path) -> Path:
    """The experiment's JSON table (non-finite numbers as strings, so the file stays standard JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(table), indent=2))
    return path


def read_table(path: str | Path) -> dict[str, Any]:
    def _num(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: _num(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [_num(v) for v in obj]
        if obj in ("nan", "inf", "-inf"):
            return float(obj)
        return obj

    return _num(json.loads(Path(path).read_text()))
