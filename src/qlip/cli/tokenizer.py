"""``qlip tokenizer train CAPTIONS --vocab-size N --out DIR``: a small CLIP-style BPE for your own captions.

CAPTIONS is a text file with one caption per line, or any source the trainer reads captions from: a .csv/.tsv/.jsonl
caption list, tar shards, or a class folder with ``--caption-template``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CLIError, positive_int


def _text_file_captions(path: Path) -> list[str]:
    if not path.is_file():
        raise CLIError(f"{path}: no such captions file (one caption per line), caption list, shard folder or class "
                       "folder")  # fmt: skip
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"{path} is not a UTF-8 text file ({e.reason} at byte {e.start}); give one caption per "
                       "line") from e  # fmt: skip
    if "\x00" in text:
        raise CLIError(f"{path} is binary, not a text file; give one caption per line")
    return [c for c in (line.strip() for line in text.splitlines()) if c]


def _captions(args: argparse.Namespace) -> list[str]:
    """The captions of ``args.captions``: a data source's (:func:`qlip.data.loader.read_captions`) or a text file's."""
    from ..data.captions import CAPTION_FILE_SUFFIXES
    from ..data.loader import read_captions

    spec = args.captions
    path = Path(spec)
    if path.is_dir() or spec.lower().endswith((*CAPTION_FILE_SUFFIXES, ".tar")) or "{" in spec:
        try:
            return read_captions(spec, image_key=args.image_key, caption_key=args.caption_key,
                                 caption_template=args.caption_template)  # fmt: skip
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(str(e)) from e
    return _text_file_captions(path)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from ..tokenizer import train_bpe

    captions = _captions(args)
    if not captions:
        raise CLIError(f"{args.captions} holds no captions")
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
    t = tsub.add_parser("train", help="train a small CLIP-style BPE vocabulary from captions")
    t.add_argument("captions", help="a text file (one caption per line), a .csv/.tsv/.jsonl caption list, tar shards, "
                   "or a class folder with --caption-template")  # fmt: skip
    t.add_argument("--vocab-size", type=positive_int, required=True)
    t.add_argument("--out", required=True, help="directory for vocab.json + merges.txt")
    t.add_argument("--image-key", default=None, help="caption lists: the image path column")
    t.add_argument("--caption-key", default=None, help="caption lists: the caption column")
    t.add_argument("--caption-template", default=None, help='class folders: caption such as "a photo of a {}."')
    t.set_defaults(func=cmd_tokenizer_train)
