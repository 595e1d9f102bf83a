"""WebDataset-style tar shards: reader with rank/worker split, block shuffle and exact resume; writer with manifest.

Format (compatible with WebDataset): each sample is a run of consecutive tar members sharing a key, the member
name up to the first dot of its file name: ``000000042.png``, ``000000042.txt``, ``000000042.json``. The image
is any of jpg/jpeg/png/webp/bmp; the caption is ``.txt`` or the ``caption``/``text`` field of ``.json``; a label
is the ``label`` field of ``.json`` or a ``.cls`` member. Plain :mod:`tarfile` is used; webdataset is not needed.

Streaming: every epoch the shard list is shuffled with (seed, epoch) (same order on every
rank), then split into ``num_slots`` = world_size x num_workers slots, shard by shard (slot s gets shards
s, s + n, ...), or sample by sample when there are fewer shards than slots. ``shuffle_buffer`` = B > 0 permutes
each block of B consecutive samples of a slot with a generator seeded from (seed, epoch, slot, block), so the order
is a pure function of the position: a resumed stream rebuilds the block it stopped in and goes on from the same
sample, reading only tar headers (not image data) to skip what came before.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from ..transforms import Background, ImageLoadError
from .sample import Sample, bad_marker, current_slot, read_image_checked, resume_point

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
MANIFEST_NAME = "manifest.json"
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``data-{000..002}.tar`` -> 3 names (zero padding kept), ``{a,b}`` -> 2 names.

    Several patterns may be joined with ``::``. Braces may repeat; ranges may count down.
    """
    if "::" in pattern:
        return [name for part in pattern.split("::") for name in expand_braces(part)]
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        lo_text, hi_text = numeric.groups()
        lo, hi = int(lo_text), int(hi_text)
        width = len(lo_text) if lo_text.startswith("0") and len(lo_text) > 1 else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"cannot expand braces {{{body}}} in {pattern!r}: use {{000..099}} or {{a,b,c}}")
    return [name for option in options for name in expand_braces(head + option + tail)]


def list_shards(spec: str | os.PathLike | list[str]) -> list[str]:
    """Shard paths from a directory (its ``*.tar``, sorted), a brace pattern, or a list; all must exist."""
    if isinstance(spec, (list, tuple)):
        paths = [os.fspath(p) for p in spec]
    elif os.path.isdir(spec):
        paths = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not paths:
            raise FileNotFoundError(f"no .tar shards in directory {spec}")
    else:
        paths = expand_braces(os.fspath(spec))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards do not exist, e.g. {missing[0]}; check the "
                                "pattern (brace ranges like data-{000000..000009}.tar are expanded)")  # fmt: skip
    return paths


def _split_key(name: str) -> tuple[str, str]:
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), (ext.lower() if dot else "")


def _scan_shard(path: str, want: Callable[[int], bool]) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard, in order: ``{"key", "shard", "data": {ext: bytes}}`` or a bad marker.

    The data of item i is read only if ``want(i)`` (otherwise ``data`` stays empty), so skipping samples reads
    tar headers only; the sequence of items is the same either way. A member cut short ends the shard with one
    "truncated_tar" marker.
    """
    shard = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        tf = tarfile.open(path, "r:")
    except (OSError, tarfile.TarError) as err:
        yield bad_marker(f"{shard}", "bad_shard", f"cannot open shard {path}: {err}")
        return
    with tf:
        key: str | None = None
        data: dict[str, bytes] = {}
        yielded = 0
        members = 0
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, OSError, EOFError) as err:
                if key is not None:
                    yield {"key": key, "shard": shard, "data": data}
                yield bad_marker(f"{shard}:member{members}", "truncated_tar", f"{path}: {err}")
                return
            if info is None:
                break
            members += 1
            if not info.isfile():
                continue
            member_key, ext = _split_key(info.name)
            if member_key != key:
                if key is not None:
                    yield {"key": key, "shard": shard, "data": data}
                    yielded += 1
                key, data = member_key, {}
            if info.offset_data + info.size > size:
                yield bad_marker(f"{shard}:{member_key}", "truncated_tar", f"{path}: member {info.name} is cut short")
                return
            if want(yielded):
                fh = tf.extractfile(info)
                data[ext] = fh.read() if fh is not None else b""
        if key is not None:
            yield {"key": key, "shard": shard, "data": data}


def _read_meta(data: dict[str, bytes]) -> dict[str, Any]:
    """The ``.json`` member of a raw sample ({} when absent or not an object); raises on bad bytes or JSON."""
    if "json" not in data:
        return {}
    meta = json.loads(data["json"].decode("utf-8"))
    return meta if isinstance(meta, dict) else {}


def _read_caption(data: dict[str, bytes], meta: dict[str, Any]) -> str | None:
    """The caption of a raw sample: its ``.txt`` member, else the json's caption/text field; raises on bad UTF-8."""
    if "txt" in data:
        return data["txt"].decode("utf-8").strip()
    text = meta.get("caption", meta.get("text"))
    return text.strip() if isinstance(text, str) else None


def shard_captions(spec: str | os.PathLike | list[str]) -> Iterator[str]:
    """Every non-empty caption of a set of shards, in shard order, without decoding an image.

    Samples whose caption cannot be read (bad UTF-8 or JSON, a cut-short shard) are left out.
    """
    for path in list_shards(spec):
        for item in _scan_shard(path, lambda i: True):
            if "bad" in item:
                continue
            try:
                caption = _read_caption(item["data"], _read_meta(item["data"]))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if caption:
                yield caption


def decode_shard_sample(item: dict[str, Any], *, require_caption: bool = True, min_size: int = 1,
                        max_pixels: int | None = None, background: Background = "white") -> Sample:  # fmt: skip
    """Turn a raw tar sample into the common sample dict, or a bad marker saying why it cannot be used."""
    if "bad" in item:
        return item
    data, key = item["data"], f"{item['shard']}/{item['key']}"
    try:
        meta = _read_meta(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return bad_marker(key, "non_utf8_caption" if isinstance(err, UnicodeDecodeError) else "bad_row", str(err))
    key = str(meta.get("key", key))
    image_ext = next((ext for ext in IMAGE_EXTS if ext in data), None)
    if image_ext is None:
        return bad_marker(key, "missing_image", f"members: {sorted(data)}")
    try:
        caption = _read_caption(data, meta)
    except UnicodeDecodeError as err:
        return bad_marker(key, "non_utf8_caption", str(err))
    if require_caption and not caption:
        return bad_marker(key, "missing_caption", "no .txt member and no caption in .json")
    try:
        image = read_image_checked(data[image_ext], key, min_size=min_size, max_pixels=max_pixels,
                                   background=background)  # fmt: skip
    except ImageLoadError as err:
        return bad_marker(key, err.reason, str(err))
    label = meta.get("label")
    if label is None and "cls" in data:
        try:
            label = int(data["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            label = None
    sample: Sample = {"image": image, "caption": caption or None, "label": label, "key": key}
    for extra in ("labels", "attributes"):
        if extra in meta:
            sample[extra] = meta[extra]
    return sample


@dataclass
class ShardDataset(IterableDataset):
    """Samples streamed from tar shards, split across ranks and workers, resumable.

    Attributes:
        shards: a directory of ``.tar`` files, a brace pattern, or a list of paths.
        shuffle: shuffle the shard order every epoch (with seed and epoch, the same on every rank).
        shuffle_buffer: block size B of the within-slot shuffle (0 = keep the order in the shards).
        seed: base seed of both shuffles.
        epoch: the epoch a non-endless iteration reads (set it with :meth:`set_epoch`).
        endless: go on to the next epoch instead of stopping.
        rank: distributed rank (defaults to torch.distributed's, else 0).
        world_size: number of ranks (defaults to torch.distributed's, else 1).
        require_caption: samples without a caption are bad ("missing_caption").
        min_size: images smaller than this on either side are bad ("too_small").
        max_pixels: images with more pixels are bad ("decompression_bomb"); None uses PIL's limit.
        background: the color transparent images are flattened onto (white, black or #rrggbb).
    """

    shards: str | os.PathLike | list[str]
    shuffle: bool = False
    shuffle_buffer: int = 0
    seed: int = 0
    epoch: int = 0
    endless: bool = False
    rank: int | None = None
    world_size: int | None = None
    require_caption: bool = True
    min_size: int = 1
    max_pixels: int | None = None
    background: Background = "white"

    def __post_init__(self) -> None:
        super().__init__()
        self.paths = list_shards(self.shards)
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 (0 = no shuffle), got {self.shuffle_buffer}")
        self._resume: dict[str, Any] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a :class:`~qlip.data.sample.StreamTracker` state at the next iteration."""
        self._resume = state

    def _epoch_shards(self, epoch: int) -> list[str]:
        paths = list(self.paths)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(paths))
            paths = [paths[i] for i in order]
        return paths

    def _slot_items(self, epoch: int, slot: int, num_slots: int, skip: int) -> Iterator[dict[str, Any] | None]:
        """The raw items of a slot in one epoch; the first ``skip`` come as None, their data never read."""
        paths = self._epoch_shards(epoch)
        if len(paths) >= num_slots:  # split by shard: every item of a shard belongs to its slot
            count = 0
            for path in paths[slot::num_slots]:
                base = count
                for item in _scan_shard(path, lambda i, base=base: base + i >= skip):
                    count += 1
                    yield None if count <= skip else item
            return
        position = 0  # split by sample: item p of the whole stream belongs to slot p % num_slots
        for path in paths:
            base = position

            def want(i: int, base: int = base) -> bool:
                return (base + i) % num_slots == slot and (base + i) // num_slots >= skip

            for item in _scan_shard(path, want):
                position += 1
                if (position - 1) % num_slots == slot:
                    yield None if (position - 1) // num_slots < skip else item

    def __iter__(self) -> Iterator[Sample]:
        slot, num_slots = current_slot(self.rank, self.world_size)
        if len(self.paths) < num_slots:
            logger.warning("%d shards for %d slots (ranks x workers): splitting by sample, every slot reads every "
                           "shard; write more, smaller shards to read less", len(self.paths), num_slots)  # fmt: skip
        point = resume_point(self._resume, slot, num_slots)
        epoch = self.epoch
        skip = 0
        if point is not None and (point[0] == epoch or (self.endless and point[0] > epoch)):
            epoch, skip = point
        while True:
            yield from self._iter_epoch(epoch, slot, num_slots, skip)
            if not self.endless:
                return
            epoch, skip = epoch + 1, 0

    def _iter_epoch(self, epoch: int, slot: int, num_slots: int, skip: int) -> Iterator[Sample]:
        block = self.shuffle_buffer
        start = (skip // block) * block if block else skip  # rebuild the block the stream stopped in
        emitted = start
        items = (item for item in self._slot_items(epoch, slot, num_slots, start) if item is not None)

        def emit(item: dict[str, Any]) -> Sample:
            sample = decode_shard_sample(item, require_caption=self.require_caption, min_size=self.min_size,
                                         max_pixels=self.max_pixels, background=self.background)  # fmt: skip
            sample["position"] = (slot, num_slots, epoch, emitted)
            return sample

        if not block:
            for item in items:
                emitted += 1
                yield emit(item)
            return
        while True:
            chunk = [item for _, item in zip(range(block), items)]
            if not chunk:
                return
            order = np.random.default_rng([self.seed, epoch, slot, emitted // block]).permutation(len(chunk))
            for i in order:
                emitted += 1
                if emitted > skip:
                    yield emit(chunk[i])


class ShardWriter:
    """Writes samples into tar shards of ``shard_size`` samples each, plus a manifest with counts and checksums.

    Args:
        out_dir: output folder (created).
        shard_size: samples per shard.
        prefix: shard names are ``{prefix}-{index:06d}.tar``.
        image_format: "png" (lossless), "jpg" or "webp".
        quality: JPEG/WebP quality.
    """

    def __init__(self, out_dir: str | os.PathLike, *, shard_size: int = 1000, prefix: str = "data",
                 image_format: str = "png", quality: int = 95) -> None:  # fmt: skip
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1 sample, got {shard_size}")
        if image_format not in ("png", "jpg", "webp"):
            raise ValueError(f"image_format must be png, jpg or webp, got {image_format!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size, self.prefix, self.image_format, self.quality = shard_size, prefix, image_format, quality
        self.shards: list[dict[str, Any]] = []
        self.total = 0
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0
        self._closed = False

    def _open_next(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "count": 0})
        self._in_shard = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        entry = self.shards[-1]
        path = self.out_dir / entry["name"]
        entry["bytes"] = path.stat().st_size
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()

    def _add(self, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mtime = 0  # reproducible shards: the same samples give the same bytes
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(payload))

    def write(self, sample: Sample) -> None:
        """Add one good sample (image, caption, label, and any ``labels`` / ``attributes``)."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for {self.out_dir} is closed; open a new one to write more samples")
        if self._tar is None or self._in_shard >= self.shard_size:
            self._close_current()
            self._open_next()
        tar_key = f"{self.total:09d}"
        buf = io.BytesIO()
        fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[self.image_format]
        options = {} if fmt == "PNG" else {"quality": self.quality}
        sample["image"].save(buf, fmt, **options)
        self._add(f"{tar_key}.{self.image_format}", buf.getvalue())
        if sample.get("caption") is not None:
            self._add(f"{tar_key}.txt", sample["caption"].encode("utf-8"))
        meta = {"key": sample["key"], "label": sample.get("label")}
        for extra in ("labels", "attributes"):
            if extra in sample:
                meta[extra] = sample[extra]
        self._add(f"{tar_key}.json", json.dumps(meta, default=_json_default).encode("utf-8"))
        self.total += 1
        self._in_shard += 1
        self.shards[-1]["count"] += 1

    def close(self, info: dict[str, Any] | None = None) -> Path:
        """Finish the last shard and write ``manifest.json`` (once; later calls change nothing); returns its path."""
        path = self.out_dir / MANIFEST_NAME
        if self._closed:
            return path
        self._closed = True
        self._close_current()
        manifest = {"total": self.total, "shard_size": self.shard_size, "image_format": self.image_format,
                    "shards": self.shards, **({"source": info} if info else {})}  # fmt: skip
        path.write_text(json.dumps(manifest, indent=1))
        return path

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a shard's json")
