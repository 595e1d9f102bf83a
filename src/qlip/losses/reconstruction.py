"""Pixel reconstruction losses (the paper's ``L_mse`` of stage 1 and stage 2).

Both are computed in the space the model reconstructs in (CLIP-normalized pixels), in fp32 so a
bf16 autocast region does not round the small residuals of a good reconstruction away.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

PIXEL_LOSS_KINDS = ("mse", "l1")


def pixel_loss(recon: Tensor, target: Tensor, kind: str = "mse") -> Tensor:
    """Mean pixel loss between a reconstruction and its target.

    Args:
        recon: (B, C, H, W) reconstruction.
        target: (B, C, H, W) target, same shape (it is not differentiated through if it does not require grad).
        kind: ``"mse"`` (mean squared error, the paper's ``L_mse``) or ``"l1"`` (mean absolute error).

    Returns:
        Scalar fp32 loss, averaged over every element.
    """
    if recon.shape != target.shape:
        raise ValueError(
            f"recon and target must have the same shape, got {tuple(recon.shape)} and {tuple(target.shape)}; "
            "resize the target to the model's image size first"
        )
    if kind == "mse":
        return F.mse_loss(recon.float(), target.float())
    if kind == "l1":
        return F.l1_loss(recon.float(), target.float())
    raise ValueError(f"unknown pixel loss kind {kind!r}; choose one of {PIXEL_LOSS_KINDS}")
