"""Text-to-image evaluation on the built-in shapes: ShapesEval (GenEval-style) and the CLIP score.

ShapesEval asks an independent judge (:mod:`qlip.eval.judge`, a supervised CNN, not a QLIP model) to read shape,
color and position off each generated image and compares them with what its caption asked for; the result is the
percent of images right per attribute and on all three at once (``gen/shape``, ``gen/color``, ``gen/position``,
``gen/all``). Generated from the captions of held-out attribute combinations
(``ShapesConfig(holdout_combinations=..., eval_combinations="held_out")``), it measures composition rather than
memory. The judge's own accuracy on real held-out images and on a QLIP model's reconstructions of them
(:func:`judge_ceiling`) bounds what a generator over that model's tokens can score.

The CLIP score (:func:`clip_score`) is 100 times the mean cosine similarity of each image's and its caption's
QLIP embeddings. :func:`evaluate_generator` runs all of it for a generator (``qlip eval generation`` and the
text-to-image experiments).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..data.shapes import POSITION_PHRASE, ShapesConfig
from ..transforms import image_transform, to_uint8
from .judge import ATTRIBUTES, ShapesJudge, judge_accuracy, label_names, shapes_images

ImageBatch = Sequence[Image.Image] | Tensor  # PIL images or uint8 (B, 3, H, W)
# The demo's held-out compositions (the generator of configs/t2i-shapes.yaml never saw these triples).
DEMO_HELD_OUT = "shapes:easy?sizes=large&holdout_combinations=0.1&eval_combinations=held_out"


def attribute_mentions(caption: str, classes: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Every shape, color and position class a caption names (lists, maybe empty or several): shapes and colors
    as whole words, positions by their caption phrase (:data:`qlip.data.shapes.POSITION_PHRASE`)."""
    text = caption.lower()
    found: dict[str, list[str]] = {}
    for attribute in ATTRIBUTES:
        if attribute == "position":
            found[attribute] = [p for p in classes[attribute] if POSITION_PHRASE[p] in text]
        else:
            found[attribute] = [c for c in classes[attribute] if re.search(rf"\b{re.escape(c)}\b", text)]
    return found


def caption_attributes(caption: str, classes: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """The shape, color and position a one-shape caption asks for, e.g. "a red triangle in the top left corner".

    Shapes and colors are matched as whole words, positions by their caption phrase ("in the top left corner",
    "at the top", ...: :data:`qlip.data.shapes.POSITION_PHRASE`).

    Raises:
        ValueError: the caption names none or several of one attribute (the message names the caption).
    """
    found: dict[str, str] = {}
    for attribute, hits in attribute_mentions(caption, classes).items():
        if len(hits) != 1:
            what = "no" if not hits else f"several ({', '.join(hits)})"
            raise ValueError(f"caption {caption!r} names {what} {attribute}; ShapesEval needs captions of one shape "
                             f"that state its shape, color and position")  # fmt: skip
        found[attribute] = hits[0]
    return found


@dataclass
class ShapesEvalResult:
    """What :func:`shapes_eval` found.

    Attributes:
        metrics: ``gen/shape``, ``gen/color``, ``gen/position``, ``gen/all`` (percent) and ``num_eval``.
        targets: per image, the attributes asked for.
        predictions: per image, the attributes the judge read.
    """

    metrics: dict[str, Any]
    targets: list[dict[str, str]]
    predictions: list[dict[str, str]]


def shapes_eval(images: ImageBatch, targets: Sequence[str | Mapping[str, str]],
                judge: ShapesJudge) -> ShapesEvalResult:  # fmt: skip
    """ShapesEval of generated images: the percent whose shape, color, position (and all three) the judge reads
    as asked.

    Args:
        images: the generated images (PIL or uint8 (B, 3, H, W); resized to the judge's size when needed).
        targets: per image, its caption (parsed by :func:`caption_attributes`) or a mapping
            ``{"shape": ..., "color": ..., "position": ...}`` of class names.
        judge: a judge from :func:`qlip.eval.judge.load_judge` whose classes cover the targets.

    Raises:
        ValueError: counts differ, no image, a caption that does not state one shape, or a class the judge lacks.
    """
    n = len(images)
    if n != len(targets):
        raise ValueError(f"got {n} images but {len(targets)} captions or labels; give one per image")
    if n == 0:
        raise ValueError("ShapesEval needs at least one image")
    classes = judge.cfg.classes
    wanted = []
    for t in targets:
        want = caption_attributes(t, classes) if isinstance(t, str) else {a: str(t[a]) for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            if want[a] not in classes[a]:
                raise ValueError(f"the judge knows no {a} {want[a]!r}; its classes are {classes[a]}")
        wanted.append(want)
    predictions = judge.predict(images)
    right = {a: np.array([p[a] == w[a] for p, w in zip(predictions, wanted)]) for a in ATTRIBUTES}
    accuracy = {f"gen/{a}": 100.0 * float(right[a].mean()) for a in ATTRIBUTES}
    accuracy["gen/all"] = 100.0 * float(np.logical_and.reduce([right[a] for a in ATTRIBUTES]).mean())
    return ShapesEvalResult({**accuracy, "num_eval": n}, wanted, predictions)


@torch.no_grad()
def judge_ceiling(judge: ShapesJudge, config: ShapesConfig, *, num_images: int = 1000, split: str = "test",
                  seed: int = 0, model: torch.nn.Module | None = None,
                  batch_size: int = 100) -> dict[str, float]:  # fmt: skip
    """The judge's accuracy (percent) on real held-out shapes images and, given a QLIP model, on its
    reconstructions of the same images: the ceiling of ShapesEval for a generator over that model's tokens.

    Reconstructions follow the reconstruction protocol: the model's eval transform at its image size,
    ``model.reconstruct``, back to uint8 pixels.

    Args:
        judge: the judge.
        config: the shapes the generator was trained on (e.g. :func:`qlip.eval.judge.demo_shapes_config`).
        num_images: images of ``split`` (indices 0..num_images-1).
        split: "val" or "test" (the judge learnt from "train").
        seed: the shapes seed.
        model: a QLIP model with a decoder (optional).
        batch_size: images per model call.

    Returns:
        ``judge_real/<attribute>`` and ``judge_real/all`` (and ``judge_recon/...`` with a model).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    x, y = shapes_images(config, num_images, split=split, seed=seed)
    names = label_names(config, y)
    out = {f"judge_real/{k}": v for k, v in judge_accuracy(judge, x, names).items()}
    if model is not None:
        transform = image_transform(model.image_size, train=False)
        param = next(model.parameters())
        recon = []
        for start in range(0, num_images, batch_size):
            chunk = x[start : start + batch_size].permute(0, 2, 3, 1).numpy()
            batch = torch.stack([transform(Image.fromarray(a)) for a in chunk]).to(param.device, param.dtype)
            recon.append(to_uint8(model.reconstruct(batch)))
        out.update({f"judge_recon/{k}": v for k, v in judge_accuracy(judge, torch.cat(recon), names).items()})
    return out


@torch.no_grad()
def clip_score(model: torch.nn.Module, tokenizer: Any, images: ImageBatch, captions: Sequence[str], *,
               batch_size: int = 64) -> float:  # fmt: skip
    """CLIP score with a QLIP model: ``100 * mean_i cos(image_embedding_i, caption_embedding_i)``.

    The convention of the text-to-image literature's "CLIP score" tables (cosine times 100, no clipping at 0 and no
    2.5 weight as in the CLIPScore paper); both embeddings are the model's L2-normalized ones, images go through
    the model's eval transform. Comparable only between images scored by the same QLIP model.

    Args:
        model: a QLIP model with its text tower.
        tokenizer: the model's tokenizer (``qlip.get_tokenizer``).
        images: PIL images or uint8 (B, 3, H, W).
        captions: one per image.
        batch_size: images per model call.
    """
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions; give one caption per image")
    if len(images) == 0:
        raise ValueError("the CLIP score needs at least one image")
    if isinstance(images, Tensor):
        images = [Image.fromarray(a) for a in images.permute(0, 2, 3, 1).cpu().numpy()]
    transform = image_transform(model.image_size, train=False)
    param = next(model.parameters())
    total = 0.0
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([transform(img.convert("RGB")) for img in images[start : start + batch_size]])
        img_emb = model.encode_image(pixels.to(param.device, param.dtype), normalize=True).float()  # (b, D)
        ids = tokenizer(list(captions[start : start + batch_size])).to(param.device)
        txt_emb = model.encode_text(ids, normalize=True).float()  # (b, D)
        total += float((img_emb * txt_emb).sum(-1).sum())
    return 100.0 * total / len(images)


@dataclass
class GeneratorEvalResult:
    """What :func:`evaluate_generator` found: ``metrics`` (ShapesEval, the judge's ceiling and the CLIP score), the
    ``captions`` asked for and the generated ``images`` (PIL)."""

    metrics: dict[str, Any]
    captions: list[str]
    images: list[Image.Image]


def evaluate_generator(gen: Any, judge: ShapesJudge, config: ShapesConfig, *, split: str = "test", limit: int = 200,
                       batch_size: int = 32, cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, seed: int = 0) -> GeneratorEvalResult:  # fmt: skip
    """ShapesEval of a generator on the captions of the first ``limit`` images of ``split`` under ``config``, the
    judge's ceiling on its QLIP model's reconstructions of real images (every composition) and the CLIP score.

    Args:
        gen: a :class:`qlip.generation.Generator`.
        judge: the judge (:func:`qlip.eval.judge.load_judge`).
        config: the shapes whose captions are drawn (e.g. ``shapes_config_from_spec(DEMO_HELD_OUT)``).
        split, limit: which captions.
        batch_size: captions per generation call; batch ``k`` is sampled with seed ``seed + k * batch_size``.
        cfg_scale, temperature, top_k, top_p: sampling settings.

    Raises:
        GenerationInputError: a sampling setting out of range.
        ValueError: captions that do not state one shape, color and position the judge knows.
    """
    import dataclasses
    import warnings

    from ..data.shapes import generate_shapes_sample

    captions = [generate_shapes_sample(i, config, split=split)["caption"] for i in range(limit)]
    for caption in captions:  # before sampling: a caption ShapesEval cannot read fails at once
        caption_attributes(caption, judge.cfg.classes)
    images: list[Image.Image] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a caption cut to the text context is the generator's own convention
        for start in range(0, len(captions), batch_size):
            images += gen.generate(captions[start : start + batch_size], cfg_scale=cfg_scale, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed + start)  # fmt: skip
    metrics: dict[str, Any] = dict(shapes_eval(images, captions, judge).metrics)
    if gen.qlip.visual is not None:  # the tokenizer's image encoder: its reconstructions cap what the judge can read
        real = dataclasses.replace(config, eval_combinations="all")  # the ceiling reads every composition
        metrics.update(judge_ceiling(judge, real, num_images=limit, split=split, model=gen.qlip))
        metrics["clip_score"] = clip_score(gen.qlip, gen.tokenizer, images, captions)
    return GeneratorEvalResult(metrics, captions, images)
