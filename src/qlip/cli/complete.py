"""``qlip complete --model DIR "Once upon a time"``: text continuation with a language or unified model."""

from __future__ import annotations

import argparse

from .common import CLIError, finite_float, positive_int, resolve_device


def cmd_complete(args: argparse.Namespace) -> int:
    from ..unified import load

    if args.image is not None:
        raise CLIError("qlip complete is text-only and takes no --image; to describe an image use "
                       "`qlip chat --model DIR --image IMAGE \"Describe the image.\"`")  # fmt: skip
    if not args.prompt.strip():
        raise CLIError("the prompt is empty; give the text to continue, e.g. \"Once upon a time\"")
    try:
        um = load(args.model, device=resolve_device(args.device))
        text = um.complete(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:  # the model's input and directory errors are one-line ValueErrors
        raise CLIError(str(e)) from e
    print(f"{args.prompt.strip()} {text}".rstrip())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("complete", help="continue a text with a language model or a unified model")
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--model", required=True, help="run_dir/last of a task: lm or task: unified run")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="at most this many new tokens (64)")
    p.add_argument("--temperature", type=finite_float, default=1.0, help="sampling temperature (default 1; 0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=finite_float, default=0.95, help="nucleus sampling mass in (0, 1] (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", default=None, help=argparse.SUPPRESS)  # refused with a pointer to qlip chat
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=cmd_complete)
