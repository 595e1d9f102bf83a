"""The ``qlip`` command line. It sits on top of the library: no library module imports it.

    qlip models | encode | decode | reconstruct | classify      (codec.py, classify.py)
    qlip tokenizer train CAPTIONS --vocab-size N --out DIR      (tokenizer.py)
    qlip data {write-shards,check,preview} ...                  (data.py)
    qlip train CONFIG [a.b=c ...]  |  qlip balance CONFIG       (train.py)
    qlip eval {zero-shot,linear-probe,recon,all} ...            (eval.py)
    qlip tokenize --model M --data SRC --out DIR                (tokenize.py)
    qlip generate PROMPT... --model GEN --out DIR              (generate.py)
    qlip chat QUESTION --model VLM --image IMG                 (chat.py)
    qlip complete PROMPT --model LM                            (complete.py)
    qlip experiment {balance-sweep,balance-modes,recipes,report} (experiment.py)
    qlip demo --model M [--generator G] [--vlm V]               (demo.py)
    qlip hub {push,card} DIR [--repo USER/NAME]                 (hub.py)
    qlip export MODEL --format F --out DIR | export check DIR   (export.py)

Each module of this package is one command group with a ``register(subparsers)`` function; a new group is one
new module named in :data:`COMMAND_GROUPS`. The conventions (exit codes, errors) are in :mod:`qlip.cli.common`.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence

from ..progress import setup_logging
from .common import EXIT_BAD_DATA, EXIT_USER_ERROR, CLIError

COMMAND_GROUPS = ("codec", "classify", "tokenizer", "data", "train", "eval", "tokenize", "generate", "chat",
                  "complete", "experiment", "export", "demo", "hub")

EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class _Parser(argparse.ArgumentParser):
    """argparse with the package's exit code for usage errors (2) and a hint to --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qlip", description="QLIP visual tokenizer: encode, decode, train, evaluate")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_GROUPS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


class _Terminated(BaseException):
    """SIGTERM outside a training loop (which handles it itself): stop and exit 143."""


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001
    raise _Terminated()


def _library_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """The library's exception types that mean "the user must change something" (exit 2) and "bad data" (exit 1).

    Only qlip's own types: any other exception is a bug and keeps its traceback.
    """
    from ..checkpoints import ModelDirectoryError
    from ..data.sample import BadDataError
    from ..eval.zero_shot import TemplateError
    from ..hf.errors import HFModelError
    from ..tokenfile import TokenFileError
    from ..train.checkpoint import CheckpointLoadError
    from ..train.config import ConfigError
    from ..understanding.errors import UnderstandingError
    from ..weights import WeightFileError, WeightsMismatchError

    user_errors = (ConfigError, TokenFileError, WeightsMismatchError, WeightFileError, CheckpointLoadError,
                   ModelDirectoryError, TemplateError, UnderstandingError, HFModelError)  # fmt: skip
    return user_errors, (BadDataError,)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = True
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a test runner's thread)
        in_main_thread = False
    user_errors, bad_data = _library_errors()
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except user_errors as e:  # a safety net: qlip's own user-facing errors that a command did not turn into CLIError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except bad_data as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_DATA
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except _Terminated:
        print("terminated", file=sys.stderr)
        return EXIT_SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


__all__ = ["CLIError", "COMMAND_GROUPS", "build_parser", "main"]
