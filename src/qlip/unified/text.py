"""Text as the language model sees it: one id stream of ``sot doc eot`` documents, windows of it, perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .model import UnifiedLM


def token_stream(tokenizer: Any, documents: Sequence[str]) -> Tensor:
    """Every document as ``sot ids eot``, concatenated: (N,) int64."""
    ids: list[int] = []
    for doc in documents:
        ids += [tokenizer.sot_token_id, *tokenizer.encode(doc), tokenizer.eot_token_id]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: Tensor, length: int) -> Tensor:
    """Non-overlapping windows (n, length) of the stream (the last partial one is left out)."""
    n = (len(stream) - 1) // (length - 1)
    if n < 1:
        raise ValueError(f"the text holds {len(stream)} tokens, fewer than one window of {length}; give more text")
    starts = torch.arange(n) * (length - 1)  # each window's last id is the next one's first input
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


@torch.no_grad()
def perplexity(lm: UnifiedLM, stream: Tensor, length: int, *, batch_size: int = 16,
               max_windows: int | None = None) -> float:  # fmt: skip
    """exp(mean NLL per text token) of the stream under ``lm`` (split softmax: the text ids' softmax), over
    non-overlapping windows of ``length`` ids (``max_windows``: the first ones only)."""
    was_training = lm.training
    lm.eval()
    rows = windows(stream, length)
    if max_windows is not None:
        rows = rows[:max_windows]
    total, count = 0.0, 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size].to(lm.device)
            nll = lm.nll(batch, torch.ones_like(batch[:, 1:], dtype=torch.bool))
            total += float(nll.double().sum())
            count += nll.numel()
    finally:
        lm.train(was_training)
    return math.exp(total / count)
