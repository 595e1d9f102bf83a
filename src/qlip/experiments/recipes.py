"""Experiment 3: training recipes, the paper's Table 3c at small scale (docs/results.md).

1. ``two-stage`` (the default): stage 1 (alignment + reconstruction), then stage 2 (frozen visual encoder; bottleneck
   and decoder with the stage-2 losses), started from stage 1's export;
2. ``quantizer-after``: stage 1 with ``model.bypass_quantizer=true`` (the decoder sees continuous l2-normalized
   latents), then the same stage 2, which learns the quantizer with the decoder;
3. ``one-stage``: a single stage-1 run for the steps of both stages together, with every loss at once: the
   stage-1 terms plus stage 2's GAN (its weight, start step scaled to the budget, and discriminator settings) and
   LPIPS when stage 2 configures its weight files (none ship with qlip, so the demo has it off in both recipes).
Stage 1 of recipes 1 and 2 is evaluated too (``stage1/...`` keys), which shows the stage-2 effect.

Stage 2 reads ``--stage2-config`` (default: ``<config>-stage2.yaml`` beside the stage-1 config when it exists,
else the stage-1 config with ``stage=2`` and LPIPS off, since no LPIPS weight file is shipped).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from . import plots
from .balance_sweep import metric_columns
from .runner import Settings, Stage, Variant, run_overrides, run_variants, settings_summary, snapshot_config
from .tables import aggregate, markdown_table, write_table

log = logging.getLogger(__name__)

# Stage 2 derived from a stage-1 config: the trainer's stage-2 weights (MSE + BSQ + 0.1 GAN), LPIPS off (no weight
# file is shipped); the stage-1 config's align/recon weights must not leak into stage 2.
DERIVED_STAGE2 = ["stage=2", "loss.lpips_weight=0", "loss.gan_weight=0.1", "loss.balance.mode=fixed",
                  "loss.balance.weights.align=0", "loss.balance.weights.recon=1", "loss.balance.weights.quant=1",
                  "loss.balance.weights.commit=0", "loss.balance.reference_term=recon",
                  "loss.balance.balanced_terms=[recon]"]  # fmt: skip
ONE_STAGE_NOTE = "stage-1 losses plus stage 2's GAN (and LPIPS when configured), all from step 0 of one run"
# Stage-2 settings the one-stage recipe carries over (the discriminator and its optimizer, LPIPS files).
GAN_KEYS = ("gan_loss", "disc", "disc_width", "disc_layers", "adaptive_gan_weight", "r1_weight", "r1_every",
            "lpips_vgg", "lpips_lin")
GAN_OPTIM_KEYS = ("disc_lr", "disc_betas", "disc_weight_decay")


def one_stage_overrides(cfg1: Any, cfg2: Any, gan_start: int) -> list[str]:
    """Stage-1 balance weights plus stage 2's adversarial (and, with weight files, perceptual) terms."""
    from ..train.build import stage_weights, term_weight

    gan = term_weight(cfg2, "gan")
    lpips = term_weight(cfg2, "lpips") if cfg2.loss.lpips_vgg and cfg2.loss.lpips_lin else 0.0
    out = [f"loss.balance.weights={json.dumps(stage_weights(cfg1))}", f"loss.gan_weight={gan}",
           f"loss.lpips_weight={lpips}", f"loss.gan_start={gan_start}"]  # fmt: skip
    out += [f"loss.{k}={json.dumps(getattr(cfg2.loss, k))}" for k in GAN_KEYS if getattr(cfg2.loss, k) is not None]
    out += [f"optim.{k}={json.dumps(getattr(cfg2.optim, k))}" for k in GAN_OPTIM_KEYS]
    return out


def default_stage2_config(config: str) -> str | None:
    """``configs/x.yaml`` -> ``configs/x-stage2.yaml`` when that file exists."""
    path = Path(config)
    candidate = path.with_name(f"{path.stem}-stage2{path.suffix}")
    return str(candidate) if candidate.is_file() else None


def build_variants(settings: Settings, stage2_config: str | None) -> tuple[list[Variant], dict[str, Any]]:
    cfg1 = settings.base_config()
    s1 = settings.steps(cfg1.optim.steps)
    warm1 = cfg1.optim.warmup_steps / cfg1.optim.steps
    if stage2_config:
        cfg2 = settings.base_config([stage2_config])
        files2, extra2 = [stage2_config], []
    else:
        cfg2 = settings.base_config([settings.config])
        files2, extra2 = [settings.config], list(DERIVED_STAGE2)
        log.info("no stage-2 config given or found: stage 2 = %s with %s", settings.config, extra2)
    # A derived stage 2 (no config of its own) gets half the stage-1 steps.
    s2 = settings.steps(cfg2.optim.steps) if stage2_config else max(1, s1 // 2)
    warm2 = cfg2.optim.warmup_steps / cfg2.optim.steps
    base1 = run_overrides(settings, s1, warm1)
    # The GAN's start step is a step count of the stage-2 schedule: scale it with the budget like the schedule.
    gan_start = 0 if settings.smoke else round(cfg2.loss.gan_start * s2 / cfg2.optim.steps)
    base2 = run_overrides(settings, s2, warm2) + extra2 + [f"loss.gan_start={gan_start}"]

    def stage1(extra: list[str], steps: int = s1, evaluate: bool = True) -> Stage:
        overrides = base1 if steps == s1 else run_overrides(settings, steps, warm1)
        return Stage("stage1", files=[settings.config], overrides=overrides + extra, steps=steps, evaluate=evaluate)

    stage2 = Stage("stage2", files=files2, overrides=base2, steps=s2, init_from_previous=True)
    variants = [
        Variant("two-stage", [stage1([]), stage2], settings.seeds, {"label": "(1) stage 1 then stage 2"}),
        Variant("quantizer-after", [stage1(["model.bypass_quantizer=true"]), stage2], settings.seeds,
                {"label": "(2) stage 1 without quantizer, then quantizer + decoder"}),
        Variant("one-stage", [stage1(one_stage_overrides(cfg1, cfg2, gan_start), steps=s1 + s2, evaluate=False)],
                settings.seeds,
                {"label": "(3) one stage, all steps", "note": ONE_STAGE_NOTE}),
    ]  # fmt: skip
    info = {"stage1_steps": s1, "stage2_steps": s2, "stage2_gan_start": gan_start,
            "stage2_config": stage2_config or "derived: " + " ".join(extra2)}  # fmt: skip
    return variants, info


def run_recipes(settings: Settings, stage2_config: str | None = None) -> dict[str, Any]:
    """Run (or continue) the three recipes; write ``table.json``, ``table.md`` and the plots into ``settings.out``."""
    stage2_config = stage2_config or default_stage2_config(settings.source_config)
    settings.freeze()
    if stage2_config:
        stage2_config = snapshot_config(stage2_config, settings.out, "stage2-" + Path(stage2_config).name)
    cfg = settings.base_config()
    variants, info = build_variants(settings, stage2_config)
    results = run_variants(settings, variants)
    rows = aggregate(results, order=[v.name for v in variants])
    cols = metric_columns(cfg)
    lead = [("recipe", lambda r: r["meta"]["label"]), ("seeds", lambda r: len(r["seeds"]))]
    quality = markdown_table(rows, cols, lead)
    stage1_cols = [("stage-1 zero-shot mean %", "stage1/zs/mean", 1), ("stage-1 PSNR dB", "stage1/psnr", 2),
                   ("stage-1 code entropy", "stage1/code_entropy", 2), ("final PSNR dB", "psnr", 2),
                   ("final code entropy", "code_entropy", 2)]  # fmt: skip
    effect = markdown_table(rows, stage1_cols, lead[:1])
    cost_cols = [("total time s", "time_s", 0), ("stage-1 time s", "stage1/time_s", 0),
                 ("stage-2 time s", "stage2/time_s", 0), ("peak RSS MiB", "peak_rss_mb", 0),
                 ("stage-1 images/s", "stage1/img_per_s", 1), ("stage-2 images/s", "stage2/img_per_s", 1)]  # fmt: skip
    cost = markdown_table(rows, cost_cols, lead[:1])
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(f"{quality}\n\n{effect}\n\n{cost}\n\nNote on (3): {ONE_STAGE_NOTE}.\n")
    table = {"experiment": "recipes", "settings": settings_summary(settings, cfg, info), "rows": rows,
             "one_stage_note": ONE_STAGE_NOTE}  # fmt: skip
    figures = {
        "quality": plots.plot_bars(rows, out / "recipes_quality.png", [("zs/mean", "mean zero-shot %"),
                                   ("psnr", "PSNR dB"), ("code_entropy", "code entropy (bits)")],
                                   title="recipes: quality"),
        "cost": plots.plot_bars(rows, out / "recipes_cost.png", [("time_s", "total time (s)"),
                                ("peak_rss_mb", "peak RSS (MiB)")], title="recipes: cost"),
    }  # fmt: skip
    table["figures"] = {k: Path(v).name for k, v in figures.items()}
    write_table(table, out / "table.json")
    log.info("recipes written to %s", out)
    return table
