"""``qlip experiment balance-sweep | balance-modes | recipes | t2i-codecs | t2i-tokenizers | um3-schedule |
um3-specialists | vlm-layers | report``: the paper's findings at laptop scale.

Each experiment command runs its variants (resuming: finished (variant, seed) jobs are skipped), then writes
``OUT/table.json``, ``OUT/table.md`` and PNG plots. ``report`` gathers the experiments' outputs into
``docs/results.md`` (with the paper's numbers next to ours) and copies the small tables and plots beside it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from .common import CLIError, finite_float, non_negative_float, non_negative_int, positive_int

log = logging.getLogger(__name__)

DEFAULT_SEEDS = {"balance-sweep": "0,1,2", "balance-modes": "0", "recipes": "0", "t2i-codecs": "0",
                 "t2i-tokenizers": "0", "um3-schedule": "0", "um3-specialists": "0"}
T2I_EVAL_CAPTIONS = 200  # held-out captions per generator (as qlip eval generation)


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
    t2i: dict[str, Any] = {}
    if args.experiment.startswith("t2i-"):
        ev.setdefault("num_eval", T2I_EVAL_CAPTIONS)
        t2i = {"fixed_steps": args.steps or 0, "eval_options": {"judge": args.judge, "data": args.eval_data,
                                                               "split": args.split, "cfg_scale": args.cfg,
                                                               "temperature": args.temperature,
                                                               "batch_size": 32}}  # fmt: skip
    return Settings(config=args.config, out=args.out, seeds=_seeds(args.seeds), budget=args.budget, smoke=args.smoke,
                    isolate=not args.in_process, eval=ev, threads=args.threads, **t2i)  # fmt: skip


def _print_table(out: Path, table: dict[str, Any] | None = None) -> int:
    """Print an experiment's table.md and where its outputs are (with the plot count for experiments that plot)."""
    print((out / "table.md").read_text())
    if table is None:
        print(f"wrote {out / 'table.json'} and {out / 'table.md'}")
    else:
        print(f"wrote {out / 'table.json'}, {out / 'table.md'} and {len(table.get('figures', {}))} plot(s)")
    return 0


def _run(args: argparse.Namespace) -> int:
    from ..train.config import ConfigError

    try:
        settings = _settings(args)
        if args.experiment == "balance-sweep":
            from ..experiments.balance_sweep import run_balance_sweep

            table = run_balance_sweep(settings)
        elif args.experiment == "t2i-codecs":
            from ..experiments.t2i import run_t2i_codecs

            table = run_t2i_codecs(settings, overrides=args.set)
        elif args.experiment == "t2i-tokenizers":
            from ..experiments.t2i import parse_tokenizers, run_t2i_tokenizers

            table = run_t2i_tokenizers(settings, parse_tokenizers(args.tokenizers), data=args.data,
                                       count=args.count, tokenize_batch=args.tokenize_batch_size,
                                       overrides=args.set)  # fmt: skip
        elif args.experiment == "balance-modes":
            from ..experiments.balance_modes import run_balance_modes

            table = run_balance_modes(settings)
        else:
            from ..experiments.recipes import run_recipes

            table = run_recipes(settings, args.stage2_config)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        raise CLIError(str(e)) from e
    return _print_table(settings.out, table)


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
    return _print_table(settings.out)


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
                              description="Balance sweep (Table 3a), balancing modes, recipes (Table 3c) on shapes, "
                                          "the text-to-image and unified-model comparisons; each writes "
                                          "OUT/table.json, OUT/table.md (and plots). Rerun to continue: finished "
                                          "variants are skipped.")  # fmt: skip
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
    _register_t2i(sub)
    _register_unified(sub)
    r = sub.add_parser("report", help="write docs/results.md from the experiments' outputs",
                       description="Gathers RESULTS/{balance,modes,recipes}/table.json into a results page with "
                                   "the paper's numbers and copies the tables and plots to --assets.")  # fmt: skip
    r.add_argument("--results", default="results", help="directory holding balance/, modes/, recipes/")
    r.add_argument("--doc", default="docs/results.md", help="the page to write")
    r.add_argument("--assets", default="docs/results", help="where the page's PNG and JSON files go")
    r.add_argument("--command-line", dest="command_line", action="append", default=None,
                   help="the command(s) that produced the results, shown at the top (repeatable)")
    r.set_defaults(func=_run_report, experiment="report")


def _register_t2i(sub: argparse._SubParsersAction) -> None:
    from ..experiments.t2i import DEMO_TRAIN_DATA

    helps = {
        "t2i-codecs": "text-to-image: the subtoken / depth / bits codecs at equal steps and batch (ShapesEval)",
        "t2i-tokenizers": "text-to-image: one generator over the tokens of several tokenizers (e.g. aligned vs "
                          "reconstruction-only), equal budget (ShapesEval)",
    }  # fmt: skip
    for name, text in helps.items():
        e = sub.add_parser(name, help=text, description=text + ". Writes OUT/table.json and OUT/table.md.")
        e.add_argument("--config", required=True, help="a generator YAML config (e.g. configs/t2i-shapes.yaml)")
        _add_sampling_run_args(e, name, "held-out captions per generator")
        e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="an override for every run (repeatable), e.g. generator.width=64")
        e.set_defaults(func=_run, probe_images=None)
        if name == "t2i-tokenizers":
            e.add_argument("--tokenizers", nargs="+", required=True, metavar="NAME=MODEL_DIR[,TOKENS]",
                           help="the tokenizers to compare: a QLIP model directory each (its data is tokenized "
                                "into OUT/tokens/NAME), or with its `qlip tokenize` folder after a comma")
            e.add_argument("--data", default=DEMO_TRAIN_DATA,
                           help=f"what to tokenize (default {DEMO_TRAIN_DATA!r}, the demo's training shapes)")
            e.add_argument("--count", type=positive_int, default=30000, help="samples to tokenize (default 30000)")
            e.add_argument("--tokenize-batch-size", type=positive_int, default=64)


def _add_sampling_run_args(e: argparse.ArgumentParser, name: str, what: str) -> None:
    """The options of the experiments whose models sample (text-to-image, unified): output, budget, evaluation."""
    from ..eval.generation import DEMO_HELD_OUT

    e.add_argument("--out", required=True, help="output directory (run dirs, table.json, table.md)")
    e.add_argument("--steps", type=positive_int, default=None,
                   help="optimizer steps of every run (default: --budget x the config's optim.steps)")
    e.add_argument("--budget", type=float, default=1.0,
                   help="fraction of the config's optim.steps per run when --steps is not given (default 1)")
    e.add_argument("--seeds", default=DEFAULT_SEEDS[name], help=f"comma-separated seeds (default "
                   f"{DEFAULT_SEEDS[name]})")  # fmt: skip
    e.add_argument("--judge", default="docs/results/judge", help="ShapesEval judge (default docs/results/judge)"
                   + ("; none: no text->image evaluation" if name.startswith("um3-") else ""))  # fmt: skip
    e.add_argument("--eval-data", default=DEMO_HELD_OUT,
                   help="shapes spec of the held-out images and captions (default: the demo's held-out "
                        "compositions)")  # fmt: skip
    e.add_argument("--split", default="test", choices=("val", "test"), help="split of those images (test)")
    e.add_argument("--cfg", type=finite_float, default=3.0, help="guidance scale of text->image (default 3)")
    e.add_argument("--temperature", type=non_negative_float, default=1.0,
                   help="sampling temperature of the evaluations (default 1; 0: greedy)")
    smoke_eval = "; 16 with --smoke" if name.startswith("um3-") else ""
    e.add_argument("--eval-images", type=positive_int, default=None,
                   help=f"{what} (default {T2I_EVAL_CAPTIONS}{smoke_eval})")
    e.add_argument("--smoke", action="store_true", help="3 steps per run (a check that it runs)")
    e.add_argument("--in-process", action="store_true",
                   help="run the jobs in this process (faster start; peak memory is then not per variant)")
    e.add_argument("--threads", type=non_negative_int, default=0, help="torch threads per job (default: the config's)")


def _register_unified(sub: argparse._SubParsersAction) -> None:
    helps = {
        "um3-schedule": "unified model: the calm-down schedule on vs off at equal steps and batch (text perplexity, "
                        "captions, ShapesEval)",
        "um3-specialists": "unified model beside a text-only LM, a captioner and a text-to-image generator trained "
                           "at the same steps and batch",
    }  # fmt: skip
    for name, text in helps.items():
        e = sub.add_parser(name, help=text, description=text + ". Writes OUT/table.json and OUT/table.md; rerun to "
                                                              "continue (finished runs are skipped).")  # fmt: skip
        flag = "--config" if name == "um3-schedule" else "--unified-config"
        e.add_argument(flag, dest="config", required=True, metavar="CONFIG",
                       help="a `task: unified` YAML config (e.g. configs/um3-shapes.yaml)")
        if name == "um3-specialists":
            e.add_argument("--t2i-config", required=True,
                           help="a `task: generator` YAML config (e.g. configs/t2i-shapes.yaml), trained over the "
                                "unified config's tokens")  # fmt: skip
        _add_sampling_run_args(e, name, "held-out images captioned and captions generated per model")
        e.set_defaults(func=_run_unified)


def _run_unified(args: argparse.Namespace) -> int:
    from ..experiments.runner import SMOKE_EVAL, Settings
    from ..train.config import ConfigError

    judge = None if args.judge == "none" else args.judge
    if judge is not None and not Path(judge).is_dir():
        raise CLIError(f"--judge {judge}: no judge directory there; train one (qlip eval train-judge) or pass "
                       "--judge none to leave text->image out")  # fmt: skip
    num_eval = args.eval_images or (SMOKE_EVAL["num_eval"] if args.smoke else T2I_EVAL_CAPTIONS)
    options = {"judge": judge, "data": args.eval_data, "split": args.split, "cfg_scale": args.cfg,
               "temperature": args.temperature, "batch_size": 50}  # fmt: skip
    try:
        settings = Settings(config=args.config, out=args.out, seeds=_seeds(args.seeds), budget=args.budget,
                            smoke=args.smoke, isolate=not args.in_process, eval={"num_eval": num_eval},
                            threads=args.threads, fixed_steps=args.steps or 0, eval_options=options)  # fmt: skip
        if args.experiment == "um3-schedule":
            from ..experiments.unified import run_um3_schedule

            run_um3_schedule(settings)
        else:
            from ..experiments.unified import run_um3_specialists

            run_um3_specialists(settings, args.t2i_config)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        raise CLIError(str(e)) from e
    return _print_table(settings.out)
