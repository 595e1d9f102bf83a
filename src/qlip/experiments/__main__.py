"""``python -m qlip.experiments balance-sweep ...``: the same as ``qlip experiment ...``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .cli import add_experiment_commands


def main(argv: Sequence[str] | None = None) -> int:
    from ..cli import CLIError

    parser = argparse.ArgumentParser(prog="python -m qlip.experiments", description="qlip experiment ...")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_experiment_commands(sub)
    argv = ["experiment", *(sys.argv[1:] if argv is None else argv)]
    verbose = "-v" in argv or "--verbose" in argv
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        return args.func(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
