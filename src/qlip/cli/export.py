"""``qlip export MODEL --format onnx|torch-export --out DIR`` and ``qlip export check DIR --images FOLDER``.

The first writes the tokenizer's encoder (images -> indices) and decoder (indices -> images) as standalone graphs
with a manifest (:mod:`qlip.export`); the second runs them (onnxruntime, ``torch.export.load``) on real images and
compares with PyTorch eager: token indices must be identical, pixels within a stated tolerance.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from .common import (
    EXIT_BAD_DATA,
    CLIError,
    check_output_dir,
    expand_images,
    load_batches,
    load_model,
    positive_int,
    report_bad,
)

log = logging.getLogger("qlip")

PARTS_FOR_GRAPH = {"encoder": ("vision", "quantizer"), "decoder": ("quantizer", "decoder")}


def _model_config(name: str):
    """The config of a model directory or registered name, without building the model."""
    from ..checkpoints import read_config
    from ..factory import get_model_config, resolve_model_dir

    try:
        directory = resolve_model_dir(name)
        return read_config(directory)[0] if directory is not None else get_model_config(name)
    except (ValueError, TypeError, KeyError, FileNotFoundError, RuntimeError, OSError) as e:
        raise CLIError(f"cannot load model {name!r}: {e}") from e


def _parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS_FOR_GRAPH]
    if bad or not parts:
        raise CLIError(f"--parts {text!r}: choose encoder, decoder or encoder,decoder")
    return list(dict.fromkeys(parts))


def cmd_export_model(args: argparse.Namespace) -> int:
    from ..export import ExportError, export_model

    if args.out is None or args.format is None:
        raise CLIError("qlip export MODEL needs --format (onnx or torch-export) and --out DIR")
    if args.images is not None:
        raise CLIError("--images belongs to `qlip export check DIR --images FOLDER`")
    graphs = _parse_parts(args.parts)
    cfg = _model_config(args.target)
    if "decoder" in graphs and cfg.decoder is None:
        raise CLIError(f"{args.target} has no decoder, so there is no decoder graph to export; pass --parts encoder")
    if "encoder" in graphs and cfg.vision is None:
        raise CLIError(f"{args.target} has no vision encoder, so there is no encoder graph; pass --parts decoder")
    if cfg.quantizer is None:
        raise CLIError(f"{args.target} has no BSQ quantizer, so it makes no tokens; export a tokenizer model")
    source = Path(args.target)
    out = check_output_dir(args.out, [source] if source.is_dir() else [])
    parts = tuple(sorted({p for g in graphs for p in PARTS_FOR_GRAPH[g]}))
    model = load_model(args.target, torch.device("cpu"), parts=parts)
    recorded = str(source.resolve()) if source.is_dir() else args.target
    try:
        result = export_model(model, out, args.format, graphs=graphs, source=recorded, overwrite=args.overwrite,
                              max_batch=args.max_batch)  # fmt: skip
    except ExportError as e:
        raise CLIError(str(e)) from e
    files = ", ".join(f"{g} -> {p.name}" for g, p in result.files.items())
    print(f"wrote {files} and {Path(result.directory, 'qlip-export.json').name} to {result.directory} "
          f"({args.format}, {model.cfg.name}, batch 1 to {args.max_batch})")  # fmt: skip
    return 0


def cmd_export_check(args: argparse.Namespace, directory: str) -> int:
    from ..export import CheckReport, ExportedTokenizer, ExportError, read_manifest
    from ..transforms import image_transform

    if args.images is None:
        raise CLIError("qlip export check DIR needs --images FOLDER (image files or folders)")
    if args.out is not None:
        raise CLIError("--out belongs to `qlip export MODEL`; qlip export check writes nothing")
    try:
        manifest = read_manifest(directory)
    except ExportError as e:
        raise CLIError(str(e)) from e
    exports = manifest.get("exports", {})
    formats = [args.format] if args.format else sorted(exports)
    missing = [f for f in formats if f not in exports]
    if missing or not formats:
        raise CLIError(f"{directory} holds no {missing[0] if missing else ''} export (it has: "
                       f"{', '.join(sorted(exports)) or 'none'}); run qlip export --format FORMAT first")  # fmt: skip
    batch_max = int(manifest["batch"]["max"])
    if args.batch_size > batch_max:
        raise CLIError(f"--batch-size {args.batch_size} is more than the exported graphs take (batch 1 to "
                       f"{batch_max}); use --batch-size {batch_max} or less, or export with a larger "
                       "--max-batch")  # fmt: skip
    source = args.model or manifest.get("source")
    if not source:
        raise CLIError(f"{directory}/qlip-export.json names no source model; pass --model MODELDIR")
    graphs = {g for f in formats for g in exports[f]["files"]}
    parts = tuple(sorted({"vision", "quantizer"} | ({"decoder"} if "decoder" in graphs else set())))
    if not args.model and not Path(source).is_dir():
        log.warning("checking against %s as the manifest names it; pass --model to choose the model", source)
    model = load_model(source, torch.device("cpu"), parts=parts)
    for key in ("image_size", "grid_size", "num_bits"):
        if getattr(model, key) != manifest[key]:
            raise CLIError(f"--model {source} has {key} {getattr(model, key)} but the export has {manifest[key]}; "
                           "pass the model that was exported")  # fmt: skip
    inputs = expand_images(args.images)
    try:
        runners = {f: ExportedTokenizer(directory, f) for f in formats}
    except ExportError as e:
        raise CLIError(str(e)) from e
    reports = {f: CheckReport(f) for f in formats}
    transform = image_transform(manifest["image_size"], train=False)
    bad = []
    for _, batch, errors in load_batches([f for f, _ in inputs], transform, args.batch_size, not args.quiet):
        bad.extend(errors)
        if batch is None:
            continue
        for f in formats:
            try:
                reports[f].add(runners[f], model, batch)
            except ExportError as e:
                raise CLIError(str(e)) from e
    report_bad(bad)
    if not any(r.images for r in reports.values()):
        raise CLIError(f"none of the {len(inputs)} input image(s) could be read; nothing checked")
    failed = False
    for f, r in reports.items():
        parts_text = []
        if r.tokens:
            parts_text.append(f"{r.token_mismatches} of {r.tokens} tokens differ from PyTorch eager")
        if r.pixel_max_abs_diff is not None:
            parts_text.append(f"pixels max abs diff {r.pixel_max_abs_diff:.2e} (tolerance {r.pixel_tolerance:.0e}, "
                              f"[0, 1] scale), PSNR {r.pixel_psnr_db:.1f} dB vs eager")  # fmt: skip
        verdict = "OK" if r.ok else "MISMATCH"
        print(f"{f}: {r.images} image(s): {'; '.join(parts_text)}: {verdict}")
        failed |= not r.ok
    return EXIT_BAD_DATA if failed or bad else 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.target == "check":
        if not args.directory:
            raise CLIError("qlip export check needs the export folder: qlip export check DIR --images FOLDER")
        return cmd_export_check(args, args.directory)
    if args.directory:
        raise CLIError(f"unexpected argument {args.directory!r}: qlip export takes one MODEL (or: check DIR)")
    return cmd_export_model(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="the tokenizer as ONNX / torch.export graphs; `export check` runs them",
                       description="qlip export MODEL --format onnx|torch-export --out DIR\n"
                                   "qlip export check DIR --images FOLDER [--model MODELDIR]",
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("target", metavar="MODEL|check", help="model directory (or registered name), or `check`")
    p.add_argument("directory", nargs="?", default=None, metavar="DIR", help="with check: the export folder")
    p.add_argument("--format", choices=("onnx", "torch-export"), default=None,
                   help="export: the format to write; check: only this format (default: every one in DIR)")
    p.add_argument("--out", default=None, help="export: the output folder (its other files are left alone)")
    p.add_argument("--parts", default="encoder,decoder", help="export: encoder, decoder or encoder,decoder")
    p.add_argument("--max-batch", type=positive_int, default=1024, help="export: the largest batch the graphs take")
    p.add_argument("--overwrite", action="store_true", help="export: replace graph files qlip export wrote before")
    p.add_argument("--images", nargs="+", default=None, help="check: image files or folders")
    p.add_argument("--model", default=None, help="check: the eager model (default: the one the manifest names)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="check: images per batch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)
