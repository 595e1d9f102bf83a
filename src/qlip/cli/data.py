"""``qlip data ...``: write tar shards from any source, check a source for bad files, preview ``shapes``."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from ..data.loader import build_dataset, describe_source, iter_samples
from ..data.preview import render_preview
from ..data.sample import BAD_REASONS, BadSampleCounter, is_bad
from ..data.shapes import ShapesConfig
from ..data.shards import ShardWriter
from .common import EXIT_BAD_DATA, CLIError


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


def _add_source_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="shapes[:easy|default|hard], a class folder, a .csv/.tsv/.jsonl list, or tar shards")
    p.add_argument("--count", type=int, default=None, help="number of samples (required for shapes)")
    p.add_argument("--split", default="train", choices=("train", "val", "test"), help="shapes split")
    p.add_argument("--seed", type=int, default=0, help="shapes seed")
    p.add_argument("--image-size", type=int, default=None, help="shapes resolution (32..256)")
    p.add_argument("--min-size", type=int, default=1, help="images smaller than this on a side are bad")
    p.add_argument("--image-key", default=None, help="caption lists: the image path column")
    p.add_argument("--caption-key", default=None, help="caption lists: the caption column")
    p.add_argument("--caption-template", default=None, help='class folders: caption such as "a photo of a {}."')
    p.add_argument("--allow-missing-caption", action="store_true", help="shards: keep samples without caption")


def cmd_write_shards(args: argparse.Namespace) -> int:
    """Convert any source into tar shards of --shard-size samples, with manifest.json."""
    dataset = build_dataset(args.source, **_source_options(args))
    counter = BadSampleCounter(max_bad_fraction=args.max_bad_fraction, min_samples=100, name=args.source)
    start = time.perf_counter()
    with ShardWriter(args.out, shard_size=args.shard_size, prefix=args.prefix, image_format=args.format) as writer:
        for sample in iter_samples(dataset, limit=args.count):
            counter.record(sample)
            if not is_bad(sample):
                writer.write(sample)
        writer.close({"spec": args.source, "bad": dict(counter.counts)})
    elapsed = time.perf_counter() - start
    print(f"wrote {writer.total} samples in {len(writer.shards)} shards to {args.out} ({elapsed:.1f} s); "
          f"{counter.summary()}; manifest: {args.out}/manifest.json")  # fmt: skip
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Read every sample of a source; report counts, image sizes and every bad file; exit 1 if any is bad."""
    dataset = build_dataset(args.source, **_source_options(args))
    counter = BadSampleCounter(max_bad_fraction=1.0, name=args.source)
    widths: list[int] = []
    heights: list[int] = []
    bad: list[tuple[str, str, str]] = []
    with_caption = 0
    for sample in iter_samples(dataset, limit=args.count):
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
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return EXIT_BAD_DATA if bad else 0


def cmd_preview(args: argparse.Namespace) -> int:
    """Write a PNG grid of shapes samples with their captions (for the README)."""
    preset = args.source.partition(":")[2] or "default"
    config = ShapesConfig.preset(preset, image_size=args.image_size or 64)
    grid = render_preview(args.n, cols=args.cols, config=config, split=args.split, seed=args.seed, scale=args.scale)
    grid.save(args.out)
    print(f"wrote {args.n} {args.source} samples to {args.out} ({grid.size[0]}x{grid.size[1]})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data`` with ``write-shards``, ``check`` and ``preview`` to a CLI; each sets ``args.func``."""
    data = subparsers.add_parser("data", help="datasets: write tar shards, check a source, preview shapes")
    sub = data.add_subparsers(dest="data_command", required=True)

    write = sub.add_parser("write-shards", help="convert a source (or shapes --count N) into tar shards")
    _add_source_arguments(write)
    write.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    write.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    write.add_argument("--prefix", default="data", help="shard names: PREFIX-000000.tar, ...")
    write.add_argument("--format", default="png", choices=("png", "jpg", "webp"), help="image encoding")
    write.add_argument("--max-bad-fraction", type=float, default=0.5, help="stop if more of the source is bad")
    write.set_defaults(func=cmd_write_shards)

    check = sub.add_parser("check", help="read every sample; report counts, sizes and bad files (exit 1 if any)")
    _add_source_arguments(check)
    check.add_argument("--json", default=None, help="also write the report to this JSON file")
    check.set_defaults(func=cmd_check)

    preview = sub.add_parser("preview", help="PNG grid of shapes samples with captions")
    preview.add_argument("source", nargs="?", default="shapes", help="shapes[:easy|default|hard]")
    preview.add_argument("--n", type=int, default=16, help="number of samples")
    preview.add_argument("--cols", type=int, default=4, help="samples per row")
    preview.add_argument("--image-size", type=int, default=64, help="shapes resolution (32..256)")
    preview.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling for display")
    preview.add_argument("--split", default="train", choices=("train", "val", "test"))
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument("--out", default="shapes_preview.png", help="output PNG")
    preview.set_defaults(func=cmd_preview)
    return data
