"""Training data: the endless, resumable batch stream, the held-out set and the text tokenizer.

Streaming sources (``shapes``, tar shards) split themselves across ranks and workers and tag every sample with its
stream position; a :class:`~qlip.data.sample.StreamTracker` follows the consumed batches so a checkpoint can
resume the stream exactly. Map-style sources (class folders, caption lists) are read through
:class:`ResumableSampler`: a seeded permutation per epoch, split across ranks, that can start in the middle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, Subset

from ..data import BadSampleCounter, SampleCollator, ShapesConfig, ShapesDataset, StreamTracker, build_dataset
from ..data.loader import describe_source
from ..data.shapes import generate_shapes_sample
from ..tokenizer import CLIPTokenizer, train_bpe
from ..transforms import image_transform
from .config import ConfigError, DataSection

log = logging.getLogger(__name__)


def shapes_config(data: DataSection, image_size: int) -> ShapesConfig:
    """The ShapesConfig of a ``shapes[:preset]`` spec with ``data.shapes`` overrides, at the model's size."""
    preset = data.train.partition(":")[2] or "default"
    overrides = {"image_size": image_size, **data.shapes}
    try:
        return ShapesConfig.preset(preset, **overrides)
    except TypeError as e:
        raise ConfigError(f"data.shapes={data.shapes}: {e}; see qlip.data.ShapesConfig for the fields") from e


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of a map-style dataset of ``n`` samples: a seeded random ``fraction``
    held out (at least one sample), both sorted; the same on every rank and every resume."""
    n_val = max(1, int(round(n * fraction)))
    if n - n_val < 1:
        raise ConfigError(f"data.val_fraction={fraction} holds out all {n} samples of data.train; lower it")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def _split_training_list(data: DataSection, dataset: Any, seed: int, part: int) -> Any:
    """``dataset`` without (part 0) or only (part 1) the samples ``data.val_fraction`` holds out."""
    if isinstance(dataset, IterableDataset):
        raise ConfigError(f"data.val_fraction holds out part of a caption list or class folder, but data.train="
                          f"{data.train} is a stream; set data.val to held-out data instead")  # fmt: skip
    return Subset(dataset, holdout_split(len(dataset), data.val_fraction, seed)[part])


def _captions_of(dataset: Any) -> list[str]:
    """The captions of a caption list (or a subset of one) without reading its images; [] for other sources."""
    if isinstance(dataset, IterableDataset):
        return []
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    if not hasattr(dataset, "caption_of"):
        return []
    return [c for c in (dataset.caption_of(i) for i in indices) if c is not None]


def warn_truncated_captions(dataset: Any, tokenizer: Any, where: str) -> None:
    """Log once how many captions of a caption list the tokenizer will cut to its context."""
    if tokenizer is not None and hasattr(tokenizer, "warn_truncated"):
        captions = _captions_of(dataset)
        if captions:
            tokenizer.warn_truncated(captions, where=where)


def held_out_description(data: DataSection) -> str | None:
    """Which held-out data the periodic checks read, in words (None when there is none)."""
    if data.val is not None:
        return f"data.val={data.val}"
    if data.val_fraction:
        return (f"{data.val_fraction:.1%} of data.train={data.train} held out by data.val_fraction (by seed, "
                "left out of training)")  # fmt: skip
    if describe_source(data.train) == "shapes":
        return f"the val split of {data.train}"
    return None


class ResumableSampler(Sampler[int]):
    """Endless sampler for map-style datasets: epoch e visits a permutation seeded by (seed, e), rank r takes
    every world-th index; ``start`` skips indices already consumed so a resumed run continues where it stopped."""

    def __init__(self, n: int, *, seed: int, rank: int, world_size: int, shuffle: bool = True) -> None:
        if n < world_size:
            raise ValueError(f"the dataset has {n} samples, fewer than the {world_size} ranks")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world_size
        self.shuffle = shuffle
        self.epoch, self.offset = 0, 0  # offset: indices of this epoch already handed out (this rank)

    def __iter__(self) -> Iterator[int]:
        while True:
            if self.shuffle:
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            else:
                order = torch.arange(self.n)
            mine = order[self.rank :: self.world].tolist()
            mine = mine[: self.n // self.world]  # equal share per rank
            for i in mine[self.offset :]:
                self.offset += 1
                yield i
            self.epoch, self.offset = self.epoch + 1, 0


class BatchStream:
    """An endless iterator of collated training batches, with a resumable position.

    ``state_dict`` describes what the trainer has consumed (not what workers prefetched), so resuming neither
    repeats nor skips samples.
    """

    def __init__(self, data: DataSection, *, image_size: int, tokenizer: Any, seed: int, rank: int,
                 world_size: int) -> None:  # fmt: skip
        self.data, self.rank, self.world = data, rank, world_size
        self.kind = describe_source(data.train)
        transform = image_transform(image_size, train=data.augment, hflip=data.hflip, resize=data.resize,
                                    scale=tuple(data.crop_scale), background=data.background)  # fmt: skip
        self.counter = BadSampleCounter(max_bad_fraction=data.max_bad_fraction, name=data.train)
        self.collate = SampleCollator(transform, tokenizer)
        groups = data.shapes_training
        if self.kind == "shapes" and groups.group_by:
            from .grouped import GroupedShapesDataset

            self.dataset = GroupedShapesDataset(shapes_config(data, image_size), seed=seed,
                                                batch_size=data.batch_size, group_by=groups.group_by,
                                                group_size=groups.group_size,
                                                grouped_fraction=groups.grouped_fraction, rank=rank,
                                                world_size=world_size)  # fmt: skip
        elif self.kind == "shapes":
            self.dataset = ShapesDataset(shapes_config(data, image_size), split="train", seed=seed, rank=rank,
                                         world_size=world_size)  # fmt: skip
        else:
            try:
                self.dataset = build_dataset(data.train, seed=seed, shuffle=True, endless=True, rank=rank,
                                             world_size=world_size, shuffle_buffer=data.shuffle_buffer,
                                             background=data.background)  # fmt: skip
            except (FileNotFoundError, ValueError) as e:  # a missing path, an empty or malformed list
                raise ConfigError(f"data.train={data.train}: {e}") from e
        if data.val is None and data.val_fraction:
            self.dataset = _split_training_list(data, self.dataset, seed, part=0)
        if rank == 0:
            warn_truncated_captions(self.dataset, tokenizer, data.train)
        self.streaming = isinstance(self.dataset, IterableDataset)
        self.tracker = StreamTracker()
        self.sampler = None if self.streaming else ResumableSampler(len(self.dataset), seed=seed, rank=rank,
                                                                    world_size=world_size)  # fmt: skip
        self._position = 0  # map-style: samples this rank's trainer consumed since the sampler's epoch 0
        self._iter: Iterator[dict[str, Any]] | None = None

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.data.batch_size,
            sampler=self.sampler,
            num_workers=self.data.num_workers,
            collate_fn=self.collate,
            drop_last=not self.streaming,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.data.num_workers > 0,
        )

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._iter is None:
                self._iter = iter(self._loader())
            try:
                batch = next(self._iter)
            except StopIteration:  # a finite stream ended: start its next pass
                self._iter = None
                continue
            self.counter.update(batch)
            if self.streaming:
                self.tracker.update(batch)
            else:
                self._position += len(batch["key"]) + sum(batch["bad"].values())
            if len(batch["key"]) == 0:
                continue  # every sample of this batch was bad
            return batch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"counter": self.counter.state_dict()}
        if self.streaming:
            state["stream"] = self.tracker.state_dict()
        else:
            state["sampler"] = {"position": self._position}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counter.load_state_dict(state["counter"])
        if self.streaming and state.get("stream"):
            self.tracker.load_state_dict(state["stream"])
            self.dataset.load_state_dict(state["stream"])
        elif not self.streaming and state.get("sampler"):
            self._position = int(state["sampler"]["position"])
            self.sampler.epoch, self.sampler.offset = divmod(self._position, self.sampler.n // self.world)
        self._iter = None


def held_out_batches(data: DataSection, *, image_size: int, tokenizer: Any, num_samples: int, batch_size: int,
                     seed: int) -> list[dict[str, Any]]:  # fmt: skip
    """The held-out set as a list of collated batches: ``data.val``, the ``val`` split of shapes, or the part of a
    caption list or class folder ``data.val_fraction`` holds out of training (see :func:`held_out_description`)."""
    transform = image_transform(image_size, train=False, resize=data.resize, background=data.background)
    collate = SampleCollator(transform, tokenizer)
    if data.val is None and not data.val_fraction and describe_source(data.train) == "shapes":
        cfg = shapes_config(data, image_size)
        samples = [generate_shapes_sample(i, cfg, split="val", seed=seed) for i in range(num_samples)]
    elif data.val is not None or data.val_fraction:
        key, spec = ("data.val", data.val) if data.val is not None else ("data.train", data.train)
        try:
            options = {} if describe_source(spec) == "shapes" else {"background": data.background}
            ds = build_dataset(spec, split="val", seed=seed, length=num_samples, rank=0, world_size=1, **options)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{key}={spec}: {e}") from e
        if data.val is None:
            ds = _split_training_list(data, ds, seed, part=1)
        if not isinstance(ds, IterableDataset) and len(ds) > num_samples:
            ds = Subset(ds, range(num_samples))
        warn_truncated_captions(ds, tokenizer, f"held-out {spec}")
        samples = []
        for i, s in enumerate(ds if isinstance(ds, IterableDataset) else (ds[j] for j in range(len(ds)))):
            if i >= num_samples:
                break
            samples.append(s)
    else:
        return []
    return [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def build_tokenizer(data: DataSection, *, init_dir: str | None, context_length: int, vocab_size: int,
                    seed: int) -> CLIPTokenizer:  # fmt: skip
    """The text tokenizer: ``data.tokenizer``, else the init checkpoint's, else (shapes) a BPE trained now.

    The start-up BPE sees ``data.shapes_training.bpe_captions`` training captions generated deterministically from
    the seed, so every rank (and every resume) builds the same vocabulary.
    """
    for directory in (data.tokenizer, init_dir):
        if directory and (Path(directory) / "vocab.json").is_file():
            tok = CLIPTokenizer.from_pretrained(directory)
            break
    else:
        if describe_source(data.train) != "shapes":
            raise ConfigError(
                f"no tokenizer for {data.train}: set data.tokenizer=DIR (a folder with vocab.json + merges.txt, e.g. a "
                "released QLIP model) or init=DIR with one, or train one with `qlip tokenizer train`"
            )
        cfg = shapes_config(data, 32)
        captions = [generate_shapes_sample(i, cfg, split="train", seed=seed)["caption"] for i in
                    range(data.shapes_training.bpe_captions)]  # fmt: skip
        tok = train_bpe(captions, min(data.shapes_training.bpe_vocab_size, vocab_size))
    if len(tok.get_vocab()) > vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tok.get_vocab())} tokens but the text tower only {vocab_size}; use a model whose "
            "text.vocab_size is large enough or a smaller data.shapes_training.bpe_vocab_size"
        )
    tok.context_length = context_length
    return tok
