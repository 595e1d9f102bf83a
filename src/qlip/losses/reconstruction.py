"""Pixel reconstruction losses (the paper's ``L_mse`` of stage 1 and stage 2).

Both are computed in the space the model reconstructs in (CLIP-normalized pixels), in fp32 so a
bf16 autocast region does not round the small residuals of a good reconstruction away.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

PIXEL_LOSS_KINDS = ("mse", "l1")


def pixel_loss(recon: Tensor, target: Tensor, kind: str = "mse", gradient_weight: float = 0.0) -> Tensor:
    """Mean pixel loss between a reconstruction and its target, plus an optional image-gradient term.

    The gradient term (``gradient_weight`` times the mean squared difference of the horizontal and vertical
    finite differences of the two images) weighs outlines: a plain pixel loss over images that are mostly flat
    background spends the code's bits on the background's exact color and blurs a small object's corners.

    Args:
        recon: (B, C, H, W) reconstruction.
        target: (B, C, H, W) target, same shape (it is not differentiated through if it does not require grad).
        kind: ``"mse"`` (mean squared error, the paper's ``L_mse``) or ``"l1"`` (mean absolute error).
        gradient_weight: weight of the image-gradient term (0: none, the paper's loss).

    Returns:
        Scalar fp32 loss, averaged over every element.
    """
    if recon.shape != target.shape:
        raise ValueError(
            f"recon and target must have the same shape, got {tuple(recon.shape)} and {tuple(target.shape)}; "
            "resize the target to the model's image size first"
        )
    if kind not in PIXEL_LOSS_KINDS:
        raise ValueError(f"unknown pixel loss kind {kind!r}; choose one of {PIXEL_LOSS_KINDS}")
    recon, target = recon.float(), target.float()
    loss = F.mse_loss(recon, target) if kind == "mse" else F.l1_loss(recon, target)
    if gradient_weight:
        loss = loss + gradient_weight * gradient_loss(recon, target)
    return loss


def gradient_loss(recon: Tensor, target: Tensor) -> Tensor:
    """Mean squared difference of the images' horizontal and vertical finite differences (B, C, H, W)."""
    dx = F.mse_loss(recon.diff(dim=-1), target.diff(dim=-1))
    dy = F.mse_loss(recon.diff(dim=-2), target.diff(dim=-2))
    return 0.5 * (dx + dy)
