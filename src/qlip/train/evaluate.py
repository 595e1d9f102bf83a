"""Periodic held-out checks during training (issue 4, part 8): zero-shot accuracy on the shapes tasks,
reconstruction PSNR, codebook usage, and a PNG grid of originals above their reconstructions."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..eval.metrics import psnr
from ..models.qlip import QLIP
from ..quantizers.bsq import usage_stats
from ..transforms import to_uint8

log = logging.getLogger(__name__)

USED_BIT_ENTROPY = 0.9  # a bit counts as used when its usage entropy over the held-out set exceeds this (bits)


def save_grid(originals: torch.Tensor, recons: torch.Tensor, path: str | Path) -> Path:
    """Two rows: originals on top, reconstructions below (CLIP-normalized inputs)."""
    top = to_uint8(originals).permute(0, 2, 3, 1).numpy()  # (n, H, W, 3)
    bottom = to_uint8(recons).permute(0, 2, 3, 1).numpy()
    grid = np.concatenate([np.concatenate(list(top), axis=1), np.concatenate(list(bottom), axis=1)], axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


@torch.no_grad()
def evaluate(model: QLIP, batches: Sequence[Mapping[str, Any]], *, tokenizer: Any = None,
             tasks: Mapping[str, Any] | None = None, device: torch.device, autocast_dtype: torch.dtype | None = None,
             grid_path: str | Path | None = None, grid_images: int = 8) -> dict[str, Any]:  # fmt: skip
    """Held-out metrics of ``model`` (put in eval mode here; the caller restores train mode).

    Returns:
        Flat dict: ``psnr``, ``bits_used_fraction`` (share of bits with usage entropy > 0.9 bit),
        ``mean_bit_entropy``, ``distinct_codes``, ``code_entropy``, ``num_tokens``, and ``zeroshot/<task>`` top-1
        accuracies when the model has a text tower and tasks are given.
    """
    model.eval()
    results: dict[str, Any] = {}
    if not batches:
        return results
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    scores, all_indices = [], []
    first = None
    if model.decoder is not None and model.quantizer is not None:
        for batch in batches:
            images = batch["image"].to(device)
            with autocast:
                recon = model.reconstruct(images).float()
                all_indices.append(model.encode(images, output="indices").reshape(-1).cpu())
            scores.append(psnr(to_uint8(images), to_uint8(recon)))
            if first is None:
                first = (images[:grid_images].cpu(), recon[:grid_images].cpu())
        values = torch.cat(scores)
        results["psnr"] = float(values[torch.isfinite(values)].mean()) if torch.isfinite(values).any() else float("inf")
        stats = usage_stats(torch.cat(all_indices), model.num_bits)
        results["bits_used_fraction"] = float((stats["bit_entropy"] > USED_BIT_ENTROPY).float().mean())
        for key in ("mean_bit_entropy", "distinct_codes", "code_entropy", "num_tokens"):
            results[key] = stats[key].item()
        if grid_path is not None and first is not None:
            save_grid(*first, grid_path)
    if model.text is not None and tokenizer is not None and tasks:
        from ..eval.zero_shot import evaluate_zero_shot_tasks

        with autocast:
            zs = evaluate_zero_shot_tasks(model, tokenizer, batches, tasks, topk=(1,), device=device)
        for name, summary in zs.items():
            results[f"zeroshot/{name}"] = float(summary["top1"])
    return results
