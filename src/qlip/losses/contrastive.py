"""Symmetric CLIP InfoNCE over the global batch (the paper's ``L_align``).

The alignment loss of stage 1 is CLIP's symmetric cross-entropy: with L2-normalized image features ``I`` and text
features ``T`` of the whole (global) batch of ``N`` pairs and the learnable temperature ``s = exp(logit_scale)``::

    logits = s * I @ T^T                                   # (N, N), pair i matches column i
    L_align = (CE(logits, arange(N)) + CE(logits^T, arange(N))) / 2

Written as a sum over rows, ``CE(Q, K)`` is ``mean_i [logsumexp_j(s q_i.k_j) - s q_i.k_i]``, which is what this
module computes. That form gives the two memory-saving variants below without changing the value:

* **Global batch across ranks.** Under ``torch.distributed`` every rank all-gathers the features of all ranks, so
  each pair is contrasted against the global batch (the negatives that make CLIP work). The gather is an autograd
  function (:class:`_GatherWithGrad`): its backward sums the feature gradients of all ranks (reduce-scatter, or an
  all-reduce on gloo) and keeps the local slice, because every rank's loss depends on every rank's features.
* **Local loss** (``local_loss=True``, the open_clip idea): each rank only computes the rows of its own pairs against
  all global columns, labels offset by ``rank * B``. Each rank's loss is then the loss of its own rows; their mean
  over ranks is exactly the global loss, so the gradient (after DDP averages it) is the same, at ``1 / world`` of
  the logit-matrix cost.
* **Chunking** (``chunk_size``): the row log-sum-exps are computed ``chunk_size`` rows at a time under activation
  checkpointing, so neither the forward nor the backward ever holds more than a ``(chunk_size, N)`` block of
  logits; a 32k x 32k matrix (4 GiB in fp32) never exists. Same value and gradient as the unchunked loss, at the
  price of recomputing each block once in the backward.

Gradient scale under DDP: with ``gather_with_grad=True`` the gradient that reaches each rank's local features is
``world_size`` times the single-process gradient of the global loss (each of the ``world_size`` identical or
row-partitioned losses contributes). DDP's gradient averaging divides it back, so a DDP step equals the
single-process step on the global batch. The logit scale receives the plain per-rank gradient and DDP's average is
again the global one. ``gather_with_grad=False`` gathers the other ranks' features as constants (only the local
slice carries gradient): cheaper communication, but the gradient misses the other ranks' rows (an approximation).

All ranks must use the same local batch size (use ``drop_last=True``); the collective itself fails otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def clamp_logit_scale_(param: Tensor, max_value: float = 100.0) -> None:
    """Clamps the LOG logit-scale parameter in place to ``[0, ln(max_value)]`` (CLIP: temperature at most 100).

    Call it after each optimizer step (not inside the loss) so the parameter itself never leaves the range; clamping
    inside the forward would silently zero its gradient.

    Args:
        param: the log-scale parameter (``model.logit_scale``), modified in place.
        max_value: largest allowed ``exp(param)``; must be > 1.
    """
    if not max_value > 1.0 or not math.isfinite(max_value):
        raise ValueError(f"max_value must be a finite number > 1 (the largest exp(logit_scale)), got {max_value}")
    with torch.no_grad():
        param.clamp_(0.0, math.log(max_value))


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` without an initialized one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradients of all ranks and returns the local slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # x: (B, D) -> (world * B, D)
        rank, world = distributed_world()
        ctx.rank, ctx.world, ctx.rows = rank, world, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # grad: (world * B, D) -> (B, D)
        grad = grad.contiguous()
        if dist.get_backend() == "gloo":
            # gloo has no reduce-scatter; an all-reduce moves twice the data but gives the same local slice.
            total = grad.clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]
        local = grad.new_empty((ctx.rows, *grad.shape[1:]))
        dist.reduce_scatter_tensor(local, grad, op=dist.ReduceOp.SUM)
        return local


def gather_features(x: Tensor, *, with_grad: bool = True) -> Tensor:
    """All-gathers ``(B, D)`` features from every rank into ``(world * B, D)``, rank order.

    Args:
        x: the local features.
        with_grad: differentiable gather (gradients of all ranks flow back to each local slice); otherwise the other
            ranks' features are constants and only the local slice (re-inserted as ``x`` itself) carries gradient.

    Returns:
        ``x`` unchanged when not distributed, else the global features.
    """
    rank, world = distributed_world()
    if world == 1:
        return x
    if with_grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    with torch.no_grad():
        dist.all_gather(parts, x.contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


def _row_logsumexp(queries: Tensor, keys: Tensor, scale: Tensor) -> Tensor:
    """``logsumexp_j(scale * q_i . k_j)`` for each query row, in fp32: (C, D), (N, D) -> (C,)."""
    logits = scale * (queries @ keys.t())  # (C, N)
    return torch.logsumexp(logits.float(), dim=1)


def info_nce(queries: Tensor, keys: Tensor, scale: Tensor, *, offset: int = 0, chunk_size: int | None = None) -> Tensor:
    """Mean cross-entropy of each query against all keys, the positive of query ``i`` being key ``offset + i``.

    Args:
        queries: (C, D) query features.
        keys: (N, D) key features, N >= offset + C.
        scale: scalar multiplier of the dot products (the exp'd logit scale).
        offset: index of the first query's positive key (``rank * B`` for the local loss).
        chunk_size: rows of logits per block (None: all at once). Blocks are recomputed in the backward.

    Returns:
        Scalar fp32 loss.
    """
    rows = queries.shape[0]
    positives = keys[offset : offset + rows]
    positive_logits = scale * (queries * positives).sum(dim=-1)  # (C,) the diagonal, without the matrix
    if chunk_size is None or chunk_size >= rows:
        lse = _row_logsumexp(queries, keys, scale)
    else:
        blocks = []
        for start in range(0, rows, chunk_size):
            block = queries[start : start + chunk_size]
            if torch.is_grad_enabled() and (block.requires_grad or keys.requires_grad or scale.requires_grad):
                # Keep only the inputs of each block; its (chunk, N) logits are rebuilt in the backward.
                blocks.append(checkpoint(_row_logsumexp, block, keys, scale, use_reentrant=False))
            else:
                blocks.append(_row_logsumexp(block, keys, scale))
        lse = torch.cat(blocks)
    return (lse - positive_logits.float()).mean()


class ClipLoss(nn.Module):
    """Symmetric CLIP InfoNCE over the global batch (``L_align``); see the module docstring for the variants."""

    def __init__(self, *, local_loss: bool = False, gather_with_grad: bool = True, chunk_size: int | None = None):
        """
        Args:
            local_loss: under torch.distributed, compute only this rank's rows against all global columns.
            gather_with_grad: differentiable all-gather (exact gradients); False treats other ranks as constants.
            chunk_size: compute the logits this many rows at a time (None: the whole matrix at once).
        """
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}")
        self.local_loss = local_loss  # local rows vs. global columns: 1/world of the matrix, same expected gradient
        self.gather_with_grad = gather_with_grad  # exact gradient across ranks (one extra collective in backward)
        self.chunk_size = chunk_size  # bounds logits memory to (chunk_size, N)

    def forward(self, image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor) -> Tensor:
        """
        Args:
            image_embeds: (B_local, D) L2-normalized image features of this rank.
            text_embeds: (B_local, D) L2-normalized text features, row i paired with image row i.
            logit_scale: scalar, already exponentiated (clamping the log parameter is the trainer's job, see
                :func:`clamp_logit_scale_`).

        Returns:
            Scalar fp32 loss: the global loss, or with ``local_loss`` this rank's share (whose mean over ranks is the
            global loss).
        """
        if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 2:
            raise ValueError(
                f"image_embeds and text_embeds must both be (B, D) with the same shape, got "
                f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
            )
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
        scale = logit_scale.reshape(())
        rank, world = distributed_world()
        rows = image_embeds.shape[0]
        all_images = gather_features(image_embeds, with_grad=self.gather_with_grad)  # (world * B, D)
        all_texts = gather_features(text_embeds, with_grad=self.gather_with_grad)
        if self.local_loss or world == 1:
            queries_img, queries_txt, offset = image_embeds, text_embeds, rank * rows
        else:
            queries_img, queries_txt, offset = all_images, all_texts, 0
        image_to_text = info_nce(queries_img, all_texts, scale, offset=offset, chunk_size=self.chunk_size)
        text_to_image = info_nce(queries_txt, all_images, scale, offset=offset, chunk_size=self.chunk_size)
        return (image_to_text + text_to_image) / 2
