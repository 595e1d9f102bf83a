"""``qlip experiment balance-sweep | balance-modes | recipes | vlm-layers | report``: the paper's findings at laptop
scale.

Each experiment command runs its variants (resuming: finished (variant, seed) jobs are skipped), then writes
``OUT/table.json``, ``OUT/table.md`` and PNG plots. ``report`` gathers the experiments' outputs into
``docs/results.md`` (with the paper's numbers next to ours) and copies the small tables and plots beside it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from .common import CLIError, non_negative_int, positive_int

log = logging.getLogger(__name__)

DEFAULT_SEEDS = {"balance-sweep": "0,1,2", "balance-modes": "0", "recipes": "0"}


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ValueError(f"--seeds must be comma-separated integers such as 0,1,2, got {text!r}") from e
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs at least one seed and no repeats, got {text!r}")
    return seeds


def _settings(args: argparse.Namespace) -> Any:
    from ..experiments.runner import Settings

    ev = {k: v for k, v in (("num_eval", args.eval_images), ("num_probe_train", args.probe_images)) if v}
    return Settings(config=args.config, out=args.out, seeds=_seeds(args.seeds), budget=args.budget, smoke=args.smoke,
                    isolate=not args.in_process, eval=ev, threads=args.threads)  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    from ..train.config import ConfigError

    try:
        settings = _settings(args)
        if args.experiment == "balance-sweep":
            from ..experiments.balance_sweep import run_balance_sweep

            table = run_balance_sweep(settings)
        elif args.experiment == "balance-modes":
            from ..experiments.balance_modes import run_balance_modes

            table = run_balance_modes(settings)
        else:
            from ..experiments.recipes import run_recipes

            table = run_recipes(settings, args.stage2_config)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        raise CLIError(str(e)) from e
    print((settings.out / "table.md").read_text())
    print(f"wrote {settings.out / 'table.json'}, {settings.out / 'table.md'} and {len(table.get('figures', {}))} "
          "plot(s)")  # fmt: skip
    return 0


def _run_vlm_layers(args: argparse.Namespace) -> int:
    from ..experiments.runner import Settings
    from ..experiments.vlm_layers import DEFAULT_VQA_EVAL, run_vlm_layers
    from ..train.config import ConfigError

    if args.other_tokenizer and not (Path(args.other_tokenizer) / "config.json").is_file():
        raise CLIError(f"--other-tokenizer {args.other_tokenizer}: no QLIP model directory there")
    ev = {**DEFAULT_VQA_EVAL, **({"num_eval": args.eval_images} if args.eval_images else {})}
    try:
        settings = Settings(config=args.config, out=args.out, seeds=_seeds(args.seeds), budget=args.budget,
                            isolate=not args.in_process, eval=ev, threads=args.threads)  # fmt: skip
        run_vlm_layers(settings, args.other_tokenizer)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        raise CLIError(str(e)) from e
    print((settings.out / "table.md").read_text())
    print(f"wrote {settings.out / 'table.json'} and {settings.out / 'table.md'}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from ..experiments.report import write_results_page

    try:
        page = write_results_page(args.results, args.doc, assets=args.assets, commands=args.command_line)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    print(f"wrote {page}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``experiment`` with its sub-commands to the ``qlip`` command line."""
    p = subparsers.add_parser("experiment", help="reproduce the paper's findings at laptop scale (tables + plots)",
                              description="Balance sweep (Table 3a), balancing modes, recipes (Table 3c) on shapes; "
                                          "each writes OUT/table.json, OUT/table.md and plots. Rerun to continue: "
                                          "finished variants are skipped.")  # fmt: skip
    sub = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    helps = {
        "balance-sweep": "a_a : a_r from 1:0 to 0:1: zero-shot, linear probe, PSNR/SSIM, code usage",
        "balance-modes": "fixed / posthoc / inverse-loss / grad-norm: quality, time and memory overhead",
        "recipes": "two stages / quantizer afterwards / one stage: quality, time, memory",
    }
    for name, text in helps.items():
        e = sub.add_parser(name, help=text, description=text)
        e.add_argument("--config", required=True, help="stage-1 YAML config on shapes (e.g. configs/shapes-tiny.yaml)")
        e.add_argument("--out", required=True, help="output directory (run dirs, table.json, table.md, plots)")
        e.add_argument("--seeds", default=DEFAULT_SEEDS[name],
                       help=f"comma-separated seeds (default {DEFAULT_SEEDS[name]})"
                            + ("; the default ratio and the extremes use all, the others the first"
                               if name == "balance-sweep" else ""))  # fmt: skip
        e.add_argument("--budget", type=float, default=0.3,
                       help="fraction of the config's optim.steps per stage-1 run (default 0.3)")  # fmt: skip
        e.add_argument("--smoke", action="store_true", help="3 steps of qlip-tiny at 32 px (a check that it runs)")
        e.add_argument("--in-process", action="store_true",
                       help="run the jobs in this process (faster start; peak memory is then not per variant)")
        e.add_argument("--threads", type=non_negative_int, default=0,
                       help="torch threads per job (default: the config's)")
        e.add_argument("--eval-images", type=positive_int, default=None,
                       help="held-out images per evaluation (default 500)")
        e.add_argument("--probe-images", type=positive_int, default=None,
                       help="training images for the linear probe (default 1000)")
        if name == "recipes":
            e.add_argument("--stage2-config", default=None,
                           help="stage-2 YAML (default: <config>-stage2.yaml beside --config, else derived)")
        e.set_defaults(func=_run)
    text = "VLM features: layer -2 / layer -1 / quantized codes (/ another tokenizer): VQA accuracy (paper Table 6)"
    v = sub.add_parser("vlm-layers", help=text,
                       description=text + ". Rerun to continue: finished variants are skipped.")  # fmt: skip
    v.add_argument("--config", required=True, help="a `task: vlm` YAML config (e.g. configs/vlm-shapes.yaml)")
    v.add_argument("--out", required=True, help="output directory (run dirs, table.json, table.md)")
    v.add_argument("--other-tokenizer", default=None,
                   help="a second QLIP model directory whose layer -2 is a variant (e.g. a reconstruction-only one)")
    v.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    v.add_argument("--budget", type=float, default=0.3, help="fraction of the config's optim.steps per run (0.3)")
    v.add_argument("--in-process", action="store_true", help="run the jobs in this process")
    v.add_argument("--threads", type=non_negative_int, default=0, help="torch threads per job (default: the config's)")
    v.add_argument("--eval-images", type=positive_int, default=None, help="held-out images (default 200)")
    v.set_defaults(func=_run_vlm_layers)
    r = sub.add_parser("report", help="write docs/results.md from the experiments' outputs",
                       description="Gathers RESULTS/{balance,modes,recipes}/table.json into a results page with "
                                   "the paper's numbers and copies the tables and plots to --assets.")  # fmt: skip
    r.add_argument("--results", default="results", help="directory holding balance/, modes/, recipes/")
    r.add_argument("--doc", default="docs/results.md", help="the page to write")
    r.add_argument("--assets", default="docs/results", help="where the page's PNG and JSON files go")
    r.add_argument("--command-line", dest="command_line", action="append", default=None,
                   help="the command(s) that produced the results, shown at the top (repeatable)")
    r.set_defaults(func=_run_report, experiment="report")
