"""Caption conditioning: a frozen text encoder's per-token states, projected into the generator's prefix.

* :class:`FrozenTextEncoder` wraps an encoder (default: the QLIP model's own text tower,
  :meth:`qlip.models.text.TextEncoder.token_states`; or a Hugging Face text encoder, :class:`qlip.hf.HFTextEncoder`,
  which has the same interface) and returns ``(states (B, L, Wt), mask (B, L) bool)``. Its weights never train and
  are not saved with the generator (they live in the QLIP model the generator carries, or in the Hugging Face
  folder that ``conditioning.encoder`` names).
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

QLIP_ENCODER = "qlip"
HF_ENCODER_PREFIX = "hf:"


def hf_encoder_source(encoder: str) -> str | None:
    """The Hugging Face source of an ``encoder`` setting ("hf:minilm" -> "minilm"), None for the QLIP text tower;
    ValueError for anything else."""
    if encoder == QLIP_ENCODER:
        return None
    if encoder.startswith(HF_ENCODER_PREFIX) and encoder[len(HF_ENCODER_PREFIX) :].strip():
        return encoder[len(HF_ENCODER_PREFIX) :]
    raise ValueError(f'unknown text encoder {encoder!r}; choose "{QLIP_ENCODER}" (the QLIP model\'s text tower) or '
                     f'"{HF_ENCODER_PREFIX}<source>" (a Hugging Face text encoder: "hf:minilm" or '
                     '"hf:/path/to/folder")')


@dataclass
class ConditioningConfig:
    """``encoder``: which text encoder ("qlip": the QLIP model's text tower; "hf:<source>": a Hugging Face text
    encoder, see :func:`qlip.hf.load_text_encoder`). ``context_length`` / ``width``: the encoder's token count and
    state width. ``dropout``: probability of replacing a caption by the null condition in training."""

    encoder: str = QLIP_ENCODER
    context_length: int = 77
    width: int = 512
    dropout: float = 0.1

    def __post_init__(self) -> None:
        hf_encoder_source(self.encoder)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"caption dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConditioningConfig:
        return dataclass_from_dict(cls, d, where="conditioning")


class FrozenTextEncoder(nn.Module):
    """A text tower used as a frozen feature extractor: ids (B, L) -> (states (B, L, Wt), mask (B, L)).

    The tower needs ``cfg.width``, ``cfg.context_length``, ``token_states(ids)`` and ``text_mask(ids)``.
    """

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
