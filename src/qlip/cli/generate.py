"""``qlip generate "a red triangle ..." --model GEN --n 8 --cfg 3 --seed 0 --out samples/``: text -> images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import CLIError, check_output_dir, finite_float, plan_outputs, positive_int, resolve_device


def cmd_generate(args: argparse.Namespace) -> int:
    import warnings

    from ..fileio import atomic_write
    from ..generation import CaptionTruncatedWarning, load
    from ..unified import is_unified_directory

    prompts = [p.strip() for p in args.prompts]
    if not all(prompts):
        raise CLIError("a prompt is empty; give the caption of the image to generate, e.g. \"a red circle\"")
    out_dir = check_output_dir(args.out)
    names = [Path(f"{i:03d}-{j:02d}.png") for i in range(len(prompts)) for j in range(args.n)]
    outputs = plan_outputs(names, out_dir, ".png", args.overwrite)
    grid = Path(args.grid) if args.grid else None
    if grid is not None:
        if grid.suffix.lower() != ".png":
            raise CLIError(f"--grid {grid}: the grid is a PNG; give a path ending in .png")
        if grid.exists() and not args.overwrite:
            raise CLIError(f"--grid {grid} exists; choose another path or pass --overwrite to replace it")
        if not grid.parent.is_dir():
            raise CLIError(f"--grid {grid}: the folder {grid.parent} does not exist; create it first")
    device = resolve_device(args.device)
    try:
        if is_unified_directory(args.model):  # a unified model (UM3) generates images too
            from ..unified import load as load_unified

            gen = load_unified(args.model, device=device)
        else:
            gen = load(args.model, device=device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CaptionTruncatedWarning)
            images = gen.generate(prompts, cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, seed=args.seed, n=args.n)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:  # the generation errors are ValueErrors with one-line messages
        raise CLIError(str(e)) from e
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    for img, path in zip(images, outputs):
        atomic_write(path, lambda tmp, img=img: img.save(tmp, format="PNG"))
    lines = [f"{i:03d}\t{p}" for i, p in enumerate(prompts)]
    atomic_write(out_dir / "prompts.tsv", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    print(f"wrote {len(images)} image(s) for {len(prompts)} prompt(s) to {out_dir} (prompts.tsv names them)")
    if grid is not None:
        from ..generation.grid import caption_grid

        picture = caption_grid(images, [p for p in prompts for _ in range(args.n)], columns=args.grid_columns)
        atomic_write(grid, lambda tmp: picture.save(tmp, format="PNG"))
        print(f"wrote {grid}: every image with its caption under it")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="text -> images with a trained generator")
    p.add_argument("prompts", nargs="+", help="captions, one image set per caption")
    p.add_argument("--model", required=True, help="a generator directory (run_dir/last of a text-to-image run) "
                   "or a unified model directory")
    p.add_argument("--out", required=True, help="output folder: NNN-MM.png per prompt and sample, prompts.tsv")
    p.add_argument("--n", type=positive_int, default=4, help="images per prompt (default 4)")
    p.add_argument("--cfg", type=finite_float, default=3.0, help="classifier-free guidance scale (default 3; 1 = none)")
    p.add_argument("--temperature", type=finite_float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=finite_float, default=1.0, help="nucleus sampling mass in (0, 1] (1: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--grid", default=None, metavar="FILE.png",
                   help="also write one PNG of every image with its caption under it")
    p.add_argument("--grid-columns", type=positive_int, default=None, help="images per row of --grid (default: up "
                   "to 6)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace existing PNGs in --out (and the --grid file)")
    p.set_defaults(func=cmd_generate)
