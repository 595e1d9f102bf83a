"""Experiment 2: the four loss-balancing modes at the same budget, with their overhead (docs/results.md).

* ``fixed``: the paper's ratio a_a : a_r = 1 : 1000;
* ``posthoc``: ``qlip balance`` probes (each objective alone, half the stage-1 budget each), then the weights from
  the converged losses; the probes' time is part of this variant's total time;
* ``inverse-loss``: online, each balanced term divided by the EMA of its own value (base weights 1 : 1);
* ``grad-norm``: online, equal gradient norms at the last shared layer (base weights 1 : 1; an extra partial
  backward every ``grad_norm_every`` steps).

The online modes hold their base weights for a warm-up; it is shortened to a tenth of the run when the run is short
(the balancer's default of 100 steps would otherwise cover the whole of a reduced-budget run). Overhead is reported
against ``fixed``: stage-1 throughput (median images/s over the logged intervals, so start-up is left out), total
wall-clock, and peak resident memory of the variant's own process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..losses.balance import BalanceConfig
from ..train.build import weights_override
from . import plots
from .balance_sweep import metric_columns
from .runner import Settings, Stage, Variant, run_overrides, run_variants, settings_summary
from .tables import aggregate, markdown_table, mean, write_table

log = logging.getLogger(__name__)

MODES = ("fixed", "posthoc", "inverse-loss", "grad-norm")
PAPER_FIXED = ("align", 1.0, "recon", 1000.0)


def build_variants(settings: Settings, steps: int, warmup_fraction: float) -> list[Variant]:
    base = run_overrides(settings, steps, warmup_fraction)
    online_warmup = min(BalanceConfig().warmup_steps, max(1, steps // 10))
    stage = lambda extra: Stage("stage1", files=[settings.config], overrides=base + extra, steps=steps)  # noqa: E731
    cfg = settings.base_config()
    fixed = stage(["loss.balance.mode=fixed", weights_override(cfg, align=1.0, recon=1000.0)])
    probe_steps = max(1, steps // 2)
    probe = Stage("probe", kind="probe", files=[settings.config], overrides=base + [f"probe.steps={probe_steps}"],
                  steps=probe_steps)  # fmt: skip
    posthoc = Stage("stage1", files=[settings.config], overrides=base, steps=steps, fragment_from_previous=True)
    online = [f"loss.balance.warmup_steps={online_warmup}", weights_override(cfg, align=1.0, recon=1.0)]
    return [
        Variant("fixed", [fixed], settings.seeds, {"label": "fixed 1:1000 (paper)"}),
        Variant("posthoc", [probe, posthoc], settings.seeds, {"label": "post-hoc (qlip balance)"}),
        Variant("inverse-loss", [stage(["loss.balance.mode=inverse-loss", *online])], settings.seeds,
                {"label": "online inverse-loss"}),
        Variant("grad-norm", [stage(["loss.balance.mode=grad-norm", *online])], settings.seeds,
                {"label": "online grad-norm"}),
    ]  # fmt: skip


def _final_ratio(row: dict[str, Any]) -> str:
    a, r = mean(row, "stage1/w/align"), mean(row, "stage1/w/recon")
    if not (a == a and r == r) or a == 0:
        return "-"
    return f"1:{r / a:.3g}"


def _relative(row: dict[str, Any], ref: dict[str, Any], key: str, inverse: bool = False) -> str:
    v, base = mean(row, key), mean(ref, key)
    if not (v == v and base == base) or base == 0 or v == 0:
        return "-"
    factor = base / v if inverse else v / base
    return f"{factor:.2f}x"


def run_balance_modes(settings: Settings) -> dict[str, Any]:
    """Run (or continue) the four modes; write ``table.json``, ``table.md`` and the plots into ``settings.out``."""
    settings.freeze()
    cfg = settings.base_config()
    steps = settings.steps(cfg.optim.steps)
    variants = build_variants(settings, steps, cfg.optim.warmup_steps / cfg.optim.steps)
    results = run_variants(settings, variants)
    rows = aggregate(results, order=[v.name for v in variants])
    fixed = next(r for r in rows if r["variant"] == "fixed")
    posthoc = next((r for r in rows if r["variant"] == "posthoc"), None)
    posthoc_ratio = None
    if posthoc and posthoc.get("probe"):
        w = posthoc["probe"]["weights"]
        posthoc_ratio = w["recon"] / w["align"] if w.get("align") else None
    cols = metric_columns(cfg)
    quality = markdown_table(rows, cols, [("mode", lambda r: r["meta"]["label"]), ("seeds", lambda r: len(r["seeds"])),
                                          ("final a_a : a_r", _final_ratio)])  # fmt: skip
    cost_cols = [("stage-1 images/s", "stage1/img_per_s", 1), ("total time s", "time_s", 0),
                 ("peak RSS MiB", "peak_rss_mb", 0)]  # fmt: skip
    cost = markdown_table(rows, cost_cols, [
        ("mode", lambda r: r["meta"]["label"]),
        ("step time vs fixed", lambda r: _relative(r, fixed, "stage1/img_per_s", inverse=True)),
        ("total time vs fixed", lambda r: _relative(r, fixed, "time_s")),
        ("peak memory vs fixed", lambda r: _relative(r, fixed, "peak_rss_mb")),
    ])  # fmt: skip
    out = settings.out
    table = {
        "experiment": "balance-modes",
        "settings": settings_summary(settings, cfg, {"stage1_steps": steps, "probe_steps": max(1, steps // 2)}),
        "posthoc_ratio": posthoc_ratio,
        "rows": rows,
    }
    (out / "table.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(quality + "\n\n" + cost + "\n")
    figures = {
        "quality": plots.plot_bars(rows, out / "modes_quality.png", [("zs/mean", "mean zero-shot %"),
                                   ("psnr", "PSNR dB"), ("code_entropy", "code entropy (bits)")],
                                   title="balancing modes: quality"),
        "cost": plots.plot_bars(rows, out / "modes_cost.png", [("stage1/img_per_s", "stage-1 images/s"),
                                ("time_s", "total time (s)"), ("peak_rss_mb", "peak RSS (MiB)")],
                                title="balancing modes: cost"),
        "pareto": plots.plot_pareto(rows, out / "modes_pareto.png", labels=[r["variant"] for r in rows],
                                    highlight=["posthoc"], title="balancing modes: zero-shot vs PSNR"),
    }  # fmt: skip
    table["figures"] = {k: Path(v).name for k, v in figures.items()}
    write_table(table, out / "table.json")
    log.info("balance modes written to %s", out)
    return table
