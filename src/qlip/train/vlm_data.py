"""The training batches of the VLM task (``task: vlm``): which conversations a rank's batch n holds, and, when the
tower's features stream (``vlm.features: stream``), their images, read by DataLoader workers.

Batch n of rank r is a pure function of (seed, r, n): batch n % per_epoch of epoch n // per_epoch, where an epoch
is a seeded permutation of the items split across the ranks (each rank takes every world_size-th item, as a
DistributedSampler does), and the shapes questions draw from an rng seeded by (seed, r, n). A checkpoint thus only
needs how many batches a rank has drawn: a resumed run makes the same batches, whatever workers had prefetched.

An image that cannot be read mid-run drops its conversation from the batch; the bad-sample counter of the data
pipeline (:class:`qlip.data.sample.BadSampleCounter`) names it in the log, counts it, and stops the run only past
``data.max_bad_fraction``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import BadSampleCounter, ShapesConfig


class PackedRecords(Sequence):
    """LLaVA records ({"image", "turns", "key"}) packed into one byte buffer, a JSON text per record.

    A list of 665K records is millions of Python objects; forked DataLoader workers would each come to copy the
    pages that hold them, since reading an object writes its reference count. One numpy buffer is never written, so
    the workers share it with their rank, and it is about half the size.
    """

    def __init__(self, records: Sequence[dict[str, Any]]) -> None:
        data, ends = bytearray(), np.empty(len(records), dtype=np.int64)
        for i, r in enumerate(records):
            data += json.dumps([str(r["image"]), r["turns"], r["key"]], ensure_ascii=False).encode()
            ends[i] = len(data)
        self._data = np.frombuffer(bytes(data), dtype=np.uint8)
        self._ends = ends

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        index %= len(self)
        start = int(self._ends[index - 1]) if index else 0
        image, turns, key = json.loads(self._data[start : self._ends[index]].tobytes())
        return {"image": Path(image), "turns": [tuple(t) for t in turns], "key": key}

    @property
    def nbytes(self) -> int:
        return self._data.nbytes + self._ends.nbytes


@dataclass
class ConversationItems:
    """The training items a worker makes batches of: LLaVA records or shapes images (no model: cheap to copy).

    Attributes:
        count: how many items (records, or shapes training images 0 .. count-1).
        records: LLaVA records ({"image", "turns", "key"}, e.g. :class:`PackedRecords`); None for shapes.
        shapes: the shapes configuration; None for LLaVA records.
        seed: the run's seed (shapes images and their questions).
        image_size: the tower's input resolution.
        yesno_share: the share of shapes questions that are yes/no questions (0 = every type equally often).
        reword: the share of shapes training questions reworded (:func:`qlip.understanding.data.reword`).
    """

    count: int
    records: Sequence[dict[str, Any]] | None = None
    shapes: ShapesConfig | None = None
    seed: int = 0
    image_size: int = 224
    yesno_share: float = 0.0
    reword: float = 0.0

    def conversation(self, kind: str, index: int, rng: np.random.Generator) -> list[tuple[str, str]]:
        """The turns of item ``index``: its record's, or a fresh shapes question ("qa") or caption ("caption")."""
        from ..understanding.data import shapes_conversation

        if self.records is not None:
            return self.records[index]["turns"]
        return shapes_conversation(index, self.shapes, split="train", seed=self.seed, kind=kind, rng=rng,
                                   yesno_share=self.yesno_share, reword_share=self.reword)["turns"]  # fmt: skip

    def image(self, index: int) -> Any:
        """The PIL image of item ``index``; raises ImageLoadError (or OSError) when it cannot be read."""
        from ..data.shapes import generate_shapes_sample
        from ..transforms import load_image

        if self.records is not None:
            return load_image(self.records[index]["image"])
        return generate_shapes_sample(index, self.shapes, split="train", seed=self.seed)["image"]

    def name(self, index: int) -> str:
        return f"record {self.records[index]['key']}" if self.records is not None else f"shapes image {index}"


class BatchPlan:
    """Which items a rank's batch n holds, and of which kind ("caption" for the first ``caption_batches``)."""

    def __init__(self, items: int, batch_size: int, seed: int, rank: int, world_size: int, *, default_kind: str,
                 caption_batches: int = 0) -> None:  # fmt: skip
        shard = len(range(rank, items, world_size))
        if shard < 1:
            raise ValueError(f"{items} training item(s) for {world_size} ranks: every rank needs at least one")
        self.items, self.seed, self.rank, self.world = items, seed, rank, world_size
        self.size = min(batch_size, shard)
        self.per_epoch = shard // self.size  # an epoch's last, incomplete batch is dropped
        self.default_kind, self.caption_batches = default_kind, caption_batches
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.items, generator=g)[self.rank :: self.world]
        return self._order

    def indices(self, n: int) -> torch.Tensor:
        epoch, k = divmod(n, self.per_epoch)
        return self._epoch_order(epoch)[k * self.size : (k + 1) * self.size]

    def kind(self, n: int) -> str:
        return "caption" if n < self.caption_batches else self.default_kind

    def rng(self, n: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, n])


class _NumberedBatches(Dataset):
    """Item n is the plan's batch n: its conversations and, with ``images``, its images at the tower's input."""

    def __init__(self, plan: BatchPlan, items: ConversationItems, *, images: bool) -> None:
        from ..transforms import image_transform

        self.plan, self.items = plan, items
        self.transform = image_transform(items.image_size) if images else None

    def __getitem__(self, n: int) -> dict[str, Any]:
        from ..transforms import ImageLoadError

        kind, rng = self.plan.kind(n), self.plan.rng(n)
        index, turns, pixels, bad = [], [], [], []
        for i in self.plan.indices(n).tolist():
            conversation = self.items.conversation(kind, i, rng)  # drawn first: a dropped item leaves the rng as is
            if self.transform is not None:
                try:
                    pixels.append(self.transform(self.items.image(i)))
                except (ImageLoadError, OSError) as e:
                    bad.append((self.items.name(i), getattr(e, "reason", "corrupt"), str(e)))
                    continue
            index.append(i)
            turns.append(conversation)
        out = {"number": n, "index": torch.tensor(index, dtype=torch.long), "turns": turns,
               "stage": 1 if kind == "caption" else 2, "bad_items": bad}  # fmt: skip
        if self.transform is not None:
            s = self.items.image_size
            out["pixels"] = torch.stack(pixels) if pixels else torch.empty(0, 3, s, s)
        return out


class _CountFrom(Sampler[int]):
    """start, start + 1, ... without end: the batch numbers still to make."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def _as_made(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class ConversationBatches:
    """A rank's endless, resumable training batches: {"index", "turns", "stage"}, and "pixels" (B, 3, S, S) when
    ``images`` (the tower's features stream). Made by ``workers`` DataLoader processes (0: in this process)."""

    def __init__(self, plan: BatchPlan, items: ConversationItems, *, images: bool, workers: int,
                 counter: BadSampleCounter) -> None:  # fmt: skip
        self.plan, self.items, self.images, self.workers = plan, items, images, workers
        self.counter = counter
        self.calls = 0  # batches drawn (kept or all bad): the number of the next one
        self._iter: Iterator[dict[str, Any]] | None = None

    def _loader(self) -> DataLoader:
        return DataLoader(
            _NumberedBatches(self.plan, self.items, images=self.images),
            batch_size=None,
            sampler=_CountFrom(self.calls),
            num_workers=self.workers,
            collate_fn=_as_made,
            pin_memory=self.images and torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.plan.seed),  # the global RNG stays untouched
        )

    def __iter__(self) -> ConversationBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._iter is None:
                self._iter = iter(self._loader())
            batch = next(self._iter)
            self.calls = batch["number"] + 1
            self.counter.update({"key": batch["index"].tolist(), "bad_items": batch["bad_items"]})
            if len(batch["index"]):
                return batch

    @property
    def bad(self) -> int:
        """Conversations dropped so far for an unreadable image (each time one was drawn)."""
        return self.counter.total

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "counter": self.counter.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        if "counter" in state:  # a checkpoint from before images streamed has none
            self.counter.load_state_dict(state["counter"])
        self._iter = None
