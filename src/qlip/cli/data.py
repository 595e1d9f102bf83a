"""``qlip data ...``: write tar shards from any source, check a source for bad files, preview any source, and
prepare the Open Clip Art Library as a captioned image set."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..data.loader import build_dataset, describe_source, iter_samples
from ..data.preview import render_grid, render_preview
from ..data.sample import BAD_REASONS, BadDataError, BadSampleCounter, is_bad
from ..data.shapes import ShapesConfig
from ..data.shards import MANIFEST_NAME, ShardWriter
from ..fileio import atomic_write, write_json_atomic
from .common import (
    EXIT_BAD_DATA,
    CLIError,
    check_output_dir,
    check_output_file,
    fraction,
    non_negative_int,
    positive_int,
)


def _source_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"min_size": args.min_size}
    kind = describe_source(args.source)
    if kind == "shapes":
        if args.count is None:
            raise CLIError(f"{args.source} is endless; give --count N to say how many samples to use")
        options.update(split=args.split, seed=args.seed, length=args.count, image_size=args.image_size)
        options.pop("min_size")
    elif kind == "captions":
        options.update(image_key=args.image_key, caption_key=args.caption_key)
    elif kind == "shards":
        options.update(require_caption=not args.allow_missing_caption)
    elif kind == "folder" and args.caption_template:
        options.update(caption_template=args.caption_template)
    return options


def _open_source(args: argparse.Namespace) -> Any:
    """The dataset ``args.source`` names; a missing path or an empty/malformed list is a CLIError."""
    try:
        return build_dataset(args.source, **_source_options(args))
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from e


def _progress(dataset: Any, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The samples of ``dataset`` (at most ``--count``) with a progress bar on stderr unless ``--quiet``."""
    from ..progress import progress_bar

    total = args.count
    if total is None and hasattr(dataset, "__len__"):
        total = len(dataset)
    samples = iter_samples(dataset, limit=args.count)
    yield from progress_bar(samples, desc=args.data_command, total=total, unit="sample", enabled=not args.quiet)


def _add_source_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="shapes[:easy|default|hard], a class folder, a .csv/.tsv/.jsonl list, or tar shards")
    p.add_argument("--count", type=positive_int, default=None, help="number of samples (required for shapes)")
    p.add_argument("--split", default="train", choices=("train", "val", "test"), help="shapes split")
    p.add_argument("--seed", type=int, default=0, help="shapes seed")
    p.add_argument("--image-size", type=positive_int, default=None, help="shapes resolution (32..256)")
    p.add_argument("--min-size", type=non_negative_int, default=1, help="images smaller than this on a side are bad")
    p.add_argument("--image-key", default=None, help="caption lists: the image path column")
    p.add_argument("--caption-key", default=None, help="caption lists: the caption column")
    p.add_argument("--caption-template", default=None, help='class folders: caption such as "a photo of a {}."')
    p.add_argument("--allow-missing-caption", action="store_true", help="shards: keep samples without caption")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_write_shards(args: argparse.Namespace) -> int:
    """Convert any source into tar shards of --shard-size samples, with manifest.json."""
    out = check_output_dir(args.out, [Path(args.source)])
    if out.is_dir() and not args.overwrite:
        existing = sorted(p.name for p in out.iterdir() if p.name == MANIFEST_NAME or
                          (p.name.startswith(f"{args.prefix}-") and p.suffix == ".tar"))  # fmt: skip
        if existing:
            raise CLIError(f"--out {out} already holds shards ({', '.join(existing[:3])}"
                           f"{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace them or choose "
                           "another folder")  # fmt: skip
    dataset = _open_source(args)
    counter = BadSampleCounter(max_bad_fraction=args.max_bad_fraction, min_samples=100, name=args.source)
    start = time.perf_counter()
    with ShardWriter(out, shard_size=args.shard_size, prefix=args.prefix, image_format=args.format) as writer:
        try:
            for sample in _progress(dataset, args):
                counter.record(sample)
                if not is_bad(sample):
                    writer.write(sample)
        except BadDataError as e:  # the shards written so far are kept, with a manifest that says so
            writer.close({"spec": args.source, "bad": dict(counter.counts), "stopped": str(e)})
            print(f"error: {e}", file=sys.stderr)
            for reason, keys in sorted(counter.examples.items()):
                print(f"  bad {reason}: {', '.join(keys)}", file=sys.stderr)
            print(f"kept {writer.total} samples in {len(writer.shards)} shards in {out}", file=sys.stderr)
            return EXIT_BAD_DATA
        writer.close({"spec": args.source, "bad": dict(counter.counts)})
    elapsed = time.perf_counter() - start
    print(f"wrote {writer.total} samples in {len(writer.shards)} shards to {out} ({elapsed:.1f} s); "
          f"{counter.summary()}; manifest: {out / MANIFEST_NAME}")  # fmt: skip
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Read every sample of a source; report counts, image sizes and every bad file; exit 1 if any is bad."""
    if args.json:
        check_output_file(args.json, [Path(args.source)], overwrite=True, option="--json")
    dataset = _open_source(args)
    counter = BadSampleCounter(max_bad_fraction=1.0, name=args.source)
    widths: list[int] = []
    heights: list[int] = []
    bad: list[tuple[str, str, str]] = []
    with_caption = 0
    for sample in _progress(dataset, args):
        counter.record(sample)
        if is_bad(sample):
            bad.append((sample["key"], sample["bad"], sample.get("detail", "")))
            continue
        widths.append(sample["image"].size[0])
        heights.append(sample["image"].size[1])
        with_caption += sample.get("caption") is not None
    print(f"{args.source} ({describe_source(args.source)}): {counter.seen} samples, {len(widths)} good, "
          f"{counter.total} bad, {with_caption} with a caption")  # fmt: skip
    for name, values in (("width", widths), ("height", heights)):
        if values:
            print(f"  {name}: min {min(values)}, median {statistics.median(values):g}, "
                  f"mean {statistics.fmean(values):.1f}, max {max(values)}")  # fmt: skip
    for reason, n in sorted(counter.counts.items()):
        print(f"  bad {reason}: {n} ({BAD_REASONS.get(reason, '')})")
    for key, reason, detail in bad:
        print(f"  BAD {key}: {reason}: {detail}")
    if args.json:
        report = {"source": args.source, "seen": counter.seen, "good": len(widths), "bad": counter.counts,
                  "bad_items": [{"key": k, "reason": r, "detail": d} for k, r, d in bad],
                  "widths": widths, "heights": heights}  # fmt: skip
        write_json_atomic(args.json, report)
    return EXIT_BAD_DATA if bad else 0


def cmd_preview(args: argparse.Namespace) -> int:
    """Write a PNG grid of a source's first samples with their captions: the images the files hold, or shapes."""
    out = check_output_file(args.out, overwrite=True)
    try:
        kind = describe_source(args.source)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from e
    if kind == "shapes":
        preset = args.source.partition(":")[2] or "default"
        try:
            config = ShapesConfig.preset(preset, image_size=args.image_size or 64)
        except (TypeError, ValueError) as e:
            raise CLIError(str(e)) from e
        grid = render_preview(args.n, cols=args.cols, config=config, split=args.split, seed=args.seed,
                              scale=args.scale)  # fmt: skip
        shown, bad, bad_keys = args.n, 0, []
    else:
        options: dict[str, Any] = {}
        if kind == "captions":
            options.update(image_key=args.image_key, caption_key=args.caption_key)
        elif kind == "folder":
            options.update(caption_template=args.caption_template or "{}")  # the class name under each image
        elif kind == "shards":
            options.update(require_caption=False)
        try:
            dataset = build_dataset(args.source, **options)
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(f"{e}; preview draws shapes[:preset], a class folder, a caption list or tar shards") from e
        samples, bad_keys = [], []
        for sample in iter_samples(dataset):
            if is_bad(sample):
                bad_keys.append(f"{sample['key']} ({sample['bad']})")
            else:
                samples.append(sample)
            if len(samples) == args.n:
                break
        if not samples:
            print(f"error: {args.source}: none of its first {len(bad_keys)} samples could be read: "
                  f"{', '.join(bad_keys[:5])}", file=sys.stderr)  # fmt: skip
            return EXIT_BAD_DATA
        grid = render_grid(samples, cols=args.cols, side=args.image_size * args.scale)
        shown, bad = len(samples), len(bad_keys)
    atomic_write(out, lambda tmp: grid.save(tmp, format="PNG"))
    print(f"wrote {shown} {args.source} samples to {out} ({grid.size[0]}x{grid.size[1]})")
    if bad:
        print(f"skipped {bad} unreadable samples: {', '.join(bad_keys[:5])}{', ...' if bad > 5 else ''}",
              file=sys.stderr)  # fmt: skip
        return EXIT_BAD_DATA
    return 0


def cmd_openclipart(args: argparse.Namespace) -> int:
    """Turn the installed Open Clip Art Library into caption lists of pre-resized images (see docs/data.md)."""
    from ..data.openclipart import UNREADABLE, OpenClipArtError, prepare_openclipart
    from ..progress import progress_bar

    out = check_output_dir(args.out, [Path(args.src)])

    def bar(entries, total):
        return progress_bar(entries, desc="openclipart", total=total, unit="image", enabled=not args.quiet)

    start = time.perf_counter()
    try:
        manifest = prepare_openclipart(args.src, out, size=args.size, min_side=args.min_side,
                                       heldout_fraction=args.heldout_fraction,
                                       max_per_caption=args.max_per_caption, progress=bar)  # fmt: skip
    except (OpenClipArtError, ValueError) as e:  # not installed, an output folder it did not write, a bad option
        raise CLIError(str(e)) from e
    for item in manifest["skipped_files"]:  # what could not be read; the choices (size, metadata) are counted
        if item["reason"] in UNREADABLE or item["reason"] == "decompression_bomb":
            print(f"skipped {item['png']}: {item['reason']}: {item['detail']}", file=sys.stderr)
    skipped = sum(manifest["skipped"].values())
    reasons = ", ".join(f"{n} {r}" for r, n in manifest["skipped"].items())
    splits = manifest["splits"]
    print(f"wrote {manifest['images']} images in {len(manifest['categories'])} categories to {out} "
          f"({splits['train']} in train.csv, {splits['heldout']} in heldout.csv; "
          f"{time.perf_counter() - start:.0f} s); skipped {skipped} of {manifest['found']}"
          f"{f' ({reasons})' if reasons else ''}; every skipped file is named in {out / 'manifest.json'}")  # fmt: skip
    return EXIT_BAD_DATA if manifest["unreadable"] else 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data`` with ``write-shards``, ``check`` and ``preview`` to a CLI; each sets ``args.func``."""
    data = subparsers.add_parser("data", help="datasets: write tar shards, check a source, preview a source, "
                                 "prepare the clip-art set")
    sub = data.add_subparsers(dest="data_command", required=True)

    write = sub.add_parser("write-shards", help="convert a source (or shapes --count N) into tar shards")
    _add_source_arguments(write)
    write.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    write.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    write.add_argument("--prefix", default="data", help="shard names: PREFIX-000000.tar, ...")
    write.add_argument("--format", default="png", choices=("png", "jpg", "webp"), help="image encoding")
    write.add_argument("--max-bad-fraction", type=fraction, default=0.5,
                       help="stop (exit 1, keeping what was written) if more of the source is bad")
    write.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    write.set_defaults(func=cmd_write_shards)

    check = sub.add_parser("check", help="read every sample; report counts, sizes and bad files (exit 1 if any)")
    _add_source_arguments(check)
    check.add_argument("--json", default=None, help="also write the report to this JSON file")
    check.set_defaults(func=cmd_check)

    preview = sub.add_parser("preview", help="PNG grid of a source's first samples with their captions")
    preview.add_argument("source", nargs="?", default="shapes",
                         help="shapes[:easy|default|hard], a class folder, a .csv/.tsv/.jsonl list, or tar shards")
    preview.add_argument("--n", type=positive_int, default=16, help="number of samples")
    preview.add_argument("--cols", type=positive_int, default=4, help="samples per row")
    preview.add_argument("--image-size", type=positive_int, default=64,
                         help="shapes resolution (32..256); other sources: the cell size before --scale")
    preview.add_argument("--scale", type=positive_int, default=2, help="upscaling of a cell for display")
    preview.add_argument("--image-key", default=None, help="caption lists: the image path column")
    preview.add_argument("--caption-key", default=None, help="caption lists: the caption column")
    preview.add_argument("--caption-template", default=None,
                         help='class folders: caption such as "a photo of a {}." (default: the class name)')
    preview.add_argument("--split", default="train", choices=("train", "val", "test"))
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument("--out", default="shapes_preview.png", help="output PNG")
    preview.set_defaults(func=cmd_preview)

    clipart = sub.add_parser("openclipart", help="caption lists of the installed Open Clip Art Library (offline, "
                             "public domain)")  # fmt: skip
    clipart.add_argument("--out", required=True, help="output folder: new, empty, or written by this command")
    clipart.add_argument("--src", default="/usr/share/openclipart",
                         help="the packages' folder (apt install openclipart-png openclipart-svg)")
    clipart.add_argument("--size", type=positive_int, default=128, help="side of the stored square images")
    clipart.add_argument("--min-side", type=non_negative_int, default=32,
                         help="skip drawings whose PNG is smaller than this on a side")
    clipart.add_argument("--heldout-fraction", type=fraction, default=0.1,
                         help="share of captions (by hash) whose drawings go to heldout.csv")
    clipart.add_argument("--max-per-caption", type=non_negative_int, default=10,
                         help="keep at most this many drawings with one caption (0: all)")
    clipart.add_argument("--quiet", action="store_true", help="no progress bar")
    clipart.set_defaults(func=cmd_openclipart)
    return data
