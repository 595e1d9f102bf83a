"""Mixed batches of text-only, image-to-text and text-to-image sequences, with the paper's calm-down schedule.

The share of text-only rows starts high (the model begins as a language model) and decays linearly over the first
``horizon`` steps: ratios 60:1:3 (text : image->text : text->image) at step 0, 12:1:3 from ``horizon`` on (the
paper's 10k steps). Each row's kind is drawn from the step's ratios, so a batch mixes all three in expectation.

A batch is a dict: ``ids`` (B, T) int64 right-padded with 0, ``mask`` (B, T-1) bool over the targets ``ids[:, 1:]``
(the split-softmax loss covers them), ``kind`` (B,) int64 (an index into :data:`qlip.unified.model.KINDS`).
Batch ``n`` depends on (seed, rank, n) only, so a resumed run sees the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .model import KINDS, UnifiedConfig, training_row


@dataclass
class MixSchedule:
    """Row ratios (text, image->text, text->image) at ``step``: ``start`` decays linearly to ``end`` over
    ``horizon`` steps (``enabled`` False: ``end`` from the first step)."""

    start: tuple[float, float, float] = (60.0, 1.0, 3.0)
    end: tuple[float, float, float] = (12.0, 1.0, 3.0)
    horizon: int = 10_000
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            r = getattr(self, name)
            if len(r) != 3 or min(r) < 0 or sum(r) <= 0:
                raise ValueError(f"{name} ratios must be three numbers >= 0 (text, image->text, text->image) with a "
                                 f"positive sum, got {list(r)}")  # fmt: skip
        if self.horizon < 0:
            raise ValueError(f"horizon must be >= 0 steps, got {self.horizon}")

    def ratios(self, step: int) -> tuple[float, float, float]:
        if not self.enabled or self.horizon == 0 or step >= self.horizon:
            return tuple(float(x) for x in self.end)
        f = step / self.horizon
        return tuple(float(a + (b - a) * f) for a, b in zip(self.start, self.end))

    def shares(self, step: int) -> tuple[float, float, float]:
        r = self.ratios(step)
        return tuple(x / sum(r) for x in r)


class MixedBatches:
    """Endless mixed batches (module docstring) from a text id stream and image tokens with captions."""

    def __init__(self, cfg: UnifiedConfig, schedule: MixSchedule, *, stream: Tensor, batch_size: int,
                 text_len: int, seed: int, visual: Tensor | None = None, captions: list[list[int]] | None = None,
                 caption_dropout: float = 0.0, rank: int = 0, world_size: int = 1,
                 accum_steps: int = 1) -> None:  # fmt: skip
        """``visual`` (N, T) visual ids of the images and ``captions`` their caption ids (without ``sot`` / ``eot``);
        a text-only schedule (image ratios 0) needs neither (a language model's batches)."""
        if len(stream) <= text_len:
            raise ValueError(f"the text holds {len(stream)} tokens, fewer than one window of {text_len + 1}")
        needs_images = any(r[1] or r[2] for r in (schedule.start, schedule.end))
        if needs_images and (visual is None or captions is None or len(captions) != len(visual) or not captions):
            raise ValueError("image rows need one caption per image, and at least one image")
        self.cfg, self.schedule = cfg, schedule
        self.stream, self.visual, self.captions = stream, visual, captions
        self.batch_size, self.text_len, self.dropout = batch_size, text_len, caption_dropout
        self.seed, self.rank, self.world, self.accum = seed, rank, world_size, accum_steps
        self.count = 0  # micro-batches drawn

    def __iter__(self) -> MixedBatches:
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])

    def __next__(self) -> dict[str, Tensor]:
        step = self.count // self.accum
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.count)
        self.count += 1
        shares = torch.tensor(self.schedule.shares(step))
        kinds = torch.multinomial(shares, self.batch_size, replacement=True, generator=g)  # (B,)
        rows, masks = [], []
        for k in kinds.tolist():
            kind = KINDS[k]
            if kind == "text":
                start = int(torch.randint(0, len(self.stream) - self.text_len, (1,), generator=g))
                ids, mask = training_row(self.cfg, kind, self.stream[start : start + self.text_len + 1].tolist())
            else:
                i = int(torch.randint(0, len(self.captions), (1,), generator=g))
                caption = self.captions[i]
                if kind == "text_to_image" and float(torch.rand((), generator=g)) < self.dropout:
                    caption = []  # the unconditional prompt of classifier-free guidance
                ids, mask = training_row(self.cfg, kind, caption, self.visual[i].tolist())
            rows.append(ids)
            masks.append(mask)
        t = max(map(len, rows))
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        mask = torch.zeros(len(rows), t - 1, dtype=torch.bool)
        for r, (row, m) in enumerate(zip(rows, masks)):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(m)] = torch.tensor(m)
        return {"ids": ids, "mask": mask, "kind": kinds}
