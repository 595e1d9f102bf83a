"""One evaluation stage's batches, with a progress bar and the skipped samples counted by reason.

An evaluation over a large folder runs for minutes; :class:`TrackedBatches` wraps the batches a stage consumes
(zero-shot, the linear probe's two feature passes, reconstruction) so that a person sees a tqdm bar on stderr
(images, rate, time left when the total is known), and the report can say how many samples were skipped and why.

The loader's collate function drops unreadable samples and states them in each batch (``batch["bad"]``: reason ->
count, see :mod:`qlip.data.sample`); the loader's own :class:`~qlip.data.sample.BadSampleCounter` already logs
each reason once and stops a run past its bad-fraction limit. This class only totals what reached the stage.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

from ..progress import progress_bar


class TrackedBatches:
    """Iterate ``batches`` with a progress bar and count images and skipped samples.

    Args:
        batches: collated batches (``"image"`` (B, 3, S, S) and optionally ``"bad"``: reason -> count).
        desc: the stage, shown before the bar ("zero-shot", "recon", ...).
        total: samples the stage will read (readable or not), when known (a bar with a time estimate); None
            shows a count only.
        progress: False never shows a bar (a quiet run); True shows one when ``stream`` is a terminal
            (:func:`qlip.progress.progress_bar`).
        stream: where the bar goes; defaults to stderr, so that piped output stays clean.

    Attributes:
        images: readable images seen so far.
        skipped: reason -> number of samples dropped before this stage (see :data:`qlip.data.BAD_REASONS`).
        examples: reason -> the keys of the first few samples dropped for it (``batch["bad_items"]``).
    """

    max_examples = 5

    def __init__(self, batches: Iterable[Mapping[str, Any]], *, desc: str, total: int | None = None,
                 progress: bool = True, stream: TextIO | None = None) -> None:  # fmt: skip
        self.batches = batches
        self.desc = desc
        self.total = total
        self.progress = progress
        self.stream = stream
        self.images = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        with progress_bar(desc=self.desc, total=self.total, unit="img", enabled=self.progress,
                          stream=self.stream) as bar:  # fmt: skip
            for batch in self.batches:
                n, bad = int(batch["image"].shape[0]), batch.get("bad") or {}
                self.images += n
                self.skipped.update(bad)
                for key, reason, _ in batch.get("bad_items") or ():
                    names = self.examples.setdefault(reason, [])
                    if len(names) < self.max_examples:
                        names.append(key)
                bar.update(n + sum(bad.values()))  # samples read, so that a total of len(dataset) is reached
                if self.skipped:
                    bar.set_postfix(skipped=sum(self.skipped.values()), refresh=False)
                yield batch

    def skipped_counts(self) -> dict[str, int]:
        """Skipped samples by reason, sorted by reason (empty when none were skipped)."""
        return {reason: int(n) for reason, n in sorted(self.skipped.items()) if n}

