"""``qlip tokenize --model M --data SRC --out DIR``: a whole dataset -> token shards (resumable; torchrun)."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from .common import (
    CLIError,
    add_image_options,
    add_runtime_option,
    check_output_dir,
    load_model,
    non_negative_int,
    positive_int,
    resolve_device,
)


def cmd_tokenize(args: argparse.Namespace) -> int:
    from ..inference import optimize_for_inference
    from ..tokenize_dataset import distributed_rank, tokenize_dataset

    rank, world_size = distributed_rank()
    check_output_dir(args.out)
    device = resolve_device(args.device)
    if device.type == "cuda" and world_size > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # torchrun: one GPU per rank
        torch.cuda.set_device(device)
    model = load_model(args.model, device, parts=("vision", "quantizer"))
    try:
        fast = optimize_for_inference(model, mode=args.mode, compile=args.compile, runtime=args.runtime,
                                      expected_images=args.limit)  # fmt: skip
    except ValueError as e:
        raise CLIError(str(e)) from e
    options: dict[str, Any] = {}
    if args.caption_template:
        options["caption_template"] = args.caption_template
    if args.allow_missing_caption:
        options["require_caption"] = False
    if args.background != "white":
        options["background"] = args.background
    try:
        result = tokenize_dataset(fast, args.data, args.out, batch_size=args.batch_size, num_workers=args.workers,
                                  shard_size=args.shard_size, limit=args.limit, progress=not args.quiet,
                                  source_options=options, resize=args.resize)  # fmt: skip
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as e:
        raise CLIError(str(e)) from e
    bad = ", ".join(f"{k}={v}" for k, v in sorted(result.bad.items())) or "none"
    print(f"rank {rank}/{world_size}: {result.images} images -> {result.shards_written} new shard(s) "
          f"({result.shards_skipped} already done) in {result.out} at {result.images_per_s:.1f} images/s; "
          f"bad samples: {bad}")  # fmt: skip
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="a whole dataset -> token shards (resumable; torchrun for many GPUs)")
    p.add_argument("--model", required=True, help="model directory, registered name or hf-hub:ORG/NAME")
    p.add_argument("--data", required=True, help="shapes[:preset], a class folder, a .csv/.tsv/.jsonl list, or shards")
    p.add_argument("--out", required=True, help="output directory (rerun with the same settings to resume)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader worker processes")
    p.add_argument("--shard-size", type=positive_int, default=10_000, help="samples per shard (whole batches)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--mode", default="auto", choices=("auto", "fp32", "bf16", "int8"),
                   help="encoder precision; auto = bf16 on CUDA, exact float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (static shapes)")
    add_runtime_option(p)
    p.add_argument("--limit", "--count", dest="limit", type=positive_int, default=None,
                   help="at most this many samples (required for shapes)")
    p.add_argument("--caption-template", default=None, help='class folders: caption such as "a photo of a {}."')
    p.add_argument("--allow-missing-caption", action="store_true", help="shards: keep samples without a caption")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_image_options(p)
    p.set_defaults(func=cmd_tokenize)
