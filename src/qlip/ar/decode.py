"""Incremental decoding of a token-vocabulary :class:`ARTransformer` with its KV cache (language models).

Models whose steps are not plain tokens (the image-token codecs of qlip.generation) write their own loop over
:meth:`ARTransformer.forward_embeds` with a cache and a :class:`qlip.ar.sampling.Chooser`, as this one does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .model import ARTransformer
from .sampling import Chooser


@torch.no_grad()
def decode(core: ARTransformer, prompt: Tensor, max_new_tokens: int, chooser: Chooser, *,
           prompt_mask: Tensor | None = None, use_cache: bool = True,
           logits_processor: Callable[[Tensor, int], Tensor] | None = None,
           stop_id: int | None = None) -> Tensor:  # fmt: skip
    """Continue ``prompt`` (copies*B, T) by ``max_new_tokens`` ids -> (B, max_new_tokens).

    ``core``: an :class:`ARTransformer` with a vocabulary, or a module that wraps one with the same
    ``core(ids, cache=, key_padding_mask=) -> logits`` and ``core.new_cache(rows, max_len=)`` (the unified model).

    With a guided chooser the prompt rows are the B conditional prompts followed by the B unconditional ones; the
    chosen ids are fed to both halves. ``prompt_mask`` (copies*B, T) bool marks real prompt tokens (False: padding).
    ``use_cache=False`` recomputes the whole sequence at every step (the reference for the cache).
    ``logits_processor(logits, step)`` rewrites each step's logits (copies*B, V) before the choice (e.g. -inf outside
    the vocabulary the step may use). ``stop_id``: stop once every row has chosen it (the result is then shorter;
    ids after a row's stop are whatever was drawn).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rows, t = prompt.shape
    cache = core.new_cache(rows, max_len=t + max_new_tokens) if use_cache else None
    logits = core(prompt, cache=cache, key_padding_mask=prompt_mask)[:, -1]
    seq, mask, out = prompt, prompt_mask, []
    stopped = None
    for step in range(max_new_tokens):
        if logits_processor is not None:
            logits = logits_processor(logits, step)
        ids = chooser(logits)  # (B,)
        out.append(ids)
        if stop_id is not None:
            stopped = (ids == stop_id) if stopped is None else stopped | (ids == stop_id)
        if step == max_new_tokens - 1 or (stopped is not None and bool(stopped.all())):
            break
        fed = ids.repeat(chooser.copies)[:, None]  # (copies*B, 1)
        if cache is not None:
            logits = core(fed, cache=cache)[:, -1]
        else:
            seq = torch.cat([seq, fed], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(fed, dtype=torch.bool)], dim=1)
            logits = core(seq, key_padding_mask=mask)[:, -1]
    return torch.stack(out, dim=1)
