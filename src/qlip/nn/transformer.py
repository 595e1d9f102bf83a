"""Pre-norm transformer block and a stack of them with optional activation checkpointing."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .mlp import GeluMLP, SwiGLU


class Block(nn.Module):
    """x = x + Attn(LN1(x)); x = x + MLP(LN2(x))."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_hidden: int,
        *,
        mlp: str = "swiglu",
        k_bias: bool = False,
        subln: bool = True,
        eps: float = 1e-6,
        causal: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, k_bias=k_bias, subln=subln, eps=eps, causal=causal)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        if mlp == "swiglu":
            self.mlp = SwiGLU(width, mlp_hidden, subln=subln, eps=eps)
        elif mlp == "gelu":
            self.mlp = GeluMLP(width, mlp_hidden)
        else:
            raise ValueError(f"unknown mlp kind {mlp!r}; choose 'swiglu' or 'gelu'")

    def forward(self, x: Tensor, rope: nn.Module | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of blocks. ``grad_checkpointing`` recomputes each block's activations in the backward pass."""

    def __init__(self, layers: int, width: int, heads: int, mlp_hidden: int, **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_hidden, **block_kwargs) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: Tensor, rope: nn.Module | None = None, return_layers: tuple[int, ...] = ()) -> Tensor | tuple:
        """Run all blocks. With ``return_layers`` (indices, negative allowed) also return those blocks' outputs."""
        wanted = {i % len(self.blocks) for i in return_layers}
        kept: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
            if i in wanted:
                kept[i] = x
        if return_layers:
            return x, [kept[i % len(self.blocks)] for i in return_layers]
        return x


def eva_transformer(cfg) -> Transformer:
    """The EVA02 block stack of a ViT tower config (SwiGLU MLP, sub-LN, no key bias as configured)."""
    return Transformer(
        cfg.layers,
        cfg.width,
        cfg.heads,
        cfg.mlp_hidden,
        mlp="swiglu",
        k_bias=cfg.k_bias,
        subln=cfg.subln,
        eps=cfg.layer_norm_eps,
    )
