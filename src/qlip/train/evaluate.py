"""Periodic held-out checks during training: zero-shot accuracy on the shapes tasks, image-text retrieval on data
with real captions, reconstruction PSNR / SSIM, codebook usage, and a PNG grid of originals above their
reconstructions.

The numbers come from the evaluation harness (:mod:`qlip.eval`) and are stated in its one vocabulary
(:mod:`qlip.eval.schema`), so a training log, a ``qlip eval`` report and the experiments' tables agree.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..eval.schema import summary_metrics
from ..fileio import atomic_write
from ..models.qlip import QLIP

log = logging.getLogger(__name__)


def save_grid(originals: torch.Tensor, recons: torch.Tensor, path: str | Path) -> Path:
    """Two rows: originals on top, reconstructions below (uint8 (n, 3, H, W) each)."""
    top = originals.permute(0, 2, 3, 1).numpy()  # (n, H, W, 3)
    bottom = recons.permute(0, 2, 3, 1).numpy()
    grid = np.concatenate([np.concatenate(list(top), axis=1), np.concatenate(list(bottom), axis=1)], axis=0)
    return atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


@torch.no_grad()
def evaluate(model: QLIP, batches: Sequence[Mapping[str, Any]], *, tokenizer: Any = None,
             tasks: Mapping[str, Any] | None = None, device: torch.device, autocast_dtype: torch.dtype | None = None,
             grid_path: str | Path | None = None, grid_images: int = 8,
             retrieval: bool = False) -> dict[str, Any]:  # fmt: skip
    """Held-out metrics of ``model`` (put in eval mode here; the caller restores train mode).

    Args:
        retrieval: also rank images against captions (the batches carry them, tokenized in ``batch["text"]``).

    Returns:
        The flat metrics of :mod:`qlip.eval.schema` that the model's parts allow: ``psnr``, ``ssim``,
        ``distinct_codes``, ``code_entropy``, ``mean_bit_entropy``, ``bits_used`` with a quantizer and decoder;
        ``zs/<task>`` and ``zs/mean`` (percent) with a text tower, a tokenizer and tasks; ``i2t/...`` and ``t2i/...``
        with a text tower and ``retrieval``; ``num_eval``.
    """
    from ..eval.recon import evaluate_reconstruction
    from ..eval.retrieval import evaluate_retrieval
    from ..eval.zero_shot import evaluate_zero_shot_tasks

    model.eval()
    if not batches:
        return {}
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    recon, zero_shot, ranked = None, None, None
    if model.decoder is not None and model.quantizer is not None:
        keep = grid_images if grid_path is not None else 0
        with autocast:
            result = evaluate_reconstruction(model, batches, keep_examples=keep, device=device)
        recon = result.metrics
        if grid_path is not None and result.originals.shape[0] > 0:
            save_grid(result.originals, result.reconstructions, grid_path)
    if model.text is not None and tokenizer is not None and tasks:
        with autocast:
            zero_shot = evaluate_zero_shot_tasks(model, tokenizer, batches, tasks, topk=(1,), device=device)
    if model.text is not None and retrieval:
        with autocast:
            ranked = evaluate_retrieval(model, batches, tokenizer=tokenizer, device=device)
    return summary_metrics(zero_shot=zero_shot, recon=recon, retrieval=ranked)
