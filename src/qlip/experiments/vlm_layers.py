"""Experiment 4: which tokenizer features serve understanding, the paper's Table 6 at small scale.

The VLM of a ``task: vlm`` config is trained at one equal budget with the vision tower's features taken from:

1. ``layer-2``: the second-to-last encoder block, before the quantizer (LLaVA's and the paper's choice);
2. ``layer-1``: the last encoder block;
3. ``codes``: the BSQ codes after the quantizer;
4. ``other-tokenizer`` (when given): layer -2 of a second QLIP model directory, e.g. a reconstruction-only tokenizer.

Each variant is scored by exact-match visual question answering on held-out shapes images and phrasings
(:func:`qlip.understanding.evaluate.evaluate_shapes_vqa`). Paper (GQA, LLaVA-1.5 with Vicuna-7B): layer -2 61.2,
layer -1 50.7, after the quantizer 40.4, a reconstruction-only tokenizer 50.8.
"""

from __future__ import annotations

import logging
from typing import Any

from .runner import Settings, Stage, Variant, run_overrides, run_variants, settings_summary
from .tables import aggregate, markdown_table, write_table

log = logging.getLogger(__name__)

PAPER_GQA = {"layer-2": 61.2, "layer-1": 50.7, "codes": 40.4, "other-tokenizer": 50.8}
DEFAULT_VQA_EVAL = {"num_eval": 200, "batch_size": 64}  # held-out images (4 questions each), generation batch


def build_variants(settings: Settings, other_tokenizer: str | None) -> tuple[list[Variant], dict[str, Any]]:
    cfg = settings.base_config()
    if cfg.task != "vlm":
        raise ValueError(f"{settings.source_config} trains task {cfg.task!r}; vlm-layers needs a `task: vlm` config "
                         "(e.g. configs/vlm-shapes.yaml)")  # fmt: skip
    steps = settings.steps(cfg.optim.steps)
    caption = min(round(cfg.task_options.caption_steps * settings.budget), max(0, steps - 1))
    base = run_overrides(settings, steps, cfg.optim.warmup_steps / cfg.optim.steps) + [f"vlm.caption_steps={caption}"]

    def variant(name: str, label: str, extra: list[str]) -> Variant:
        stage = Stage("vlm", files=[settings.config], overrides=base + extra, steps=steps)
        return Variant(name, [stage], settings.seeds, {"label": label, "paper_gqa": PAPER_GQA[name]}, evaluator="vqa")

    variants = [
        variant("layer-2", "layer -2, before the quantizer", ["vlm.feature=layer", "vlm.layer=-2"]),
        variant("layer-1", "layer -1 (last block)", ["vlm.feature=layer", "vlm.layer=-1"]),
        variant("codes", "quantized codes", ["vlm.feature=codes"]),
    ]
    if other_tokenizer:
        variants.append(variant("other-tokenizer", f"layer -2 of {other_tokenizer}",
                                ["vlm.feature=layer", "vlm.layer=-2", f"vlm.tokenizer={other_tokenizer}"]))  # fmt: skip
    return variants, {"steps": steps, "caption_steps": caption, "other_tokenizer": other_tokenizer}


def run_vlm_layers(settings: Settings, other_tokenizer: str | None = None) -> dict[str, Any]:
    """Run (or continue) the variants; write ``table.json`` and ``table.md`` into ``settings.out``."""
    settings.freeze()
    cfg = settings.base_config()
    variants, info = build_variants(settings, other_tokenizer)
    results = run_variants(settings, variants)
    rows = aggregate(results, order=[v.name for v in variants])
    lead = [("features", lambda r: r["meta"]["label"]), ("seeds", lambda r: len(r["seeds"])),
            ("paper GQA", lambda r: r["meta"]["paper_gqa"])]  # fmt: skip
    cols = [("VQA mean %", "vqa/mean", 1), ("color %", "vqa/color", 1), ("shape %", "vqa/shape", 1),
            ("position %", "vqa/position", 1), ("yes/no %", "vqa/yesno", 1), ("hallucination %", "hallucination", 1),
            ("time s", "time_s", 0)]  # fmt: skip
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown_table(rows, cols, lead) + "\n")
    table = {"experiment": "vlm-layers", "settings": settings_summary(settings, cfg, info), "rows": rows}
    write_table(table, out / "table.json")
    return table
