"""Caption conditioning: a frozen text encoder's per-token states, projected into the generator's prefix.

* :class:`FrozenTextEncoder` wraps an encoder (default: the QLIP model's own text tower,
  :meth:`qlip.models.text.TextEncoder.token_states`) and returns ``(states (B, L, Wt), mask (B, L) bool)``. Its
  weights never train and are not saved with the generator (they live in the QLIP model the generator carries).
* :class:`CaptionPrefix` (trainable) maps the states to the model width and, for the rows chosen for caption
  dropout, replaces the whole prefix by a learned null condition (all positions valid): the unconditional branch
  of classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import dataclass_from_dict

CONDITIONING_ENCODERS = ("qlip",)


@dataclass
class ConditioningConfig:
    """``encoder``: which text encoder ("qlip": the QLIP model's text tower). ``context_length`` / ``width``: the
    encoder's token count and state width. ``dropout``: probability of replacing a caption by the null condition
    in training."""

    encoder: str = "qlip"
    context_length: int = 77
    width: int = 512
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.encoder not in CONDITIONING_ENCODERS:
            raise ValueError(f"unknown text encoder {self.encoder!r}; choose one of {CONDITIONING_ENCODERS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"caption dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConditioningConfig:
        return dataclass_from_dict(cls, d, where="conditioning")


class FrozenTextEncoder(nn.Module):
    """A QLIP text tower used as a frozen feature extractor: ids (B, L) -> (states (B, L, Wt), mask (B, L))."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.encoder = text_encoder.requires_grad_(False).eval()

    @property
    def width(self) -> int:
        return self.encoder.cfg.width

    @property
    def context_length(self) -> int:
        return self.encoder.cfg.context_length

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        super().train(mode)
        self.encoder.eval()  # frozen: never in training mode
        return self

    @torch.no_grad()
    def forward(self, text_ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder.token_states(text_ids), self.encoder.text_mask(text_ids)


class CaptionPrefix(nn.Module):
    """states (B, L, Wt) -> prefix (B, L, W) by a two-layer MLP; dropped rows get the learned null prefix."""

    def __init__(self, text_width: int, width: int, context_length: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(text_width, width), nn.GELU(), nn.Linear(width, width))
        self.null = nn.Parameter(torch.randn(context_length, width) * 0.02)

    def forward(self, states: Tensor, mask: Tensor, drop: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """drop: (B,) bool, True for the rows that get the null condition. Returns (prefix, mask)."""
        prefix = self.proj(states.to(self.null.dtype))
        if drop is None:
            return prefix, mask
        prefix = torch.where(drop[:, None, None], self.null.to(prefix.dtype).expand_as(prefix), prefix)
        return prefix, mask | drop[:, None]

    def null_prefix(self, batch: int) -> tuple[Tensor, Tensor]:
        """The unconditional prefix (B, L, W) and its mask (all True)."""
        prefix = self.null.expand(batch, -1, -1)
        return prefix, torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
