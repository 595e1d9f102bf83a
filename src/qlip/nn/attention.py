"""Multi-head self-attention with separate q/k/v projections, optional sub-LN and RoPE (every tower).

The fast path calls ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU); the explicit
``reference`` path is kept for tests and benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

ATTENTION_IMPLS = ("sdpa", "reference")


def reference_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d)) v, written out; q, k, v: (B, H, N, Dh). Softmax in float32."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
    if causal:
        n = q.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


class Attention(nn.Module):
    """Self-attention. Key names: q, k, v, proj, inner_norm (sub-LN over the concatenated heads)."""

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        k_bias: bool = True,
        subln: bool = False,
        eps: float = 1e-6,
        causal: bool = False,
    ):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.causal = causal
        self.impl = "sdpa"
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width, bias=k_bias)
        self.v = nn.Linear(width, width)
        self.inner_norm = nn.LayerNorm(width, eps=eps) if subln else nn.Identity()
        self.proj = nn.Linear(width, width)
        self.qkv: nn.Linear | None = None  # set by fuse_projections() (inference copies only)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Replace q, k, v by one (width -> 3 width) Linear: one matmul and one input cast instead of three.

        For inference copies (the fast paths of qlip.inference): the state dict changes shape. Same math, but a
        differently blocked matmul rounds differently, so the exact float32 paths do not use it.
        """
        q, k, v = self.q, self.k, self.v
        fused = nn.Linear(q.in_features, 3 * q.out_features, device=q.weight.device, dtype=q.weight.dtype)
        fused.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        k_bias = k.bias if k.bias is not None else torch.zeros_like(q.bias)
        fused.bias.copy_(torch.cat([q.bias, k_bias, v.bias]))
        self.qkv = fused
        del self.q, self.k, self.v

    def forward(self, x: Tensor, rope: nn.Module | None = None) -> Tensor:
        if self.qkv is not None:
            q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        else:
            q, k, v = (rearrange(f(x), "b n (h d) -> b h n d", h=self.heads) for f in (self.q, self.k, self.v))
        if rope is not None:
            q, k = rope(q), rope(k)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, N, Dh)
        elif self.impl == "reference":
            out = reference_attention(q, k, v, causal=self.causal)
        else:
            raise ValueError(f"unknown attention impl {self.impl!r}; choose one of {ATTENTION_IMPLS}")
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.proj(self.inner_norm(out))


def set_attention_impl(module: nn.Module, impl: str) -> None:
    """Switch every :class:`Attention` under ``module`` to ``impl`` ("sdpa" or "reference")."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {ATTENTION_IMPLS}")
    for m in module.modules():
        if isinstance(m, Attention):
            m.impl = impl


def attention_flops(tokens: int, width: int) -> int:
    """Multiply-adds x2 of the two attention matmuls (scores and weighted sum) for one sequence."""
    return 2 * 2 * tokens * tokens * width
