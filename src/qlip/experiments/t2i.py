"""Text-to-image experiments over QLIP tokens (docs/generation.md), on the experiment runner.

* ``t2i-codecs``: one generator config trained with each image-token codec (``subtoken``, ``depth``, ``bits``) for
  the same optimizer steps and batch, so at equal training compute in steps x images; the table reports each one's
  trainable parameters and measured training time next to its quality, since the codecs differ in both.
* ``t2i-tokenizers``: the paper's claim at laptop scale: the same generator, at the same budget, over the tokens of
  several tokenizers (the text-aligned demo tokenizer against its reconstruction-only twin, trained with the
  alignment weight at 0). Each tokenizer's data is tokenized first (``qlip tokenize``'s
  :func:`qlip.tokenize_dataset.tokenize_dataset`, resumable), or its token folder is given.

Every generator is evaluated by ShapesEval (:func:`qlip.eval.generation.evaluate_generator`, the machinery of
``qlip eval generation``) on the captions of held-out compositions with one fixed sampling seed, plus the judge's
ceiling on its tokenizer's reconstructions and the CLIP score under its own QLIP model (comparable between codecs
over one tokenizer, not between tokenizers).

The generator is conditioned on the text tower of the QLIP model whose tokens it models, so in ``t2i-tokenizers``
the tokenizers also bring different text encoders (a reconstruction-only tokenizer's text tower is never trained).
Give every run one shared text encoder with an override (``--set generator.text_encoder=...`` where the installed
qlip has that option) to compare the tokens alone.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig
from .runner import Settings, Stage, Variant, run_overrides, run_variants, settings_summary
from .tables import aggregate, markdown_table, write_table

log = logging.getLogger(__name__)

CODEC_LABELS = {
    "subtoken": "subtoken: each position as sub-tokens in raster order (one AR step each)",
    "depth": "depth: one AR step per position, a depth head predicts its sub-tokens",
    "bits": "bits: one AR step per position, d binary logits",
}
# The tokenizer demo's shapes with 10% of the (shape, color, position) triples held out (configs/t2i-shapes.yaml)
DEMO_TRAIN_DATA = "shapes:easy?sizes=large&holdout_combinations=0.1"
QUALITY_COLUMNS = [("shape %", "gen/shape", 1), ("color %", "gen/color", 1), ("position %", "gen/position", 1),
                   ("all three %", "gen/all", 1), ("CLIP score", "clip_score", 1),
                   ("ceiling: shape % on reconstructions", "judge_recon/shape", 1)]  # fmt: skip
COST_COLUMNS = [("trainable params", "params", 0), ("steps", "train/steps", 0), ("train time s", "train/time_s", 0),
                ("images/s", "train/img_per_s", 1), ("peak RSS MiB", "peak_rss_mb", 0)]  # fmt: skip


def _generator_config(settings: Settings) -> TrainConfig:
    cfg = settings.base_config()
    if cfg.task != "generator":
        raise ValueError(f"{settings.source_config} trains task {cfg.task!r}; the text-to-image experiments need a "
                         "generator config such as configs/t2i-shapes.yaml")  # fmt: skip
    return cfg


def _train_stage(settings: Settings, cfg: TrainConfig, extra: list[str]) -> Stage:
    steps = settings.steps(cfg.optim.steps)
    base = run_overrides(settings, steps, cfg.optim.warmup_steps / max(1, cfg.optim.steps))
    return Stage("train", files=[settings.config], overrides=base + extra, steps=steps)


def _write_tables(settings: Settings, cfg: TrainConfig, variants: list[Variant], experiment: str, lead_header: str,
                  info: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    results = run_variants(settings, variants)
    rows = aggregate(results, order=[v.name for v in variants])
    lead = [(lead_header, lambda r: r["meta"]["label"]), ("seeds", lambda r: len(r["seeds"]))]
    quality = markdown_table(rows, QUALITY_COLUMNS, lead)
    cost = markdown_table(rows, COST_COLUMNS, lead[:1])
    g = settings.eval_options
    note = (f"ShapesEval: {settings.eval['num_eval']} captions of {g.get('data')} (split {g.get('split')}), guidance "
            f"{g.get('cfg_scale')}, temperature {g.get('temperature', 1.0)}, judge {g.get('judge')}; every run "
            f"{info['steps']} steps x batch {cfg.data.batch_size}.")  # fmt: skip
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(f"{quality}\n\n{cost}\n\n{note}\n")
    summary = settings_summary(settings, cfg, {**info, "generation": g})
    for key in ("chance", "architecture"):  # about QLIP training, not generators
        summary.pop(key, None)
    summary["model"] = "generator"
    table = {"experiment": experiment, "settings": summary, "rows": rows, "note": note, "figures": {}}
    write_table(table, out / "table.json")
    log.info("%s written to %s", experiment, out)
    return table


def run_t2i_codecs(settings: Settings, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train the config's generator with each codec at the same steps and batch, evaluate, write the tables."""
    settings.freeze()
    cfg = _generator_config(settings)
    parts = cfg.task_options.parts
    variants = [Variant(codec, [_train_stage(settings, cfg, [f"generator.codec={codec}", *(overrides or [])])],
                        settings.seeds, {"label": CODEC_LABELS[codec], "codec": codec,
                                         "parts": 1 if codec == "bits" else parts}, evaluator="generator")
                for codec in CODEC_LABELS]  # fmt: skip
    info = {"steps": settings.steps(cfg.optim.steps), "overrides": list(overrides or [])}
    return _write_tables(settings, cfg, variants, "t2i-codecs", "codec", info)


def parse_tokenizers(items: list[str]) -> dict[str, tuple[str, str | None]]:
    """``NAME=MODEL_DIR`` or ``NAME=MODEL_DIR,TOKEN_FOLDER`` -> {name: (model dir, token folder or None)}."""
    out: dict[str, tuple[str, str | None]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value or "/" in name or name in out:
            raise ValueError(f"--tokenizers takes distinct NAME=MODEL_DIR or NAME=MODEL_DIR,TOKEN_FOLDER items (a "
                             f"NAME without '/'), got {item!r}")  # fmt: skip
        model, _, tokens = value.partition(",")
        if not (Path(model) / "config.json").is_file():
            raise ValueError(f"--tokenizers {name}={model}: no QLIP model directory there (config.json)")
        if tokens and not Path(tokens).exists():
            raise ValueError(f"--tokenizers {name}: no token folder {tokens}; leave it out to tokenize the data")
        out[name] = (model, tokens or None)
    if len(out) < 2:
        raise ValueError("--tokenizers needs at least two tokenizers to compare, e.g. aligned=DIR1 recon=DIR2")
    return out


def tokenize_for(name: str, model_dir: str, out: Path, data: str, count: int, batch_size: int) -> dict[str, Any]:
    """Tokenize ``count`` samples of ``data`` with ``model_dir`` into ``out`` (continuing an earlier call)."""
    from ..factory import create_model
    from ..inference import optimize_for_inference
    from ..tokenize_dataset import tokenize_dataset

    t0 = time.perf_counter()
    model = optimize_for_inference(create_model(model_dir, parts=("vision", "quantizer")), mode="fp32")
    result = tokenize_dataset(model, data, out, batch_size=batch_size, num_workers=0, limit=count, progress=False)
    log.info("%s: %d images tokenized now, %d shard(s) done earlier, in %s", name, result.images,
             result.shards_skipped, out)  # fmt: skip
    return {"tokens": str(out), "images_tokenized_now": result.images, "seconds": time.perf_counter() - t0}


def run_t2i_tokenizers(settings: Settings, tokenizers: dict[str, tuple[str, str | None]], *,
                       data: str = DEMO_TRAIN_DATA, count: int = 30000, tokenize_batch: int = 64,
                       overrides: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Tokenize (where no token folder is given), train the same generator over each tokenizer's tokens, evaluate,
    and write the side-by-side tables."""
    settings.freeze()
    cfg = _generator_config(settings)
    folders: dict[str, Any] = {}
    variants = []
    for name, (model_dir, tokens) in tokenizers.items():
        if tokens is None:
            folders[name] = tokenize_for(name, model_dir, settings.out / "tokens" / name, data, count, tokenize_batch)
            tokens = folders[name]["tokens"]
        else:
            folders[name] = {"tokens": tokens, "given": True}
        extra = [f"generator.tokenizer={model_dir}", f"generator.tokens={tokens}", *(overrides or [])]
        variants.append(Variant(name, [_train_stage(settings, cfg, extra)], settings.seeds,
                                {"label": f"{name} ({model_dir})", "tokenizer": model_dir, "tokens": tokens},
                                evaluator="generator"))
    info = {"steps": settings.steps(cfg.optim.steps), "overrides": list(overrides or []), "data": data,
            "count": count, "tokenized": folders}  # fmt: skip
    return _write_tables(settings, cfg, variants, "t2i-tokenizers", "tokenizer", info)
