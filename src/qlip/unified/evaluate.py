"""``qlip eval unified``: the three abilities of a unified model in one table.

* text: held-out perplexity of the corpus it learnt from (``text_ppl``), the initial language model's
  (``text_ppl_init``, recorded at the start of training) and the change in percent (``text_ppl_change``);
* image -> text: captions of real shapes images of held-out attribute combinations, scored by the shape, color
  and position words they name (``cap/shape``, ``cap/color``, ``cap/position``, ``cap/all``, percent);
* text -> image: ShapesEval of images generated from held-out captions (``gen/...``, :mod:`qlip.eval.generation`),
  when a judge is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..data.shapes import DEFAULT_COLORS, POSITIONS, SHAPE_KINDS, ShapesConfig, generate_shapes_sample
from ..eval.generation import attribute_mentions
from ..eval.judge import ATTRIBUTES, label_names, shapes_images
from .corpus import load_corpus
from .pipeline import UnifiedModel
from .text import perplexity, token_stream

ALL_CLASSES = {"shape": SHAPE_KINDS, "color": tuple(DEFAULT_COLORS), "position": POSITIONS}


def caption_accuracy(captions: Sequence[str], truths: Sequence[str | Mapping[str, str]],
                     classes: Mapping[str, Sequence[str]] = ALL_CLASSES) -> dict[str, float]:  # fmt: skip
    """Percent of captions that name exactly the true class, per attribute, and on all three (``cap/all``).

    ``truths``: per image its true caption (the attributes it names are scored) or a mapping attribute -> class. A
    caption naming no class or several of one attribute is wrong on it.
    """
    if len(captions) != len(truths) or not captions:
        raise ValueError(f"got {len(captions)} captions for {len(truths)} images; give one per image, at least one")
    right: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    every = []
    for caption, truth in zip(captions, truths):
        if isinstance(truth, str):
            truth = {a: hits[0] for a, hits in attribute_mentions(truth, classes).items() if len(hits) == 1}
        said = attribute_mentions(caption, classes)
        ok = {a: said[a] == [truth[a]] for a in ATTRIBUTES if a in truth}
        for a, v in ok.items():
            right[a].append(v)
        every.append(all(ok.values()))
    out = {f"cap/{a}": 100.0 * float(np.mean(v)) for a, v in right.items() if v}
    out["cap/all"] = 100.0 * float(np.mean(every))
    return out


def evaluate_unified(um: UnifiedModel, *, shapes: ShapesConfig | None = None, judge: Any = None, limit: int = 200,
                     split: str = "test", text_windows: int = 64, cfg_scale: float = 3.0, temperature: float = 1.0,
                     top_p: float = 0.95, seed: int = 0, batch_size: int = 50) -> dict[str, Any]:  # fmt: skip
    """The metrics of the module docstring (``shapes`` None: text only; ``judge`` None: no ShapesEval).

    Returns:
        ``{"metrics": flat metrics, "examples": [{"truth", "caption", "prompt"}], "images": generated images,
        "notes": [...]}``.
    """
    cfg = um.cfg
    corpus = load_corpus(cfg.corpus.get("spec") or cfg.corpus["name"], cfg.corpus.get("held_out_share", 0.05))
    window = int(cfg.reference.get("window") or cfg.corpus.get("seq_len", cfg.ar.max_seq_len // 2) + 1)
    windows = int(cfg.reference.get("eval_windows") or text_windows)
    stream = token_stream(um.tokenizer, corpus.held_out)
    metrics: dict[str, Any] = {"text_ppl": perplexity(um.lm, stream, window, max_windows=windows)}
    if "text_ppl" in cfg.reference:
        metrics["text_ppl_init"] = float(cfg.reference["text_ppl"])
        metrics["text_ppl_change"] = 100.0 * (metrics["text_ppl"] / metrics["text_ppl_init"] - 1.0)
    notes = []
    if corpus.sha256 != cfg.corpus.get("sha256"):
        notes.append(f"the held-out text differs from the one the model learnt from (corpus sha256 {corpus.sha256[:12]}"
                     f", recorded {str(cfg.corpus.get('sha256'))[:12]}): perplexities are not comparable")
    examples: list[dict[str, str]] = []
    images: list[Image.Image] = []
    if shapes is None or not um.is_unified:
        return {"metrics": metrics, "examples": examples, "images": images, "notes": notes}
    # image -> text on real images of held-out compositions
    x, y = shapes_images(shapes, limit, split=split, seed=0)
    names = label_names(shapes, y)
    truths = [{a: names[a][i] for a in ATTRIBUTES} for i in range(limit)]
    captions: list[str] = []
    for start in range(0, limit, batch_size):
        chunk = [Image.fromarray(a) for a in x[start : start + batch_size].permute(0, 2, 3, 1).numpy()]
        captions += um.caption(chunk, temperature=temperature, top_p=top_p, seed=seed + start)
    metrics.update(caption_accuracy(captions, truths))
    examples = [{"truth": " ".join(t.values()), "caption": c} for t, c in zip(truths[:16], captions[:16])]
    # text -> image from captions of held-out compositions
    if judge is not None:
        from ..eval.generation import shapes_eval

        prompts = [generate_shapes_sample(i, shapes, split=split)["caption"] for i in range(limit)]
        for start in range(0, limit, batch_size):
            images += um.generate(prompts[start : start + batch_size], cfg_scale=cfg_scale, temperature=temperature,
                                  top_p=top_p, seed=seed + start)  # fmt: skip
        result = shapes_eval(images, prompts, judge)
        metrics.update({k: v for k, v in result.metrics.items() if k != "num_eval"})
        for ex, p in zip(examples, prompts):
            ex["prompt"] = p
    metrics["num_eval"] = limit
    return {"metrics": metrics, "examples": examples, "images": images, "notes": notes}
