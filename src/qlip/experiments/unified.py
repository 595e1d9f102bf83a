"""The unified model's comparisons (docs/unified.md), on the experiment runner.

* ``um3-schedule``: the unified model of one ``task: unified`` config trained with the calm-down schedule on (the
  text share decays linearly from ``unified.start`` to ``unified.end`` over the horizon, scaled with the run's
  steps) and off (``unified.end`` from the first step), at equal optimizer steps and batch. The two runs do not see
  the same number of rows of each kind: "off" trains on fewer text rows and more image rows; the table states the
  expected rows of each kind of both.
* ``um3-specialists``: the unified model beside specialists trained at the same budget (equal optimizer steps and
  batch size; every other setting is its own config's):

  - ``text-only``: the same initial language model continued on text rows only (a unified run with ratios 1:0:0),
    the "language kept" reference for the perplexity;
  - ``captioner``: the same initial language model trained on image->text rows only (ratios 0:1:0), the
    captioning specialist over the same tokens, decoder and evaluation as the unified model;
  - ``generator``: a text-to-image generator (``task: generator``) over the same token folder and tokenizer.

Every decoder is scored by the machinery of ``qlip eval unified`` (:func:`qlip.unified.evaluate.evaluate_unified`:
held-out text perplexity and its change from the initial LM, captions of held-out compositions, ShapesEval of
images generated from held-out captions); the generator by that of ``qlip eval generation`` (ShapesEval on the same
captions with the same judge and sampling settings). A model is only asked what it was trained to do: the cells of
the others stay blank.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig, load_config
from ..unified.mixing import MixSchedule
from ..unified.model import KINDS
from .runner import (
    SMOKE_OVERRIDES,
    Settings,
    Stage,
    Variant,
    run_overrides,
    run_variants,
    settings_summary,
    snapshot_config,
)
from .tables import aggregate, markdown_table, write_table

log = logging.getLogger(__name__)

QUALITY_COLUMNS = [("text ppl", "text_ppl", 1), ("ppl change %", "text_ppl_change", 1),
                   ("cap shape %", "cap/shape", 1), ("cap color %", "cap/color", 1),
                   ("cap position %", "cap/position", 1), ("cap all %", "cap/all", 1),
                   ("gen shape %", "gen/shape", 1), ("gen color %", "gen/color", 1),
                   ("gen position %", "gen/position", 1), ("gen all %", "gen/all", 1)]  # fmt: skip
COST_COLUMNS = [("params", "params", 0), ("steps", "train/steps", 0), ("train time s", "train/time_s", 0),
                ("rows/s", "train/img_per_s", 1), ("peak RSS MiB", "peak_rss_mb", 0)]  # fmt: skip
# Sampling settings of every model, those of `qlip eval unified` (the paper's temperature and top-p).
SAMPLING = {"temperature": 1.0, "top_p": 0.95}  # the unified model's defaults; --temperature replaces the first


def _sampling(settings: Settings) -> dict[str, float]:
    """The sampling settings of every evaluation: SAMPLING, with the experiment's temperature when it gives one."""
    return {**SAMPLING, "temperature": float(settings.eval_options.get("temperature", SAMPLING["temperature"]))}


def _smoke(settings: Settings) -> list[str]:
    return list(SMOKE_OVERRIDES) if settings.smoke else []


def _config(path: str, source: str, overrides: list[str], task: str, flag: str, example: str) -> TrainConfig:
    """The config at ``path`` (the snapshot of ``source``), refused with one line unless it trains ``task``."""
    cfg = load_config([path], overrides)
    if cfg.task != task:
        raise ValueError(f"{flag} {source} trains task {cfg.task!r}; give a `task: {task}` config such as {example}")
    return cfg


def _scaled_horizon(opts: Any, steps: int, config_steps: int) -> int:
    """The schedule's horizon at the same share of the run as in the config (a 300-step decay of a 2,000-step
    config is 15% of any run)."""
    return max(1, round(opts.horizon * steps / max(1, config_steps)))


def expected_rows(schedule: MixSchedule, steps: int, batch_size: int) -> dict[str, float]:
    """Rows of each kind a run of ``steps`` x ``batch_size`` draws in expectation under ``schedule`` (one decimal)."""
    totals = [0.0, 0.0, 0.0]
    for step in range(steps):
        for k, share in enumerate(schedule.shares(step)):
            totals[k] += share * batch_size
    return {kind: round(total, 1) for kind, total in zip(KINDS, totals)}


def _unified_stage(settings: Settings, cfg: TrainConfig, steps: int, extra: list[str]) -> Stage:
    base = run_overrides(settings, steps, cfg.optim.warmup_steps / max(1, cfg.optim.steps))
    return Stage("train", files=[settings.config], overrides=base + extra, steps=steps)


def _ratios(r: Any) -> str:
    return ":".join(f"{x:g}" for x in r)


def _over(horizon: int) -> str:
    return f"over {horizon} step{'' if horizon == 1 else 's'}"


def _write(settings: Settings, cfg: TrainConfig, variants: list[Variant], experiment: str, lead_header: str,
           note: str, info: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    results = run_variants(settings, variants)
    rows = aggregate(results, order=[v.name for v in variants])
    lead = [(lead_header, lambda r: r["meta"]["label"]), ("seeds", lambda r: len(r["seeds"]))]
    if experiment == "um3-schedule":
        lead.append(("expected rows text / image->text / text->image",
                     lambda r: " / ".join(f"{r['meta']['rows'][k]:.0f}" for k in KINDS)))  # fmt: skip
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    table_md = markdown_table(rows, QUALITY_COLUMNS + COST_COLUMNS, lead)
    (out / "table.md").write_text(f"{table_md}\n\n{note}\n")
    summary = settings_summary(settings, cfg, {**info, "evaluation": {**settings.eval_options, **_sampling(settings)}})
    for key in ("chance", "architecture", "data"):  # about QLIP training, not language models
        summary.pop(key, None)
    summary["model"] = "unified"
    summary["eval"] = {"num_eval": settings.eval["num_eval"]}  # images captioned and captions generated per model
    table = {"experiment": experiment, "settings": summary, "rows": rows, "note": note, "figures": {}}
    write_table(table, out / "table.json")
    log.info("%s written to %s", experiment, out)
    return table


def _evaluation_note(settings: Settings) -> str:
    g = settings.eval_options
    judge = g.get("judge") if g.get("judge") not in (None, "none") else None
    gen = f"ShapesEval of images generated from the same captions (judge {judge}, guidance {g.get('cfg_scale')})" \
        if judge else "no text->image evaluation (--judge none)"  # fmt: skip
    return (f"Evaluation: held-out text perplexity; captions of {settings.eval['num_eval']} real images of "
            f"{g.get('data')} (split {g.get('split')}); {gen}; temperature {_sampling(settings)['temperature']}, "
            f"top-p {SAMPLING['top_p']}, seed 0.")  # fmt: skip


def run_um3_schedule(settings: Settings) -> dict[str, Any]:
    """Train the unified config with the calm-down schedule on and off at equal steps and batch, evaluate both,
    write ``table.json`` and ``table.md`` into ``settings.out``."""
    settings.freeze()
    cfg = _config(settings.config, settings.source_config, _smoke(settings), "unified", "--config",
                  "configs/um3-shapes.yaml")
    opts = cfg.task_options
    if list(opts.start) == list(opts.end):
        raise ValueError(f"{settings.source_config}: unified.start equals unified.end ({_ratios(opts.start)}), so the "
                         "schedule on and off are the same run; give the config the ratios to decay from")  # fmt: skip
    steps = settings.steps(cfg.optim.steps)
    horizon = _scaled_horizon(opts, steps, cfg.optim.steps)
    batch = cfg.one_process_batch  # rows per step (a config's workers fold into one process)
    on = MixSchedule(tuple(opts.start), tuple(opts.end), horizon, True)
    off = MixSchedule(tuple(opts.start), tuple(opts.end), horizon, False)
    variants = [
        Variant("on", [_unified_stage(settings, cfg, steps, ["unified.schedule=true", f"unified.horizon={horizon}"])],
                settings.seeds, {"label": f"on: {_ratios(opts.start)} -> {_ratios(opts.end)} {_over(horizon)}, "
                                          "then constant", "rows": expected_rows(on, steps, batch)},
                evaluator="unified", eval_options=_sampling(settings)),
        Variant("off", [_unified_stage(settings, cfg, steps, ["unified.schedule=false"])], settings.seeds,
                {"label": f"off: {_ratios(opts.end)} from the first step", "rows": expected_rows(off, steps, batch)},
                evaluator="unified", eval_options=_sampling(settings)),
    ]  # fmt: skip
    note = (f"Both runs: {steps} optimizer steps x batch {batch} rows from the initial language model "
            f"{opts.init}, the same learning rate and warmup; only the row mix differs. \"off\" uses the end ratios "
            f"{_ratios(opts.end)} (text : image->text : text->image) from the first step, so it trains on fewer "
            f"text rows and more image rows than \"on\" (expected rows in the table; the kinds are drawn per row). "
            + _evaluation_note(settings))  # fmt: skip
    info = {"steps": steps, "horizon": horizon, "config_horizon": opts.horizon, "start": list(opts.start),
            "end": list(opts.end), "init": opts.init, "tokenizer": opts.tokenizer, "tokens": opts.tokens}
    return _write(settings, cfg, variants, "um3-schedule", "schedule", note, info)


def run_um3_specialists(settings: Settings, generator_config: str) -> dict[str, Any]:
    """Train the unified config and its specialists (module docstring) at equal steps and batch, evaluate every
    one on what it can do, write ``table.json`` and ``table.md`` into ``settings.out``.

    Args:
        settings: the experiment's settings; ``settings.config`` is the ``task: unified`` config.
        generator_config: a ``task: generator`` config, trained over the unified config's tokens and tokenizer.
    """
    settings.freeze()
    cfg = _config(settings.config, settings.source_config, _smoke(settings), "unified", "--unified-config",
                  "configs/um3-shapes.yaml")
    gen_file = snapshot_config(generator_config, settings.out, f"generator-{Path(generator_config).name}")
    gen_cfg = _config(gen_file, generator_config, _smoke(settings), "generator", "--t2i-config",
                      "configs/t2i-shapes.yaml")
    opts = cfg.task_options
    steps = settings.steps(cfg.optim.steps)
    batch = cfg.one_process_batch  # rows per step (a config's workers fold into one process)
    horizon = _scaled_horizon(opts, steps, cfg.optim.steps)

    def decoder(name: str, label: str, extra: list[str], options: dict[str, Any]) -> Variant:
        stage = _unified_stage(settings, cfg, steps, extra)
        return Variant(name, [stage], settings.seeds, {"label": label}, evaluator="unified",
                       eval_options={**_sampling(settings), **options})  # fmt: skip

    only = ["unified.schedule=false"]
    gen_base = run_overrides(settings, steps, gen_cfg.optim.warmup_steps / max(1, gen_cfg.optim.steps))
    gen_stage = Stage("train", files=[gen_file], steps=steps,
                      overrides=gen_base + [f"generator.tokenizer={opts.tokenizer}", f"generator.tokens={opts.tokens}",
                                            f"data.batch_size={batch}"])  # fmt: skip
    variants = [
        decoder("unified", f"unified ({_ratios(opts.start)} -> {_ratios(opts.end)} {_over(horizon)})",
                [f"unified.horizon={horizon}"], {}),
        decoder("text-only", "text-only LM (same init, text rows only)",
                [*only, "unified.start=[1,0,0]", "unified.end=[1,0,0]"], {"data": None, "judge": None}),
        decoder("captioner", "captioner (same init, image->text rows only)",
                [*only, "unified.start=[0,1,0]", "unified.end=[0,1,0]"], {"judge": None}),
        Variant("generator", [gen_stage], settings.seeds, {"label": f"text-to-image generator ({generator_config})"},
                evaluator="generator", eval_options=_sampling(settings)),
    ]  # fmt: skip
    skipped = ""
    if settings.eval_options.get("judge") in (None, "none"):
        variants = variants[:-1]  # a generator is scored by ShapesEval only
        skipped = "The generator is left out: without a judge there is nothing to score it by. "
    note = (f"Equal budget: every model trains {steps} optimizer steps x batch {batch} rows (sequences); learning "
            f"rate, warmup and the rest are each model's own config's. The decoders start from {opts.init}; the "
            f"generator ({generator_config}) trains over the same tokens ({opts.tokens}) of the same tokenizer. "
            f"A blank cell: the model was not trained for that ability. {skipped}"
            + _evaluation_note(settings))  # fmt: skip
    info = {"steps": steps, "horizon": horizon, "init": opts.init, "tokenizer": opts.tokenizer,
            "tokens": opts.tokens, "generator_config": generator_config, "generator_snapshot": gen_file}
    return _write(settings, cfg, variants, "um3-specialists", "model", note, info)
