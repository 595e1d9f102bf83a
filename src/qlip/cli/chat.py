"""``qlip chat --model DIR --image IMG "question"``: ask a vision-language model about one image, or have a unified
model (UM3) describe it."""

from __future__ import annotations

import argparse
import logging

from .common import CLIError, finite_float, positive_int, resolve_device

log = logging.getLogger(__name__)


def cmd_chat(args: argparse.Namespace) -> int:
    from ..understanding import UnderstandingError, load

    question = " ".join(args.question).strip()
    if not question:
        raise CLIError('the question is empty; ask something about the image, e.g. "What color is the shape?"')
    if not args.image:
        raise CLIError("no image given; pass --image FILE (the model answers questions about an image)")
    device = resolve_device(args.device)
    from ..unified.pipeline import is_unified_directory

    if is_unified_directory(args.model):
        print(_unified_caption(args, question, device))
        return 0
    try:
        vlm = load(args.model, device=device)
        answer = vlm.chat(args.image, question, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed)  # fmt: skip
    except (UnderstandingError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    print(answer)
    return 0


def _unified_caption(args: argparse.Namespace, question: str, device: str) -> str:
    """A unified model's image-to-text is captioning (it learnt image -> caption only): every question gets the
    image's description, and a note says so when the question asks something else."""
    from ..transforms import ImageLoadError, load_image
    from ..unified import load as load_unified

    try:
        um = load_unified(args.model, device=device)
        if not um.is_unified:
            raise CLIError(f"{args.model} is a text-only language model; it cannot see images. Use "
                           "`qlip complete` with it, or give a unified (task: unified) or VLM directory")  # fmt: skip
        image = load_image(args.image)
        if question.rstrip(".?! ").lower() not in _DESCRIBE:
            log.warning("a unified model answers with the image's caption (it was trained on image -> caption, not "
                        "on questions); the question %r is not read", question)  # fmt: skip
        return um.caption(image, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed)  # fmt: skip
    except (ImageLoadError, ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e


_DESCRIBE = {"describe the image", "describe the image briefly", "describe this image", "caption the image",
             "what does the image show", "give a short caption of the image"}  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="ask a vision-language model a question about an image")
    p.add_argument("question", nargs="+", help='the question, e.g. "Where is the shape?"')
    p.add_argument("--model", required=True, help="a VLM directory (run_dir/last of a `task: vlm` run) or a unified "
                   "model's (`task: unified`; it describes the image)")
    p.add_argument("--image", default=None, help="the image file the question is about")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="longest answer in tokens (default 32)")
    p.add_argument("--temperature", type=finite_float, default=0.0, help="0 (default): greedy; > 0 samples")
    p.add_argument("--top-p", type=finite_float, default=1.0, help="nucleus mass in (0, 1] when sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=cmd_chat)
