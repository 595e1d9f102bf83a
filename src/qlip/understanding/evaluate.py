"""Visual question answering on held-out shapes: exact-match accuracy per question type, yes/no accuracy, the
hallucination rate, and a blind baseline (the same model with the image features replaced by zeros).

Flat metric keys (percent, see :mod:`qlip.eval.schema`): ``vqa/<type>`` for color, shape, position, size and yesno,
``vqa/mean`` (their mean), ``hallucination`` (share of "yes" answers to questions about absent attributes), and the
same for the blind model as ``vqa_blind/<type>``, ``vqa_blind/mean`` and ``hallucination_blind``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from ..data.shapes import ShapesConfig, generate_shapes_sample
from ..eval.schema import percent
from .data import QUESTION_TYPES, question_types, shapes_question
from .model import VisionLanguageModel


def normalize_answer(text: str) -> str:
    """Lower case, punctuation dropped, single spaces: the form exact match compares."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def shapes_vqa_set(cfg: ShapesConfig, *, num_images: int, split: str = "val", seed: int = 0,
                   phrasings: str = "held_out") -> tuple[list[Any], list[dict[str, Any]]]:  # fmt: skip
    """(PIL images, questions): one question of each type per image; a question is {"image", "question",
    "answer", "type", "absent"} with ``image`` its image's index."""
    images, questions = [], []
    for i in range(num_images):
        sample = generate_shapes_sample(i, cfg, split=split, seed=seed)
        images.append(sample["image"])
        rng = np.random.default_rng([seed, 7, i])
        for qtype in question_types(cfg):
            qa = shapes_question(sample["attributes"]["shapes"][0], cfg, rng, qtype=qtype, phrasings=phrasings)
            questions.append({"image": i, **qa})
    return images, questions


def _score(questions: list[dict[str, Any]], answers: list[str], prefix: str, halluc_key: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for qtype in QUESTION_TYPES:
        rows = [normalize_answer(a) == normalize_answer(q["answer"]) for q, a in zip(questions, answers)
                if q["type"] == qtype]  # fmt: skip
        if rows:
            out[f"{prefix}/{qtype}"] = percent(sum(rows) / len(rows))
    if out:
        out[f"{prefix}/mean"] = sum(out.values()) / len(out)
    absent = [normalize_answer(a) == "yes" for q, a in zip(questions, answers) if q["absent"]]
    if absent:
        out[halluc_key] = percent(sum(absent) / len(absent))
    return out


@torch.no_grad()
def evaluate_shapes_vqa(model: VisionLanguageModel, cfg: ShapesConfig, *, num_images: int = 200, split: str = "val",
                        seed: int = 0, phrasings: str = "held_out", batch_size: int = 64, blind: bool = True,
                        max_new_tokens: int = 16) -> dict[str, Any]:  # fmt: skip
    """The metrics of the module docstring, plus ``num_eval`` (questions) and ``examples`` (the first answers)."""
    images, questions = shapes_vqa_set(cfg, num_images=num_images, split=split, seed=seed, phrasings=phrasings)
    was_training = model.training
    model.eval()
    features = []
    for s in range(0, len(images), batch_size):
        features.append(model.image_features(model.preprocess(images[s : s + batch_size]).to(model.device)))
    feats = torch.cat(features)  # (num_images, N, C)
    runs = {"vqa": feats, **({"vqa_blind": torch.zeros_like(feats)} if blind else {})}
    metrics: dict[str, Any] = {"num_eval": len(questions)}
    examples: list[dict[str, Any]] = []
    for prefix, f in runs.items():
        answers: list[str] = []
        for s in range(0, len(questions), batch_size):
            chunk = questions[s : s + batch_size]
            index = torch.tensor([q["image"] for q in chunk], device=f.device)
            ids = model.generate_ids(f[index], [[(f"<image>\n{q['question']}", None)] for q in chunk],
                                     max_new_tokens=max_new_tokens)  # fmt: skip
            answers += [model.tokenizer.decode(r).strip() for r in ids]
        halluc = "hallucination" if prefix == "vqa" else "hallucination_blind"
        metrics.update(_score(questions, answers, prefix, halluc))
        if prefix == "vqa":
            examples = [{**q, "predicted": a} for q, a in zip(questions[:20], answers[:20])]
    model.train(was_training)
    return {"metrics": metrics, "examples": examples}
