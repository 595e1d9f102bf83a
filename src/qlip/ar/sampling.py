"""Sampling from logits: temperature, top-k, top-p (nucleus), seeded generators, classifier-free guidance.

Every function works on the last dimension of ``logits`` (..., V), so one call serves a batch of positions.

* :func:`filter_logits` sets the logits outside the top-k / nucleus to -inf.
* :func:`sample` draws ids with a ``torch.Generator`` (reproducible for a seed); ``temperature=0`` is greedy.
* :func:`cfg_logits` mixes conditional and unconditional logits (batch doubling: run the conditional rows and the
  null-condition rows in one batch, split the logits, combine).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError naming the first argument out of range."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = no top-k filtering), got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1] (1 = no nucleus filtering), got {top_p}")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits with everything outside the top-k and outside the nucleus set to -inf.

    top_k: keep the k largest (0 = all; ties at the k-th value are all kept). top_p: keep the smallest set of the
    largest probabilities whose mass is >= p (the most probable token is always kept; 1 = all).
    """
    check_sampling_args(1.0, top_k, top_p)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more probable tokens
        drop_sorted = mass_before >= top_p  # already enough mass without this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """Ids (...) drawn from logits (..., V) after temperature and filtering; temperature 0 takes the argmax."""
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def cfg_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond); scale 1 gives cond, 0 gives uncond."""
    return uncond + scale * (cond - uncond)


def check_cfg_scale(scale: float) -> None:
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"cfg_scale must be a finite number >= 0 (1 = no guidance), got {scale}")


class Chooser:
    """Turns the logits of one decoding step into ids: CFG over a doubled batch, then :func:`sample`.

    With guidance the logits come as (2B, ...): the B conditional rows, then the B unconditional rows; the result
    has B rows. Without guidance (``guided=False``) logits and ids have B rows. Codecs call this once per choice.
    """

    def __init__(self, *, guided: bool, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None):  # fmt: skip
        check_cfg_scale(cfg_scale)
        check_sampling_args(temperature, top_k, top_p)
        self.guided, self.cfg_scale = guided, float(cfg_scale)
        self.temperature, self.top_k, self.top_p, self.generator = float(temperature), int(top_k), top_p, generator

    @property
    def copies(self) -> int:
        """Rows of the model batch per sample (2 with guidance)."""
        return 2 if self.guided else 1

    def __call__(self, logits: Tensor) -> Tensor:
        if self.guided:
            cond, uncond = logits.float().chunk(2, dim=0)
            logits = cfg_logits(cond, uncond, self.cfg_scale)
        return sample(logits, self.temperature, self.top_k, self.top_p, self.generator)
