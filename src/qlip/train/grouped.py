"""Hard-negative batches for the built-in shapes data (the demo's lever against attribute shortcuts).

Contrastive training on shapes learns color and position first; once those identify almost every pair of a
batch the loss hardly asks for the shape any more (measured: zero-shot shape ~30% while color and position reach
~100%). Grouped batches put ``group_size`` images that share some attributes (e.g. color and position) next to
each other, so inside a group only the remaining attributes (shape, size) separate the captions.

The stream reads the same indices as :class:`~qlip.data.shapes.ShapesDataset` (slot s of n reads s, s + n, ...),
buckets them by the grouped attributes, and emits each batch as ``n_groups`` groups (the bucket whose oldest
sample is oldest first) plus the oldest remaining samples. The batch order is a deterministic function of the
index sequence, and the attributes of an index are drawn without rendering the image, so resuming replays the
bucketing of the batches already consumed (microseconds per sample) and continues exactly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset

from ..data.sample import current_slot, resume_point
from ..data.shapes import ShapesConfig, ShapesDataset, shapes_attributes


class GroupedShapesDataset(IterableDataset):
    """Endless training stream of shapes samples ordered into hard-negative batches of ``batch_size``.

    Args:
        config: the shapes configuration.
        seed: generation seed (as for ShapesDataset).
        batch_size: samples per batch (the DataLoader must use the same).
        group_by: attributes shared inside a group ("shape", "color", "position", "size").
        group_size: samples per group.
        grouped_fraction: share of each batch made of groups.
        rank, world_size: distributed split (default: torch.distributed's).
    """

    def __init__(self, config: ShapesConfig, *, seed: int, batch_size: int, group_by: list[str], group_size: int,
                 grouped_fraction: float, rank: int | None = None, world_size: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.source = ShapesDataset(config, split="train", seed=seed, rank=rank, world_size=world_size)
        self.config, self.seed = config, seed
        self.batch_size, self.group_by, self.group_size = batch_size, tuple(group_by), group_size
        self.n_groups = int(round(grouped_fraction * batch_size / group_size))
        self.rank, self.world_size = rank, world_size
        self._resume: dict[str, Any] | None = None

    @property
    def tasks(self):
        return self.source.tasks

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state

    def _key(self, index: int) -> tuple:
        first = shapes_attributes(index, self.config, split="train", seed=self.seed)[0]
        return tuple(first[a] for a in self.group_by)

    def batch_indices(self, slot: int, num_slots: int) -> Iterator[list[int]]:
        """The index lists of this slot's batches, in order (no image is rendered here)."""
        pulled = 0
        waiting: OrderedDict[int, tuple] = OrderedDict()  # index -> key, in arrival order
        buckets: dict[tuple, list[int]] = {}

        def pull() -> None:
            nonlocal pulled
            index = slot + pulled * num_slots
            pulled += 1
            key = self._key(index)
            waiting[index] = key
            buckets.setdefault(key, []).append(index)

        def take(index: int) -> int:
            buckets[waiting.pop(index)].remove(index)
            return index

        while True:
            batch: list[int] = []
            for _ in range(self.n_groups):
                while True:
                    full = [k for k, members in buckets.items() if len(members) >= self.group_size]
                    if full:
                        break
                    pull()
                key = min(full, key=lambda k: buckets[k][0])
                batch += [take(i) for i in list(buckets[key][: self.group_size])]
            while len(batch) < self.batch_size:
                if not waiting:
                    pull()
                batch.append(take(next(iter(waiting))))
            yield batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, num_slots = current_slot(self.rank, self.world_size)
        point = resume_point(self._resume, slot, num_slots)
        done = point[1] if point else 0
        for emitted, indices in enumerate(self.batch_indices(slot, num_slots), start=1):
            if emitted <= done:
                continue  # replayed: consumed before the checkpoint
            for index in indices:
                sample = self.source[index]
                sample["position"] = (slot, num_slots, 0, emitted)
                yield sample
