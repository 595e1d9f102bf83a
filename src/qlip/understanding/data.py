"""Conversations for the vision-language model: shapes questions and answers, and LLaVA's JSON format.

Shapes (built in): questions about the shape, its color, position and size (when the images have several sizes),
and yes/no questions about an attribute that is present or absent (the absent ones measure hallucination: a "yes"
to them is one). Each question type has several phrasings; the last of each is held out of training
(``phrasings="held_out"`` asks only those). Images come from :mod:`qlip.data.shapes`, whose held-out (shape, color,
position) triples never reach the train split.
Captioning prompts (LLaVA's stage 1) ask for the sample's caption.

LLaVA's JSON (real data)::

    [{"image": "coco/0001.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                                                 {"from": "gpt", "value": "A dog ..."}, ...]}, ...]

:func:`read_llava_json` reads it into (image path, turns) records; a bad record (no image, a missing or unreadable
image file, roles out of order, an empty value, a misplaced ``<image>``) is named, counted and skipped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.shapes import POSITION_PHRASE, ShapesConfig, make_caption, shapes_attributes
from .errors import UnderstandingError
from .model import IMAGE_TOKEN

log = logging.getLogger(__name__)

QUESTION_TYPES = ("color", "shape", "position", "size", "yesno")
PHRASINGS = ("train", "held_out", "all")

# type -> phrasings; the LAST one of each type is held out of training. Many training phrasings, so that the
# from-scratch language model learns to read the question's key word rather than the wording of a few templates.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("What color is the shape?", "What is the color of the shape?", "Which color does the shape have?",
              "What color is the object?", "Tell me the color of the shape.", "Name the color of the figure.",
              "What color do you see?", "The shape has which color?", "What is the object's color?",
              "Which color is the shape?"),
    "shape": ("What shape is in the image?", "What kind of shape is this?", "Which shape do you see?",
              "What is the shape?", "Name the shape in the picture.", "Which figure is drawn?",
              "Tell me which shape this is.", "What kind of object is shown?", "Which shape is shown here?",
              "What shape do you see in the image?"),
    "position": ("Where is the shape?", "Where is the shape located?", "In which part of the image is the shape?",
                 "Where is it?", "Tell me where the shape is.", "Where does the shape sit?",
                 "What is the position of the shape?", "In what part of the picture is the object?",
                 "Where can you see the figure?", "Where in the image is the shape?"),
    "size": ("What size is the shape?", "How big is the shape?", "Is the shape medium or large?",
             "How large is the object?", "Tell me the size of the shape.", "What is the size of the figure?",
             "Which size does the shape have?"),
}  # fmt: skip
# attribute -> yes/no phrasings with {value}; the last of each is held out.
YESNO_QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("Is there a {value} shape?", "Is the shape {value}?", "Is the object {value}?",
              "Does the image contain a {value} shape?", "Is a {value} shape shown?", "Can you see a {value} figure?",
              "Do you see a {value} shape?"),
    "shape": ("Is there a {value} in the image?", "Is the shape a {value}?", "Does the image show a {value}?",
              "Is a {value} drawn here?", "Is the object a {value}?", "Can you see a {value} here?",
              "Do you see a {value}?"),
    "position": ("Is the shape {value}?", "Is there a shape {value}?", "Is the object {value}?",
                 "Does the image have a shape {value}?", "Is a figure drawn {value}?", "Can you see a figure {value}?",
                 "Do you see a shape {value}?"),
    "size": ("Is the shape {value}?", "Is there a {value} shape?", "Is the object {value}?",
             "Does the image contain a {value} shape?", "Do you see a {value} shape?"),
}  # fmt: skip
# Rewording of training questions (``reword`` > 0): a lead-in and a place phrase added around a training phrasing,
# so that words like "in the image" or "do you see" occur in every question type and the language model learns
# that the question word and the attribute noun decide the answer, not the rest of the wording. A reworded question
# never equals a held-out phrasing (checked).
REWORD_LEADS = ("", "Look at the image. ", "Look at the picture. ", "Please answer. ")
REWORD_PLACES = ("", " in the image", " in the picture", " here", " in this picture")
CAPTION_PROMPTS = ("Describe the image.", "Give a short caption of the image.", "What does the image show?",
                   "Describe the image briefly.")  # fmt: skip


def question_types(cfg: ShapesConfig) -> tuple[str, ...]:
    """The question types a shapes configuration supports: size only when its images have more than one size."""
    return tuple(t for t in QUESTION_TYPES if t != "size" or len(cfg.sizes) > 1)


def _pick(options: tuple[str, ...], phrasings: str, rng: np.random.Generator) -> str:
    pool = {"train": options[:-1], "held_out": options[-1:], "all": options}[phrasings]
    return pool[int(rng.integers(len(pool)))]


_HELD_OUT_TEMPLATES = {o[-1] for o in QUESTIONS.values()} | {o[-1] for o in YESNO_QUESTIONS.values()}


def reword(question: str, rng: np.random.Generator) -> str:
    """``question`` with a lead-in and/or a place phrase from :data:`REWORD_LEADS` / :data:`REWORD_PLACES` (the
    place phrase goes before the final "?" or "." and only into a question that names no place yet); never a
    held-out phrasing."""
    lead = REWORD_LEADS[int(rng.integers(len(REWORD_LEADS)))]
    place = REWORD_PLACES[int(rng.integers(len(REWORD_PLACES)))]
    if any(w in question for w in ("image", "picture", "here")) or question[-1] not in "?.":
        place = ""
    out = f"{lead}{question[:-1]}{place}{question[-1]}" if question else question
    return question if out[len(lead):] in _HELD_OUT_TEMPLATES else out


def _value_text(attribute: str, value: str) -> str:
    return POSITION_PHRASE[value] if attribute == "position" else value


def shapes_question(shape: dict[str, Any], cfg: ShapesConfig, rng: np.random.Generator, *, qtype: str | None = None,
                    phrasings: str = "train", yesno_share: float = 0.0,
                    reword_share: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """A question about ``shape`` (one entry of a shapes sample's attributes): of type ``qtype``, or drawn, every
    type equally often unless ``yesno_share`` > 0 sets the share of yes/no questions. With ``phrasings="train"``,
    ``reword_share`` of the questions are reworded (:func:`reword`).

    Returns {"question", "answer", "type", "absent"}: ``absent`` is True for a yes/no question about an attribute
    value the image does not have (its answer is "no"), False for one it has, None for the other types.
    """
    if phrasings not in PHRASINGS:
        raise ValueError(f"phrasings must be one of {PHRASINGS}, got {phrasings!r}")
    if qtype is None:
        types = question_types(cfg)
        if yesno_share > 0:
            types = ("yesno",) if rng.random() < yesno_share else tuple(t for t in types if t != "yesno")
        qtype = types[int(rng.integers(len(types)))]
    if qtype in QUESTIONS:
        answer = _value_text(qtype, shape[qtype])
        question = _maybe_reword(_pick(QUESTIONS[qtype], phrasings, rng), phrasings, reword_share, rng)
        return {"question": question, "answer": answer, "type": qtype, "absent": None}
    if qtype != "yesno":
        raise ValueError(f"unknown question type {qtype!r}; choose one of {QUESTION_TYPES}")
    attributes = tuple(a for a in YESNO_QUESTIONS if a != "size" or len(cfg.sizes) > 1)
    attribute = attributes[int(rng.integers(len(attributes)))]
    values = {"color": cfg.colors, "shape": cfg.shapes, "position": cfg.positions, "size": cfg.sizes}[attribute]
    absent = bool(rng.random() < 0.5) and len(values) > 1
    value = shape[attribute]
    if absent:
        others = [v for v in values if v != value]
        value = others[int(rng.integers(len(others)))]
    question = _maybe_reword(_pick(YESNO_QUESTIONS[attribute], phrasings, rng), phrasings, reword_share, rng)
    question = question.format(value=_value_text(attribute, value))
    return {"question": question, "answer": "no" if absent else "yes", "type": "yesno", "absent": absent}


def _maybe_reword(template: str, phrasings: str, share: float, rng: np.random.Generator) -> str:
    if share > 0 and phrasings == "train" and rng.random() < share:
        return reword(template, rng)
    return template


def caption_prompt(rng: np.random.Generator) -> str:
    return CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]


def with_image(question: str) -> str:
    """The user text of a single-image turn: the placeholder on its own line, then the question (LLaVA's layout)."""
    return f"{IMAGE_TOKEN}\n{question}"


def shapes_corpus(cfg: ShapesConfig, *, captions: int = 400, seed: int = 0) -> list[str]:
    """Every text the shapes conversations can hold (all phrasings, held-out ones too, all attribute values and
    the captions' templates), for building a word vocabulary."""
    texts = [*CAPTION_PROMPTS, *REWORD_LEADS, *REWORD_PLACES, "yes", "no"]
    for options in QUESTIONS.values():
        texts += options
    for attribute, options in YESNO_QUESTIONS.items():
        values = {"color": cfg.colors, "shape": cfg.shapes, "position": cfg.positions, "size": cfg.sizes}[attribute]
        texts += [o.format(value=_value_text(attribute, v)) for o in options for v in values]
    texts += list(POSITION_PHRASE.values())
    rng = np.random.default_rng(seed)
    for i in range(captions):
        texts.append(make_caption(shapes_attributes(i, cfg, seed=seed), cfg.caption_mode, rng))
    return texts


def shapes_conversation(index: int, cfg: ShapesConfig, *, split: str, seed: int, kind: str, rng: np.random.Generator,
                        phrasings: str = "train", qtype: str | None = None,
                        yesno_share: float = 0.0, reword_share: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """One single-turn conversation about shapes sample ``index``: ``kind`` "caption" or "qa" (see
    :func:`shapes_question` for ``qtype``, ``yesno_share`` and ``reword_share``).

    Returns {"turns": [(user, answer)], "type", "absent"} (type "caption" for captions).
    """
    shapes = shapes_attributes(index, cfg, split=split, seed=seed)
    if kind == "caption":
        caption = make_caption(shapes, cfg.caption_mode, rng)
        return {"turns": [(with_image(caption_prompt(rng)), caption)], "type": "caption", "absent": None}
    qa = shapes_question(shapes[0], cfg, rng, qtype=qtype, phrasings=phrasings, yesno_share=yesno_share,
                         reword_share=reword_share)
    return {"turns": [(with_image(qa["question"]), qa["answer"])], "type": qa["type"], "absent": qa["absent"]}


# --- LLaVA's JSON ------------------------------------------------------------------------------------------------
@dataclass
class LlavaData:
    """Readable records ({"image": Path, "turns": [(user, answer)], "key"}) and the skipped ones, named."""

    records: list[dict[str, Any]] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)


def _check_record(i: int, rec: Any, root: Path) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise ValueError("not an object")
    image, conv = rec.get("image"), rec.get("conversations")
    if not isinstance(image, str) or not image:
        raise ValueError("no image")
    if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
        raise ValueError("conversations is not a list of human / gpt pairs")
    turns = []
    for j in range(0, len(conv), 2):
        h, g = conv[j], conv[j + 1]
        if not (isinstance(h, dict) and isinstance(g, dict) and h.get("from") == "human" and g.get("from") == "gpt"):
            raise ValueError(f"turn {j // 2}: expected a 'human' message then a 'gpt' one")
        user, answer = h.get("value"), g.get("value")
        if not isinstance(user, str) or not isinstance(answer, str) or not user.strip() or not answer.strip():
            raise ValueError(f"turn {j // 2}: an empty or non-text value")
        turns.append((user.strip(), answer.strip()))
    count = sum(u.count(IMAGE_TOKEN) for u, _ in turns)
    if count > 1 or (count == 1 and IMAGE_TOKEN not in turns[0][0]):
        raise ValueError(f"{IMAGE_TOKEN} must appear once, in the first human message")
    path = (root / image) if not Path(image).is_absolute() else Path(image)
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    return {"image": path, "turns": turns, "key": str(rec.get("id", i))}


def check_image(record: dict[str, Any]) -> None:
    """Decode the image of a LLaVA record; raise ValueError naming it when it cannot be read."""
    from ..transforms import ImageLoadError, load_image

    try:
        load_image(record["image"])
    except (ImageLoadError, OSError) as e:
        raise ValueError(f"unreadable image {record['image']}: {e}") from None


def drop_unreadable_images(data: LlavaData) -> LlavaData:
    """``data`` without the records whose image cannot be decoded (named in ``bad``): the whole-set check that
    :func:`read_llava_json` skips with ``check_images=False``. Raises UnderstandingError when none is left."""
    out = LlavaData(bad=list(data.bad))
    for record in data.records:
        try:
            check_image(record)
        except ValueError as e:
            out.bad.append(f"record {record['key']}: {e}")
            continue
        out.records.append(record)
    if len(out.bad) > len(data.bad):
        log.warning("skipped %d record(s) with an unreadable image; first: %s", len(out.bad) - len(data.bad),
                    out.bad[len(data.bad)])  # fmt: skip
    if not out.records:
        raise UnderstandingError(f"no record has a readable image; first problem: {out.bad[-1]}")
    return out


def read_llava_json(path: str | Path, image_root: str | Path | None = None, *, check_images: bool = True) -> LlavaData:
    """Records of a LLaVA conversation file; image paths are relative to ``image_root`` (default: the file's
    folder). ``check_images`` also decodes every image, so an unreadable one is skipped here, not in training;
    without it only the files' existence is checked (what a run that reads images per batch needs at start)."""
    path = Path(path)
    try:
        items = json.loads(path.read_text())
    except FileNotFoundError:
        raise UnderstandingError(f"{path} does not exist; give a LLaVA JSON conversation file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnderstandingError(f"{path} is not a JSON file: {e}") from None
    if not isinstance(items, list):
        raise UnderstandingError(f"{path} must hold a JSON list of conversation records")
    root = Path(image_root) if image_root else path.parent
    out = LlavaData()
    for i, rec in enumerate(items):
        try:
            record = _check_record(i, rec, root)
            if check_images:
                check_image(record)
        except ValueError as e:
            out.bad.append(f"record {i}: {e}")
            continue
        out.records.append(record)
    if out.bad:
        log.warning("%s: skipped %d bad record(s) of %d; first: %s", path, len(out.bad), len(items), out.bad[0])
    if not out.records:
        raise UnderstandingError(f"{path} holds no usable record ({len(out.bad)} bad); first problem: "
                                 f"{out.bad[0] if out.bad else 'the list is empty'}")  # fmt: skip
    return out
