"""A whole dataset -> token shards, resumable, one set of shards per rank (``qlip tokenize``).

    qlip tokenize --model DIR --data SRC --out tokens/ [--batch-size 64 --workers 4 --shard-size 10000]
    torchrun --nproc-per-node 8 -m qlip.cli tokenize --model DIR --data SRC --out tokens/

Any source :func:`qlip.data.loader.build_dataset` accepts. Output, per rank ``r``::

    tokens/manifest-r000.json                 what this rank finished (written atomically after each shard)
    tokens/tokens-r000-000000.safetensors     a token file (:mod:`qlip.tokenfile`): indices, labels, keys,
                                              captions and the tokenizer's spec

A shard is written to a temporary name, renamed, and only then recorded in the manifest, so a shard named in the
manifest is always complete. Shards hold whole batches (a shard closes at the first batch boundary at or past
``shard_size`` samples), and the manifest stores where the data stream stood after each shard (the dataset index
for lists and folders, the stream position for shards and ``shapes``), so a rerun continues after the last
finished shard and redoes nothing. :func:`read_token_shards` reads everything back in order.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, Subset

from .fileio import write_json_atomic
from .tokenfile import TokenFile, TokenSpec, iter_token_files, write_token_file

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "qlip-token-shards-v1"


# ----------------------------------------------------------------------------------------------------------------
# Manifest and shard files
# ----------------------------------------------------------------------------------------------------------------


def manifest_path(out: Path, rank: int) -> Path:
    return out / f"manifest-r{rank:03d}.json"


def shard_name(rank: int, index: int) -> str:
    return f"tokens-r{rank:03d}-{index:06d}.safetensors"


def write_shard(path: Path, indices: torch.Tensor, labels: torch.Tensor, keys: list[str], captions: list[Any],
                spec: TokenSpec) -> None:  # fmt: skip
    """One shard: a token file, written atomically."""
    write_token_file(path, indices, spec, keys=keys, captions=captions, labels=labels)


def load_manifests(out: str | Path) -> list[dict[str, Any]]:
    """Every rank's manifest in ``out``, by rank."""
    out = Path(out)
    paths = sorted(out.glob("manifest-r*.json"))
    if not paths:
        raise FileNotFoundError(f"{out} holds no token manifest (manifest-r*.json); write one with `qlip tokenize`")
    return [json.loads(p.read_text()) for p in paths]


def read_token_shards(out: str | Path) -> Iterator[TokenFile]:
    """The finished shards of every rank, rank by rank, in the order they were written."""
    return iter_token_files(out)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TokenizeResult:
    """What one call did: shards written now / skipped as already done, images encoded now, rate, bad counts."""

    out: Path
    shards_written: int
    shards_skipped: int
    images: int
    seconds: float
    bad: dict[str, int]
    complete: bool

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) when run alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _run_settings(model: Any, data: str, batch_size: int, shard_size: int, num_workers: int, limit: int | None,
                  rank: int, world_size: int, source_options: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Everything that decides which samples land in which shard: a resume must match it exactly.

    The number of workers matters only for streams (it sets how the stream is split into slots).
    """
    from .data.loader import describe_source

    streaming = describe_source(data) in ("shapes", "shards")
    return {
        "model": model.cfg.name,
        "grid": model.grid_size,
        "bits": model.num_bits,
        "image_size": model.image_size,
        "data": data,
        "source_options": {k: v for k, v in sorted(source_options.items())},
        "batch_size": batch_size,
        "shard_size": shard_size,
        "num_workers": num_workers if streaming else None,
        "limit": limit,
        "rank": rank,
        "world_size": world_size,
    }


def _build_source(data: str, image_size: int, limit: int | None, rank: int, world_size: int,
                  options: dict[str, Any]) -> tuple[Any, bool]:  # fmt: skip
    """The dataset for this rank and whether it is a stream (resumed by position) or a list (resumed by index)."""
    from .data.loader import build_dataset, describe_source

    kind = describe_source(data)
    if kind == "shapes":
        if limit is None:
            raise ValueError(f"{data} is an endless stream; give limit (--limit N) to say how many images to tokenize")
        ds = build_dataset(data, length=limit, image_size=min(image_size, 256), rank=rank, world_size=world_size,
                           **options)  # fmt: skip
    elif kind == "shards":
        ds = build_dataset(data, rank=rank, world_size=world_size, **options)
    else:
        ds = build_dataset(data, **options)
    if isinstance(ds, IterableDataset):
        return ds, True
    n = len(ds) if limit is None else min(limit, len(ds))
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size  # each rank a contiguous block of the list
    return Subset(ds, range(lo, hi)), False


def tokenize_dataset(
    model: Any,
    data: str,
    out: str | Path,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    shard_size: int = 10_000,
    limit: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    stop_after_shards: int | None = None,
    source_options: dict[str, Any] | None = None,
    resize: str = "crop",
) -> TokenizeResult:
    """Encode every image of ``data`` into token shards under ``out``, continuing an earlier run there.

    Args:
        model: a QLIP model or a :class:`~qlip.inference.FastQLIP` (anything with ``encode``, ``cfg``,
            ``grid_size``, ``num_bits``, ``image_size``, ``device``); it decides the precision.
        data: a source spec for :func:`qlip.data.loader.build_dataset`.
        out: output directory (created).
        batch_size: images per forward pass.
        num_workers: DataLoader processes decoding and resizing images.
        shard_size: samples per shard (rounded up to whole batches).
        limit: tokenize at most this many samples (required for the endless ``shapes`` source); with several
            ranks, the list sources are cut to ``limit`` before being split.
        rank, world_size: this process's share of the data; default from torchrun's RANK / WORLD_SIZE.
        progress: show a tqdm bar (images/s and ETA) on stderr.
        stop_after_shards: stop after writing this many new shards (to spread work over jobs, and for tests).
        source_options: passed on to build_dataset (e.g. caption_template, require_caption, min_size, background:
            also the color the eval transform pads with).
        resize: "crop" or "pad" (see :func:`qlip.transforms.image_transform`).

    Returns:
        A :class:`TokenizeResult`.
    """
    from .data.loader import build_dataloader
    from .data.sample import StreamTracker
    from .progress import progress_bar
    from .transforms import image_transform

    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    env_rank, env_world = distributed_rank()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    options = dict(source_options or {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = _run_settings(model, data, batch_size, shard_size, num_workers, limit, rank, world_size, options)
    if resize != "crop":  # only then: runs with the default preprocessing resume as they always did
        settings["resize"] = resize

    # --- resume: what does the manifest say is done? ---
    mpath = manifest_path(out, rank)
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "settings": settings, "shards": [], "complete": False}
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if old.get("settings") != settings:
            before = old.get("settings", {})
            changed = sorted(k for k in settings.keys() | before.keys() if before.get(k) != settings.get(k))
            raise ValueError(
                f"{out} holds tokens of a different run (settings differ in {changed}); resume with the same "
                "settings, or write to a new --out directory"
            )
        missing = [e["file"] for e in old["shards"] if not (out / e["file"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{out}: shard(s) {missing} listed in {mpath.name} are missing; use a new --out")
        manifest = old
    done = list(manifest["shards"])  # a copy: the writer thread appends to the manifest's list
    if manifest["complete"]:
        log.info("%s: rank %d already complete (%d shards)", out, rank, len(done))
        return TokenizeResult(out, 0, len(done), 0, 0.0, {}, True)

    dataset, streaming = _build_source(data, model.image_size, limit, rank, world_size, options)
    tracker = StreamTracker()
    total = None
    if done:
        if streaming:
            dataset.load_state_dict(done[-1]["end"])
            tracker.load_state_dict(done[-1]["end"])
        else:
            start = done[-1]["end"]["items"]
            dataset = Subset(dataset.dataset, dataset.indices[start:])
    consumed = done[-1]["end"].get("items", 0) if done else 0
    if not streaming:
        total = len(dataset)
    elif limit is not None:
        total = max(0, limit // world_size - sum(e["num_samples"] for e in done))
    transform = image_transform(model.image_size, train=False, resize=resize,
                                background=options.get("background", "white"))  # fmt: skip
    loader = build_dataloader(dataset, batch_size=batch_size, transform=transform, num_workers=num_workers,
                              pin_memory=model.device.type == "cuda", max_bad_fraction=1.0)  # fmt: skip
    spec = TokenSpec.of(model)

    # Shards are written by a background thread so the model never waits for the disk.
    writes: queue.Queue = queue.Queue(maxsize=2)
    errors: list[BaseException] = []

    def writer() -> None:
        while (job := writes.get()) is not None:
            try:
                path, arrays, entry = job
                write_shard(path, *arrays, spec)
                manifest["shards"].append(entry)
                write_json_atomic(mpath, manifest)
            except BaseException as e:  # re-raised in the main thread
                errors.append(e)

    thread = threading.Thread(target=writer, name="qlip-shard-writer", daemon=True)
    thread.start()
    bar = progress_bar(desc=f"tokenize r{rank}", total=total, unit="img", enabled=progress)
    buf_idx: list[torch.Tensor] = []
    buf_lab: list[torch.Tensor] = []
    buf_keys: list[str] = []
    buf_caps: list[Any] = []
    bad_now: dict[str, int] = {}
    shard_bad: dict[str, int] = {}
    written = encoded = 0
    next_index = len(done)
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal written, next_index, buf_idx, buf_lab, buf_keys, buf_caps, shard_bad
        if errors:
            raise errors[0]
        indices = torch.cat(buf_idx) if buf_idx else torch.empty(0, model.grid_size, model.grid_size, dtype=torch.int64)
        labels = torch.cat(buf_lab) if buf_lab else torch.empty(0, dtype=torch.int64)
        end = tracker.state_dict() if streaming else {"items": consumed}
        entry = {"file": shard_name(rank, next_index), "num_samples": len(buf_keys), "bad": shard_bad, "end": end}
        writes.put((out / entry["file"], (indices, labels, buf_keys, buf_caps), entry))
        written += 1
        next_index += 1
        buf_idx, buf_lab, buf_keys, buf_caps, shard_bad = [], [], [], [], {}

    stopped = False
    try:
        for batch in loader:
            n = len(batch["key"])
            if n:
                tokens = model.encode(batch["image"].to(model.device, non_blocking=True))  # (B, h, w) int64
                buf_idx.append(tokens.cpu())
                buf_lab.append(batch["label"])
                buf_keys.extend(batch["key"])
                buf_caps.extend(batch["caption"])
            for reason, k in batch["bad"].items():
                bad_now[reason] = bad_now.get(reason, 0) + k
                shard_bad[reason] = shard_bad.get(reason, 0) + k
            consumed += n + sum(batch["bad"].values())
            tracker.update(batch)
            encoded += n
            bar.update(n)
            if len(buf_keys) >= shard_size:
                flush()
                if stop_after_shards is not None and written >= stop_after_shards:
                    stopped = True
                    break
        if not stopped and (buf_keys or shard_bad):
            flush()
    finally:
        writes.put(None)
        thread.join()
        bar.close()
    if errors:
        raise errors[0]
    if not stopped:
        manifest["complete"] = True
        write_json_atomic(mpath, manifest)
    seconds = time.perf_counter() - t0
    result = TokenizeResult(out, written, len(done), encoded, seconds, bad_now, not stopped)
    log.info("tokenized %d images into %d new shard(s) in %.1f s (%.1f images/s)", encoded, written, seconds,
             result.images_per_s)  # fmt: skip
    return result
