"""One entry point for every data source, the collate function, and DataLoader construction.

``build_dataset(spec)`` understands:

* ``shapes`` or ``shapes:<preset>`` (easy / default / hard): the built-in procedural dataset;
* a folder of ``.tar`` files, a ``.tar`` path or a brace pattern (``data-{000000..000099}.tar``): tar shards;
* a ``.csv`` / ``.tsv`` / ``.jsonl`` file: image-caption pairs;
* any other folder: one subfolder per class (ImageNet layout).

The collate function turns samples into tensors (``image``, ``text``, ``label``, ``labels``), drops bad markers
and reports them in ``batch["bad"]`` (reason -> count), and passes the stream positions on for resuming.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .captions import CAPTION_FILE_SUFFIXES, CaptionFileDataset
from .folder import ImageFolderDataset
from .sample import BadSampleCounter, Sample, is_bad
from .shapes import ShapesConfig, ShapesDataset
from .shards import ShardDataset

logger = logging.getLogger(__name__)

Tokenizer = Callable[[list[str]], torch.Tensor]


def shapes_config_from_spec(spec: str, image_size: int | None = None) -> ShapesConfig:
    """The :class:`ShapesConfig` a ``shapes[:preset][?field=value&...]`` spec names.

    ``shapes:easy?sizes=large&holdout_combinations=0.1`` is the ``easy`` preset with those fields changed; a
    tuple field takes a comma-separated list (``colors=red,blue``). ``image_size`` (the
    model's resolution) applies unless the spec sets it.
    """
    import dataclasses

    head, _, query = spec.partition("?")
    preset = head.partition(":")[2] or "default"
    defaults = ShapesConfig()
    fields = {f.name for f in dataclasses.fields(ShapesConfig)}
    overrides: dict[str, Any] = {"image_size": image_size} if image_size else {}
    for item in filter(None, query.split("&")):
        key, eq, text = item.partition("=")
        if key not in fields or not eq:
            raise ValueError(f"{spec!r}: {item!r} is not field=value with a shapes field; fields: {sorted(fields)}")
        default = getattr(defaults, key)
        try:
            if isinstance(default, tuple):
                value: Any = tuple(v.strip() for v in text.split(",") if v.strip())
            elif isinstance(default, (int, float)):
                value = type(default)(text)
            else:
                value = text
        except ValueError as e:
            raise ValueError(f"{spec!r}: {key}={text!r} ({e})") from None
        overrides[key] = value
    return ShapesConfig.preset(preset, **overrides)


def describe_source(spec: str) -> str:
    """Which kind of source ``spec`` names: "shapes", "shards", "captions" or "folder"."""
    if spec == "shapes" or spec.startswith(("shapes:", "shapes?")):
        return "shapes"
    if spec.lower().endswith(CAPTION_FILE_SUFFIXES):
        return "captions"
    if spec.endswith(".tar") or "{" in spec or "::" in spec:
        return "shards"
    if os.path.isdir(spec):
        return "shards" if any(Path(spec).glob("*.tar")) else "folder"
    raise FileNotFoundError(
        f"data source {spec!r} is neither 'shapes[:preset]', an existing folder, a .tar / brace pattern of shards, "
        f"nor a caption list ending in {CAPTION_FILE_SUFFIXES}"
    )


def build_dataset(
    spec: str,
    *,
    split: str = "train",
    seed: int = 0,
    length: int | None = None,
    shapes_config: ShapesConfig | None = None,
    image_size: int | None = None,
    shuffle: bool = False,
    shuffle_buffer: int = 0,
    endless: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    min_size: int = 1,
    max_pixels: int | None = None,
    **options: Any,
) -> Dataset:
    """Build the dataset a spec string names (see the module docstring).

    Args:
        spec: "shapes[:preset]", a shard folder / pattern, a caption list, or a class folder.
        split: shapes only: "train", "val" or "test".
        seed: shapes: the generation seed; shards: the shuffle seed.
        length: shapes only: number of samples (None = endless).
        shapes_config: shapes only: the full configuration (overrides the preset).
        image_size: shapes only: the generated resolution (when no shapes_config is given).
        shuffle: shards only: shuffle the shard order every epoch.
        shuffle_buffer: shards only: block size of the within-slot shuffle.
        endless: shards only: loop over epochs.
        rank: streaming sources: distributed rank (default from torch.distributed).
        world_size: streaming sources: number of ranks (default from torch.distributed).
        min_size: real data: images smaller than this on a side are bad.
        max_pixels: real data: larger images are bad (decompression bombs).
        **options: passed to the source's dataset class (e.g. caption_key, caption_template).

    Returns:
        A map-style dataset (folder, captions) or an iterable one (shapes, shards); all yield the common samples.
    """
    kind = describe_source(spec)
    if kind == "shapes":
        config = shapes_config or shapes_config_from_spec(spec, image_size=image_size)
        return ShapesDataset(config, split=split, seed=seed, length=length, rank=rank, world_size=world_size)
    if kind == "shards":
        return ShardDataset(spec, shuffle=shuffle, shuffle_buffer=shuffle_buffer, seed=seed, endless=endless,
                            rank=rank, world_size=world_size, min_size=min_size, max_pixels=max_pixels,
                            **options)  # fmt: skip
    if kind == "captions":
        return CaptionFileDataset(spec, min_size=min_size, max_pixels=max_pixels, **options)
    return ImageFolderDataset(spec, min_size=min_size, max_pixels=max_pixels, **options)


def read_captions(spec: str, *, image_key: str | None = None, caption_key: str | None = None,
                  caption_template: str | None = None) -> list[str]:  # fmt: skip
    """Every caption a training source gives, read without decoding an image (for training a tokenizer).

    Args:
        spec: a caption list, tar shards, or a class folder (with ``caption_template``).
        image_key: caption lists: the image path column (None: the default names).
        caption_key: caption lists: the caption column (None: the default names).
        caption_template: class folders: the caption of an image of class ``c`` is ``caption_template.format(c)``.

    Raises:
        ValueError: the source has no captions (shapes brings its own; a class folder needs a template).
        FileNotFoundError: the source does not exist.
    """
    kind = describe_source(spec)
    if kind == "captions":
        ds = CaptionFileDataset(spec, image_key=image_key, caption_key=caption_key)
        return [c for c in (ds.caption_of(i) for i in range(len(ds))) if c is not None]
    if kind == "shards":
        from .shards import shard_captions

        return list(shard_captions(spec))
    if kind == "folder":
        if not caption_template:
            raise ValueError(f"{spec} is a class folder, whose images have no captions; give a caption template "
                             "such as 'a photo of a {}.' to caption each image by its class")  # fmt: skip
        folder = ImageFolderDataset(spec, caption_template=caption_template)
        return [caption_template.format(folder.classnames[label]) for _, label in folder.files]
    raise ValueError(f"{spec}: the shapes data writes its own captions; the trainer trains its tokenizer on them "
                     "(data.shapes_training.bpe_*)")  # fmt: skip


class SampleCollator:
    """Turns a list of samples (and bad markers) into a batch; picklable, so it runs inside DataLoader workers.

    The batch::

        {"image": (B, 3, S, S) float, "label": LongTensor (B,) (-1 where unknown), "key": list[str],
         "caption": list[str | None], "text": LongTensor (B, L) (when a tokenizer is given and every sample has a
         caption), "labels": {task: LongTensor (B,)} (shapes), "bad": {reason: count},
         "bad_items": [(key, reason, detail)], "position": {slot: ...}}

    Bad markers are dropped, so B can be smaller than the batch size (even 0: skip such a batch).

    Args:
        transform: PIL image -> (3, S, S) tensor (see :func:`qlip.transforms.image_transform`).
        tokenizer: list of captions -> LongTensor (B, L); optional.
        counter: if given, every sample is recorded in it (inside the worker: logs once per reason, and raises
            :class:`~qlip.data.sample.BadDataError` when the bad fraction passes its maximum).
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor], tokenizer: Tokenizer | None = None,
                 counter: BadSampleCounter | None = None) -> None:  # fmt: skip
        self.transform = transform
        self.tokenizer = tokenizer
        self.counter = counter

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        good = [s for s in samples if not is_bad(s)]
        bad = Counter(s["bad"] for s in samples if is_bad(s))
        if self.counter is not None:
            for s in samples:
                self.counter.record(s)
        if good and getattr(self.transform, "uses_caption", False):  # a flip that keeps captions true
            images = torch.stack([self.transform(s["image"], caption=s.get("caption")) for s in good])
        elif good:
            images = torch.stack([self.transform(s["image"]) for s in good])  # (B, 3, S, S)
        else:
            size = getattr(self.transform, "image_size", 0)
            images = torch.empty(0, 3, size, size)
        labels = [s.get("label") for s in good]
        batch: dict[str, Any] = {
            "image": images,
            "label": torch.tensor([-1 if v is None else int(v) for v in labels], dtype=torch.long),
            "key": [s["key"] for s in good],
            "caption": [s.get("caption") for s in good],
            "bad": dict(bad),
            "bad_items": [(s.get("key", ""), s["bad"], s.get("detail", "")) for s in samples if is_bad(s)],
        }
        captions = batch["caption"]
        if self.tokenizer is not None and good and all(c is not None for c in captions):
            batch["text"] = self.tokenizer(list(captions))
        if good and all("labels" in s for s in good):
            tasks = good[0]["labels"].keys()
            batch["labels"] = {t: torch.tensor([int(s["labels"][t]) for s in good], dtype=torch.long) for t in tasks}
        positions: dict[int, tuple[int, int, int]] = {}
        for s in samples:
            if "position" in s:
                slot, num_slots, epoch, emitted = s["position"]
                prev = positions.get(slot)
                if prev is None or (epoch, emitted) > prev[1:]:
                    positions[slot] = (num_slots, epoch, emitted)
        if positions:
            batch["position"] = positions
        return batch


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    transform: Callable[[Any], torch.Tensor],
    tokenizer: Tokenizer | None = None,
    num_workers: int = 0,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    max_bad_fraction: float = 0.5,
    min_samples: int = 100,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over any of the datasets above, with the common collate and the bad-data limit.

    Map-style datasets (folder, captions) are shuffled by the DataLoader and split across ranks with a
    DistributedSampler when torch.distributed is initialized; streaming datasets split themselves.
    """
    counter = BadSampleCounter(max_bad_fraction=max_bad_fraction, min_samples=min_samples,
                               name=type(dataset).__name__)  # fmt: skip
    collate = SampleCollator(transform, tokenizer, counter)
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    iterable = isinstance(dataset, IterableDataset)
    if not iterable and torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=(shuffle and not iterable and sampler is None),
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=False,
    )


def iter_samples(dataset: Dataset, limit: int | None = None) -> Iterator[Sample]:
    """Every item of a dataset (good samples and bad markers), in order; at most ``limit`` of them."""
    if isinstance(dataset, IterableDataset):
        source: Iterator[Sample] = iter(dataset)
    else:
        source = (dataset[i] for i in range(len(dataset)))
    for n, sample in enumerate(source):
        if limit is not None and n >= limit:
            return
        yield sample
