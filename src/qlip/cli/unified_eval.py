"""``qlip eval unified --model UM3 --data shapes --out report/``: text perplexity, captions, ShapesEval in one report.

Not a command group of its own: :func:`add_eval_unified` adds the ``unified`` subcommand to ``qlip eval``.
"""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from .common import CLIError, check_output_dir, finite_float, positive_int, resolve_device


def cmd_eval_unified(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..data.loader import shapes_config_from_spec
    from ..eval.report import write_report
    from ..fileio import atomic_write
    from ..unified import load
    from ..unified.evaluate import evaluate_unified

    data = args.demo_data if args.data == "shapes" else args.data
    if not data.startswith("shapes"):
        raise CLIError(f"--data {args.data}: the unified evaluation reads shapes images and captions; give shapes "
                       f"or a shapes spec such as {args.demo_data!r}")  # fmt: skip
    out = check_output_dir(args.out)
    try:
        um = load(args.model, device=resolve_device(args.device))
        if not um.is_unified:
            raise CLIError(f"--model {args.model} is a text-only language model; qlip eval unified scores a unified "
                           "model (run_dir/last of a task: unified run)")  # fmt: skip
        shapes = shapes_config_from_spec(data, image_size=um.qlip.image_size)
        judge = None
        if args.judge != "none":
            from ..eval.judge import load_judge

            judge = load_judge(args.judge)
        result = evaluate_unified(um, shapes=shapes, judge=judge, limit=args.limit, split=args.split,
                                  cfg_scale=args.cfg, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                  batch_size=args.batch_size)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:  # the model's and the judge's errors are one-line ValueErrors
        raise CLIError(str(e)) from e
    metrics: dict[str, Any] = result["metrics"]
    report = {"model": args.model, "data": data, "split": args.split, "limit": args.limit, "cfg_scale": args.cfg,
              "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
              "judge": args.judge if judge is not None else None, "qlip_version": __version__,
              "corpus": um.cfg.corpus, "metrics": metrics, "captions": result["examples"], "notes": result["notes"],
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    for key, value in metrics.items():
        print(f"{key}\t{value:.2f}" if isinstance(value, float) else f"{key}\t{value}")
    for note in result["notes"]:
        print(f"note: {note}")
    images = result["images"][:16]
    if images:
        import numpy as np
        from PIL import Image

        row = np.concatenate([np.asarray(im.convert("RGB")) for im in images], axis=1)
        atomic_write(out / "samples.png", lambda tmp: Image.fromarray(row).save(tmp, format="PNG"))
    paths = write_report(report, out)
    print(f"wrote {paths['json']} and {paths['markdown']}")
    return 0


def add_eval_unified(sub: Any, demo_data: str) -> None:
    """Add ``unified`` to the ``qlip eval`` subparsers; ``--data shapes`` means ``demo_data``."""
    u = sub.add_parser("unified", help="a unified model's text perplexity, image->text and text->image in one table")
    u.add_argument("--model", required=True, help="a unified-model directory (run_dir/last of a task: unified run)")
    u.add_argument("--data", default="shapes", help=f"a shapes spec; shapes (default) means {demo_data}")
    u.add_argument("--judge", default="docs/results/judge", help="a ShapesEval judge for text->image (none: skip)")
    u.add_argument("--split", default="test", choices=("val", "test"))
    u.add_argument("--limit", type=positive_int, default=200, help="images captioned and generated (default 200)")
    u.add_argument("--batch-size", type=positive_int, default=50)
    u.add_argument("--cfg", type=finite_float, default=3.0, help="guidance scale of text->image (default 3)")
    u.add_argument("--temperature", type=finite_float, default=1.0)
    u.add_argument("--top-p", type=finite_float, default=0.95)
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    u.add_argument("--out", default="report-unified", help="report directory (default report-unified)")
    u.set_defaults(func=cmd_eval_unified, demo_data=demo_data)
