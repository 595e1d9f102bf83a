"""``qlip train CONFIG [a.b=c ...]`` and ``qlip balance CONFIG``; under torchrun: ``torchrun ... -m qlip.cli train``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..data.sample import BadDataError
from ..train.config import ConfigError, TrainConfig, load_config, split_cli_args
from .common import EXIT_BAD_DATA, CLIError

log = logging.getLogger(__name__)

_ARGS_HELP = "a YAML config, optional YAML fragments (later ones win), then key.subkey=value overrides"


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    files, overrides = split_cli_args([args.config, *args.overrides])
    return load_config(files, overrides)


def _run_train(args: argparse.Namespace) -> int:
    from ..checkpoints import ModelDirectoryError
    from ..train.checkpoint import CheckpointLoadError
    from ..train.loop import NonFiniteLossError, train

    try:
        cfg = _config_from_args(args)
    except (ConfigError, ValueError) as e:
        raise CLIError(str(e)) from e
    if cfg.distributed.starts_workers:  # the workers run this same command
        from ..train.distributed import launch_local

        return launch_local(cfg.distributed.processes, ["train", args.config, *args.overrides])
    try:
        result = train(cfg)
    except (ConfigError, FileNotFoundError, NonFiniteLossError, CheckpointLoadError, ModelDirectoryError) as e:
        raise CLIError(str(e)) from e
    except BadDataError as e:  # the data, not the command: the checkpoints written so far stay
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_DATA
    if int(os.environ.get("RANK", "0")) == 0:
        status = "interrupted" if result.interrupted else "done"
        print(f"{status} at step {result.step}: {result.run_dir}")
        for k, v in result.eval.items():
            print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
        if result.export_dir:
            print(f"model: {result.export_dir}")
    return result.exit_code


def _run_balance(args: argparse.Namespace) -> int:
    from ..train.probe import run_balance_probes

    try:
        cfg = _config_from_args(args).as_one_process()  # short probes, one process
        result = run_balance_probes(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    except BadDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_DATA
    print(f"converged losses: {result.converged}")
    print(f"posthoc weights: {result.weights}")
    print(f"fragment: {result.fragment}  (use: qlip train {args.config} {result.fragment})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``balance`` to the ``qlip`` command line."""
    p = subparsers.add_parser(
        "train",
        help="train QLIP (stage 1 or 2) from a YAML config",
        description="Train QLIP. Example: qlip train configs/shapes-tiny.yaml optim.lr=1e-3",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help=_ARGS_HELP)
    p.set_defaults(func=_run_train)
    b = subparsers.add_parser("balance", help="measure converged single-objective losses -> posthoc loss weights",
                              description="Short align-only and recon-only runs (probe.steps each); writes "
                                          "run_dir/balance.yaml with loss.balance.mode=posthoc and the converged "
                                          "losses.")  # fmt: skip
    b.add_argument("config", help="YAML config file")
    b.add_argument("overrides", nargs="*", help=_ARGS_HELP)
    b.set_defaults(func=_run_balance)
