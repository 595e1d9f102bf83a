"""Zero-shot classification: a text classifier built from class names x prompt templates (docs/evaluation.md).

Protocol (pinned; the CLIP / QLIP one):

* every (class, template) prompt is embedded by the text tower and L2-normalized; the embeddings of one class are
  averaged over its templates and re-normalized, giving one unit column per class: the classifier (D, C);
* the image embedding (CLS -> post_norm -> projection, L2-normalized) is scored against every column (cosine
  similarity; the logit scale does not change a ranking, so it is left out);
* top-1 and top-5 accuracy (top-5 only when there are at least 5 classes), and a confusion matrix
  (rows: true class, columns: predicted class) for label sets of at most :data:`MAX_CONFUSION_CLASSES` classes.

The shipped lists: ``imagenet`` = the 1000 ImageNet-1k class names used by CLIP (in label order, so they match
the sorted-synset folder layout of ImageNet val) and ``openai`` = the 80 OpenAI CLIP ImageNet prompt templates.
The ``shapes`` tasks bring their own names and templates (:data:`qlip.data.shapes.SHAPES_TASKS`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from string import Formatter
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.sample import ClassificationTask

logger = logging.getLogger(__name__)

MAX_CONFUSION_CLASSES = 20
SHIPPED_CLASSNAMES = {"imagenet": "imagenet_classnames.txt"}
SHIPPED_TEMPLATES = {"openai": "openai_templates.txt"}


class TemplateError(ValueError):
    """A prompt template that cannot take a class name: no ``{}``, more than one, a named field or a lone brace."""


def check_template(template: str) -> None:
    """Raise :class:`TemplateError` unless ``template`` has exactly one ``{}`` and nothing else to fill.

    ``str.format`` alone would answer a bad template with a bare ``KeyError: 'x'`` (for ``{x}``) or a message that
    does not name the template (for a lone ``{``); this says which template is wrong and how to write it.
    """
    need = "needs exactly one {} where the class name goes (write a literal brace twice: {{ or }})"
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in Formatter().parse(template) if name is not None]
    except ValueError:  # "Single '{' encountered in format string"
        raise TemplateError(f"prompt template {template!r} {need}; it has a lone brace") from None
    if len(fields) != 1 or fields[0] != ("", "", None):
        found = ", ".join("{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                          for name, spec, conv in fields) or "no field"  # fmt: skip
        raise TemplateError(f"prompt template {template!r} {need}; it has {found}")


def _read_lines(path: Path | Any) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_classnames(spec: str | Sequence[str]) -> list[str]:
    """Class names from a shipped list ("imagenet"), a text file (one name per line), or a list given directly.

    Args:
        spec: "imagenet", a path to a UTF-8 text file, or a sequence of names.

    Returns:
        The class names, in label order.
    """
    if not isinstance(spec, str):
        names = [str(s) for s in spec]
    elif spec in SHIPPED_CLASSNAMES:
        names = _read_lines(resources.files("qlip.eval") / SHIPPED_CLASSNAMES[spec])
    elif Path(spec).is_file():
        names = _read_lines(Path(spec))
    else:
        raise ValueError(
            f"class names {spec!r}: not a shipped list ({', '.join(SHIPPED_CLASSNAMES)}) and not a file; "
            "pass a text file with one class name per line, in label order"
        )
    if len(names) < 2:
        raise ValueError(f"zero-shot classification needs at least 2 class names, got {len(names)} from {spec!r}")
    return names


def load_templates(spec: str | Sequence[str]) -> list[str]:
    """Prompt templates from a shipped list ("openai"), a text file (one per line), or a list given directly.

    Every template must contain one ``{}`` where the class name goes (else :class:`TemplateError`).
    """
    if not isinstance(spec, str):
        templates = [str(t) for t in spec]
    elif spec in SHIPPED_TEMPLATES:
        templates = _read_lines(resources.files("qlip.eval") / SHIPPED_TEMPLATES[spec])
    elif Path(spec).is_file():
        templates = _read_lines(Path(spec))
    else:
        raise ValueError(
            f"templates {spec!r}: not a shipped list ({', '.join(SHIPPED_TEMPLATES)}) and not a file; "
            "pass a text file with one template per line, each containing {} for the class name"
        )
    if not templates:
        raise ValueError(f"no prompt templates in {spec!r}")
    for template in templates:
        check_template(template)
    return templates


def _model_device_dtype(model: torch.nn.Module, device: str | torch.device | None) -> tuple[torch.device, Any]:
    param = next(model.parameters())
    return (torch.device(device) if device is not None else param.device), param.dtype


@torch.no_grad()
def build_zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> Tensor:
    """The zero-shot classifier: per class, template embeddings normalized, averaged, re-normalized.

    Prompts of all classes and templates are embedded in batches of ``batch_size`` prompts, whatever the class
    boundaries, and summed per class with ``index_add_``, so memory stays at (C, D) for any number of templates.

    Args:
        model: anything with ``encode_text(ids, normalize=True)`` (a :class:`qlip.QLIP` with its text tower).
        tokenizer: list of strings -> LongTensor (B, L).
        classnames: C class names.
        templates: T templates with one ``{}`` each.
        batch_size: prompts per text-encoder call.
        device: where to run (defaults to the model's device).

    Returns:
        float32 (D, C) with L2-normalized columns; column c is class c.

    Raises:
        TemplateError: a template without exactly one ``{}`` (or with another field or a lone brace).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(classnames) == 0 or len(templates) == 0:
        raise ValueError(f"need class names and templates, got {len(classnames)} names and {len(templates)} templates")
    for template in templates:
        check_template(template)
    device, _ = _model_device_dtype(model, device)
    prompts = [(c, t.format(name)) for c, name in enumerate(classnames) for t in templates]
    sums: Tensor | None = None
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = tokenizer([text for _, text in chunk]).to(device)
        emb = model.encode_text(ids, normalize=True).float()  # (b, D), each row unit length
        if sums is None:
            sums = emb.new_zeros(len(classnames), emb.shape[-1])
        owner = torch.tensor([c for c, _ in chunk], device=emb.device)
        sums.index_add_(0, owner, emb)
    # The mean over templates has the same direction as the sum: normalizing the sum is the re-normalized mean.
    return F.normalize(sums, dim=-1).T.contiguous()  # (D, C)


@torch.no_grad()
def zero_shot_probabilities(
    model: torch.nn.Module,
    classifier: Tensor,
    images: Tensor,
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> Tensor:
    """Class probabilities of images under a zero-shot classifier: what ``qlip classify`` prints.

    The images go through the image tower ``batch_size`` at a time; each row is the softmax over classes of the
    model's learned logit scale times the cosine similarity (the CLIP probabilities).

    Args:
        model: anything with ``encode_image(images, normalize=True)`` and a ``logit_scale`` (log of the scale).
        classifier: (D, C) unit columns from :func:`build_zero_shot_classifier`.
        images: (N, 3, S, S) the model's eval transform of the images.
        batch_size: images per image-tower call.
        device: where to run (defaults to the model's device).

    Returns:
        float32 (N, C) on the CPU; every row sums to 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, dtype = _model_device_dtype(model, device)
    scale = model.logit_scale.exp().float()
    weights = classifier.float().to(device)
    probs = [
        (scale * model.encode_image(images[i : i + batch_size].to(device, dtype), normalize=True).float() @ weights)
        .softmax(dim=-1)
        .cpu()
        for i in range(0, images.shape[0], batch_size)
    ]  # each (b, C)
    return torch.cat(probs) if probs else torch.zeros(0, classifier.shape[-1])


def topk_correct(logits: Tensor, labels: Tensor, topk: Sequence[int]) -> dict[int, int]:
    """Number of samples whose label is among the k highest logits, for each k (k larger than C is skipped)."""
    num_classes = logits.shape[-1]
    ks = [k for k in topk if k <= num_classes]
    if not ks:
        return {}
    ranked = logits.topk(max(ks), dim=-1).indices  # (B, kmax)
    hit = ranked == labels.unsqueeze(-1)  # (B, kmax)
    return {k: int(hit[:, :k].any(dim=-1).sum()) for k in ks}


def accuracy_summary(
    logits: Tensor, labels: Tensor, *, topk: Sequence[int] = (1, 5), confusion: bool | None = None
) -> dict[str, Any]:
    """Top-k accuracy (fractions in [0, 1]) and an optional confusion matrix from logits (N, C) and labels (N,).

    Top-k entries are present only for k <= C (so no "top5" for a 4-class task); ``majority`` is the share of the
    most frequent label (what always answering that class scores). ``confusion`` defaults to
    C <= :data:`MAX_CONFUSION_CLASSES`; it is a C x C list of counts, rows = true class, columns = predicted.
    """
    n, num_classes = logits.shape
    if labels.shape != (n,):
        raise ValueError(
            f"labels must have shape ({n},) to match logits {tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for {num_classes} classes, got [{int(labels.min())}, "
            f"{int(labels.max())}]; are the class names those of this dataset, in label order?"
        )
    out: dict[str, Any] = {"n": int(n), "num_classes": int(num_classes)}
    for k, hits in topk_correct(logits, labels, topk).items():
        out[f"top{k}"] = hits / n if n else float("nan")
    # The accuracy of always answering the most frequent class: on unbalanced labels a better floor than 1/C.
    out["majority"] = int(torch.bincount(labels.cpu(), minlength=num_classes).max()) / n if n else float("nan")
    if confusion if confusion is not None else num_classes <= MAX_CONFUSION_CLASSES:
        pred = logits.argmax(dim=-1)
        matrix = torch.zeros(num_classes * num_classes, dtype=torch.int64)
        matrix.index_add_(0, (labels * num_classes + pred).cpu(), torch.ones(n, dtype=torch.int64))
        out["confusion"] = matrix.view(num_classes, num_classes).tolist()
    return out


def batch_labels(batch: Mapping[str, Any], label_key: str | None) -> Tensor:
    """The labels of a collated batch: ``batch["label"]``, or ``batch["labels"][label_key]`` for shapes tasks."""
    if label_key is None:
        return batch["label"]
    if "labels" not in batch or label_key not in batch["labels"]:
        raise KeyError(
            f"the batch has no labels for task {label_key!r} (found {sorted(batch.get('labels', {}))}); "
            "use a dataset that carries per-task labels (shapes) or leave the task unset"
        )
    return batch["labels"][label_key]


@torch.no_grad()
def image_embeddings(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    label_keys: Sequence[str | None] = (None,),
    device: str | torch.device | None = None,
) -> tuple[Tensor, dict[str | None, Tensor]]:
    """Normalized image embeddings (N, D) of every batch, with the labels of each requested key (N,) each."""
    device, dtype = _model_device_dtype(model, device)
    embs: list[Tensor] = []
    labels: dict[str | None, list[Tensor]] = {k: [] for k in label_keys}
    for batch in batches:
        images = batch["image"]
        if images.shape[0] == 0:  # every sample of this batch was unreadable
            continue
        embs.append(model.encode_image(images.to(device, dtype), normalize=True).float().cpu())
        for k in label_keys:
            labels[k].append(batch_labels(batch, k).cpu())
    if not embs:
        raise ValueError("no images to evaluate: the data gave no readable samples")
    return torch.cat(embs), {k: torch.cat(v) for k, v in labels.items()}


def zero_shot_accuracy(
    model: torch.nn.Module,
    classifier: Tensor,
    batches: Iterable[Mapping[str, Any]],
    *,
    topk: Sequence[int] = (1,),
    device: str | torch.device | None = None,
    label_key: str | None = None,
    confusion: bool | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``classifier`` (from :func:`build_zero_shot_classifier`) over image batches.

    Args:
        model: anything with ``encode_image(images, normalize=True)``.
        classifier: (D, C) unit columns.
        batches: iterable of dicts with "image" (B, 3, S, S) and "label" (B,) (or ``labels[label_key]``).
        topk: which top-k accuracies to report (those with k > C are left out).
        device: where to run (defaults to the model's device).
        label_key: read ``batch["labels"][label_key]`` instead of ``batch["label"]`` (shapes tasks).
        confusion: include the confusion matrix (default: only for at most MAX_CONFUSION_CLASSES classes).

    Returns:
        ``{"top1": ..., "top5": ..., "n": ..., "num_classes": ..., "confusion": optional C x C counts}``.
    """
    emb, labels = image_embeddings(model, batches, label_keys=(label_key,), device=device)
    logits = emb @ classifier.float().cpu()  # (N, C) cosine similarities
    return accuracy_summary(logits, labels[label_key], topk=topk, confusion=confusion)


def evaluate_zero_shot_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    batches: Iterable[Mapping[str, Any]],
    tasks: Mapping[str, ClassificationTask],
    *,
    topk: Sequence[int] = (1, 5),
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict[str, dict[str, Any]]:
    """Several zero-shot tasks over one pass of the images (the image tower runs once).

    Args:
        model: a QLIP model with vision and text towers.
        tokenizer: list of strings -> LongTensor.
        batches: collated batches (see :func:`zero_shot_accuracy`).
        tasks: name -> task with ``classnames``, ``templates`` and ``label_key`` (None = ``batch["label"]``),
            e.g. :class:`qlip.data.ClassificationTask` (what ``shapes_tasks`` gives).
        topk: top-k accuracies to report.
        batch_size: prompts per text-encoder call.
        device: where to run.

    Returns:
        name -> accuracy summary (see :func:`accuracy_summary`), plus "classnames" and "num_templates".
    """
    keys = tuple(dict.fromkeys(getattr(t, "label_key", None) for t in tasks.values()))
    emb, labels = image_embeddings(model, batches, label_keys=keys, device=device)
    results: dict[str, dict[str, Any]] = {}
    for name, task in tasks.items():
        classifier = build_zero_shot_classifier(
            model, tokenizer, list(task.classnames), list(task.templates), batch_size=batch_size, device=device
        )
        summary = accuracy_summary(emb @ classifier.float().cpu(), labels[getattr(task, "label_key", None)], topk=topk)
        summary["classnames"] = list(task.classnames)
        summary["num_templates"] = len(task.templates)
        results[name] = summary
        logger.info("zero-shot %s: top-1 %.4f over %d images", name, summary.get("top1", float("nan")), summary["n"])
    return results
