"""The sample interface shared by every data source, and the bad-sample policy (docs/data.md, "Bad data").

A good sample is a dict::

    {"image": PIL RGB image, "caption": str | None, "label": int | None, "key": str}

(``shapes`` samples add ``"labels"``: task -> int and ``"attributes"``). A sample that could not be read is
*not* raised: the source yields a bad marker ``{"key": ..., "bad": reason, "detail": message}`` instead, so that
the reason travels with the stream through DataLoader workers to the collate function, which drops it and counts
it in the batch (``batch["bad"]``). Streaming sources also attach ``"position"`` (see :class:`StreamTracker`) so
the trainer can save where the stream stands and resume without repeating or skipping samples.

:class:`BadSampleCounter` logs each reason once, keeps counts by reason and stops the run with a clear error when
the bad fraction passes a threshold (after a minimum number of samples, so that a few early failures do not).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..transforms import Background, ImageLoadError, load_image

logger = logging.getLogger(__name__)

Sample = dict[str, Any]

# Reasons a sample can be skipped, with what a user should know about each.
BAD_REASONS = {
    "missing_file": "the listed image file does not exist",
    "empty": "zero-byte image file",
    "unknown_format": "not a recognised image format",
    "corrupt": "truncated or corrupt image data",
    "decompression_bomb": "image has more pixels than the limit",
    "too_small": "image smaller than the configured minimum size",
    "missing_caption": "no caption (or an empty one) for a source that needs captions",
    "non_utf8_caption": "caption bytes are not valid UTF-8",
    "missing_image": "tar sample without an image member",
    "truncated_tar": "tar member cut short (the rest of the shard is skipped)",
    "bad_shard": "tar shard that cannot be opened",
    "bad_row": "caption-file row that could not be parsed",
}


class BadDataError(RuntimeError):
    """Raised when the fraction of bad samples passes the configured maximum."""


@dataclass(frozen=True)
class ClassificationTask:
    """One classification task over a dataset's labels, for zero-shot evaluation and linear probes.

    Attributes:
        classnames: one name per class, in label order.
        templates: prompt format strings, each with exactly one ``{}`` for the class name; zero-shot averages the
            text embeddings over them.
        label_key: None reads ``sample["label"]`` (``batch["label"]``); a string reads ``sample["labels"][label_key]``
            (``batch["labels"][label_key]``), as the ``shapes`` tasks do.
    """

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    label_key: str | None = None


def bad_marker(key: str, reason: str, detail: str = "") -> Sample:
    """A placeholder yielded in place of a sample that could not be read."""
    return {"key": key, "bad": reason, "detail": detail}


def is_bad(sample: Mapping[str, Any]) -> bool:
    """Whether ``sample`` is a bad marker rather than a readable sample."""
    return "bad" in sample


@dataclass
class BadSampleCounter:
    """Counts good and bad samples by reason; logs each reason once; enforces a maximum bad fraction.

    Attributes:
        max_bad_fraction: stop with :class:`BadDataError` when bad / seen exceeds this (1.0 never stops).
        min_samples: do not judge the fraction before this many samples were seen.
        name: the data source, used in log lines and errors.
        counts: number of bad samples by reason.
        seen: number of samples seen, good and bad.
        examples: the first few keys (and details) of bad samples, by reason.
    """

    max_bad_fraction: float = 0.5
    min_samples: int = 100
    name: str = "data"
    counts: dict[str, int] = field(default_factory=dict)
    seen: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")

    @property
    def total(self) -> int:
        """Number of bad samples, all reasons together."""
        return sum(self.counts.values())

    @property
    def bad_fraction(self) -> float:
        return self.total / self.seen if self.seen else 0.0

    def good(self, n: int = 1) -> None:
        """Record ``n`` readable samples."""
        self.seen += n
        self._check()

    def bad(self, reason: str, key: str = "", detail: str = "", n: int = 1) -> None:
        """Record ``n`` skipped samples for ``reason``; the first of each reason is logged as a warning."""
        if reason not in self.counts:
            why = BAD_REASONS.get(reason, reason)
            logger.warning("%s: skipping bad sample %s (%s: %s); further '%s' samples are counted, not logged",
                           self.name, key or "?", reason, detail or why, reason)
        self.counts[reason] = self.counts.get(reason, 0) + n
        self.seen += n
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples and key:
            examples.append(f"{key}: {detail}" if detail else key)
        self._check()

    def record(self, sample: Mapping[str, Any]) -> None:
        """Record one sample or bad marker."""
        if is_bad(sample):
            self.bad(sample["bad"], sample.get("key", ""), sample.get("detail", ""))
        else:
            self.good()

    def update(self, batch: Mapping[str, Any]) -> None:
        """Add the counts a collated batch carries (``batch["bad"]`` and the number of good samples)."""
        items = batch.get("bad_items")
        if items:  # the collator names each bad sample, so the log line can name its file
            for key, reason, detail in items:
                self.bad(reason, key, detail)
        else:
            for reason, n in batch.get("bad", {}).items():
                self.bad(reason, n=n)
        self.good(len(batch.get("key", [])))

    def _check(self) -> None:
        if self.seen >= self.min_samples and self.bad_fraction > self.max_bad_fraction:
            raise BadDataError(
                f"{self.name}: {self.total} of {self.seen} samples ({self.bad_fraction:.0%}) are bad, more than the "
                f"allowed {self.max_bad_fraction:.0%}: {self.summary()}. Check the data with `qlip data check`, "
                "or raise max_bad_fraction if this is expected."
            )

    def summary(self) -> str:
        """One line: seen, bad and the count per reason."""
        parts = ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items()))
        return f"{self.seen} samples seen, {self.total} bad" + (f" ({parts})" if parts else "")

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = dict(state["counts"])
        self.seen = int(state["seen"])


def read_image_checked(source: Any, key: str, *, min_size: int = 1, max_pixels: int | None = None,
                       background: Background = "white") -> Image.Image:  # fmt: skip
    """Load an image as RGB (transparency flattened onto ``background``), treating images smaller than ``min_size``
    on either side as bad.

    Raises:
        ImageLoadError: with ``reason`` set (see :data:`BAD_REASONS`).
    """
    img = load_image(source, name=key, max_pixels=max_pixels, background=background)
    if min(img.size) < min_size:
        raise ImageLoadError(
            f"image {key} is {img.size[0]}x{img.size[1]}, smaller than min_size={min_size}; lower min_size to keep it",
            "too_small",
        )
    return img


def count_samples(samples: Iterable[Mapping[str, Any]], counter: BadSampleCounter) -> list[Mapping[str, Any]]:
    """Record every sample in ``counter`` and return the good ones (for small, in-memory uses and tests)."""
    good = []
    for sample in samples:
        counter.record(sample)
        if not is_bad(sample):
            good.append(sample)
    return good


class StreamTracker:
    """Follows the stream position that streaming sources attach to samples, for exact resume.

    A streaming source (shards, shapes) splits its stream into ``num_slots`` = world_size x num_workers slots and
    tags every sample and bad marker with ``position = (slot, epoch, emitted)``: ``emitted`` is how many items that
    slot has produced in that epoch, this one included. The collate function keeps the latest position per slot in
    ``batch["position"]``; feed each consumed batch to :meth:`update`, save :meth:`state_dict` with the checkpoint
    and pass it to the source's ``load_state_dict`` before building the DataLoader. Batches that workers had
    prefetched but the trainer never consumed are produced again, so resuming neither repeats nor skips.
    """

    def __init__(self) -> None:
        self.num_slots: int | None = None
        self.slots: dict[int, tuple[int, int]] = {}

    def update(self, batch: Mapping[str, Any]) -> None:
        for slot, (num_slots, epoch, emitted) in batch.get("position", {}).items():
            if self.num_slots is not None and num_slots != self.num_slots:
                raise ValueError(f"stream slots changed from {self.num_slots} to {num_slots} within one run")
            self.num_slots = num_slots
            prev = self.slots.get(slot)
            if prev is None or (epoch, emitted) > prev:
                self.slots[slot] = (epoch, emitted)

    def state_dict(self) -> dict[str, Any]:
        return {"num_slots": self.num_slots, "slots": {int(k): list(v) for k, v in self.slots.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.num_slots = state["num_slots"]
        self.slots = {int(k): (int(v[0]), int(v[1])) for k, v in state["slots"].items()}


def current_slot(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's (slot, num_slots) in a stream split across distributed ranks and DataLoader workers.

    Args:
        rank: this process's rank; defaults to torch.distributed's when it is initialized, else 0.
        world_size: number of ranks; defaults to torch.distributed's when it is initialized, else 1.

    Returns:
        slot = rank * num_workers + worker_id, and num_slots = world_size * num_workers.
    """
    import torch.distributed as dist
    from torch.utils.data import get_worker_info

    if rank is None or world_size is None:
        initialized = dist.is_available() and dist.is_initialized()
        rank = (dist.get_rank() if initialized else 0) if rank is None else rank
        world_size = (dist.get_world_size() if initialized else 1) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


def resume_point(state: Mapping[str, Any] | None, slot: int, num_slots: int) -> tuple[int, int] | None:
    """(epoch, emitted) where ``slot`` stopped according to a :class:`StreamTracker` state, or None to start fresh."""
    if not state or state.get("num_slots") is None:
        return None
    if state["num_slots"] != num_slots:
        raise ValueError(
            f"cannot resume the data stream: it was saved with {state['num_slots']} slots (ranks x workers) and is "
            f"now read with {num_slots}; resume with the same world size and number of DataLoader workers"
        )
    point = state["slots"].get(slot, state["slots"].get(str(slot)))
    return None if point is None else (int(point[0]), int(point[1]))
