"""Console output of long commands: progress bars and the one logging setup.

One rule for every command that runs for minutes (evaluation stages, writing or checking shards, encoding,
tokenizing): the bar goes to stderr so that piped or redirected output stays clean, and it is left out when stderr
is not a terminal (a log file would fill with carriage-return updates) or when the caller asks for quiet. Log
records go to stderr at WARNING (INFO when verbose), with the time and the logger's name.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO


def setup_logging(verbose: bool = False) -> None:
    """The logging setup of every qlip entry point (the command line and the experiments' job processes)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")  # fmt: skip


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and closed streams)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a stand-in stream, or one already closed
        return False


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
                 enabled: bool = True, stream: TextIO | None = None) -> Any:  # fmt: skip
    """A tqdm bar on ``stream`` (stderr), disabled unless ``enabled`` and the stream is a terminal.

    Args:
        iterable: what to iterate (or None, and call ``update(n)`` on the bar).
        desc: what is running, shown before the bar.
        total: how many items there will be, when known (gives a rate and a time left).
        unit: what one item is ("img", "sample", ...).
        enabled: False for a quiet run.
        stream: where the bar goes; defaults to stderr.
    """
    from tqdm import tqdm

    stream = stream if stream is not None else sys.stderr
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
                disable=not (enabled and is_terminal(stream)))  # fmt: skip
