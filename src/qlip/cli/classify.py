"""``qlip classify IMAGES --model M --labels "a dog,a cat"``: zero-shot classification against typed labels."""

from __future__ import annotations

import argparse

import torch

from .common import (
    EXIT_BAD_DATA,
    CLIError,
    add_model_options,
    autocast,
    expand_images,
    load_batches,
    load_model,
    positive_int,
    report_bad,
    resolve_device,
)


def _text_tokenizer(args: argparse.Namespace):
    from ..factory import get_tokenizer

    try:
        return get_tokenizer(args.model, vocabulary=args.tokenizer)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise CLIError(f"no text tokenizer for {args.model!r}: {e}; or pass --tokenizer DIR "
                       "(from qlip tokenizer train)") from e


def cmd_classify(args: argparse.Namespace) -> int:
    from ..transforms import image_transform

    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if len(labels) < 2:
        raise CLIError(f"--labels needs at least two comma-separated labels, got {args.labels!r}")
    from ..eval.zero_shot import TemplateError, build_zero_shot_classifier, check_template, zero_shot_probabilities

    templates = args.template or ["{}"]
    for t in templates:
        try:
            check_template(t)
        except TemplateError as e:
            raise CLIError(f"--template: {e}") from e
    files = [f for f, _ in expand_images(args.images)]
    device = resolve_device(args.device)
    model = load_model(args.model, device, parts=("vision", "text"))
    tokenizer = _text_tokenizer(args)
    transform = image_transform(model.image_size, train=False)
    bad = []
    with torch.inference_mode(), autocast(device):
        classifier = build_zero_shot_classifier(model, tokenizer, labels, templates, batch_size=args.batch_size,
                                                device=device)  # fmt: skip
        for good, batch, errors in load_batches(files, transform, args.batch_size, not args.quiet):
            bad.extend(errors)
            if batch is None:
                continue
            probs = zero_shot_probabilities(model, classifier, batch, batch_size=args.batch_size, device=device).cpu()
            for i, p in zip(good, probs):
                top = p.argsort(descending=True)[: args.top]
                shown = ", ".join(f"{labels[j]} {p[j]:.1%}" for j in top)
                print(f"{files[i]}\t{shown}")
    report_bad(bad)
    return EXIT_BAD_DATA if bad else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="zero-shot classification of images against text labels")
    p.add_argument("images", nargs="+")
    p.add_argument("--labels", required=True, help='comma-separated labels, e.g. "a dog,a cat"')
    p.add_argument("--template", action="append", help='prompt template with {} (repeatable), e.g. "a photo of {}."')
    p.add_argument("--top", type=positive_int, default=3, help="labels shown per image (default 3)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="vocab.json + merges.txt to use instead of the model's (e.g. from qlip tokenizer train)")
    add_model_options(p)
    p.set_defaults(func=cmd_classify)
