"""``qlip tokenizer train CAPTIONS --vocab-size N --out DIR``: a small CLIP-style BPE for your own captions."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CLIError, positive_int


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from ..tokenizer import train_bpe

    path = Path(args.captions)
    if not path.is_file():
        raise CLIError(f"{path}: no such captions file (one caption per line)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"{path} is not a UTF-8 text file ({e.reason} at byte {e.start}); give one caption per "
                       "line") from e  # fmt: skip
    if "\x00" in text:
        raise CLIError(f"{path} is binary, not a text file; give one caption per line")
    captions = [c for c in (line.strip() for line in text.splitlines()) if c]
    if not captions:
        raise CLIError(f"{path} holds no captions")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; name a folder for vocab.json and merges.txt")
    try:
        tok = train_bpe(captions, args.vocab_size)
    except ValueError as e:
        raise CLIError(str(e)) from e
    tok.save_pretrained(out)
    print(f"trained a {tok.vocab_size}-token vocabulary on {len(captions)} captions -> {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="text tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="SUBCOMMAND")
    t = tsub.add_parser("train", help="train a small CLIP-style BPE vocabulary from a captions file")
    t.add_argument("captions", help="text file, one caption per line")
    t.add_argument("--vocab-size", type=positive_int, required=True)
    t.add_argument("--out", required=True, help="directory for vocab.json + merges.txt")
    t.set_defaults(func=cmd_tokenizer_train)
