"""Feed-forward layers: SwiGLU with sub-LN (EVA02 vision towers), GELU MLP (CLIP text tower)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    """w3( LN( SiLU(w1 x) * (w2 x) ) ); all three linears have biases."""

    def __init__(self, width: int, hidden: int, *, subln: bool = True, eps: float = 1e-6):
        super().__init__()
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(width, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps) if subln else nn.Identity()
        self.w3 = nn.Linear(hidden, width)
        self.w12: nn.Linear | None = None  # set by fuse_projections() (inference copies only)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Replace w1, w2 by one (width -> 2 hidden) Linear (inference copies only, as Attention.fuse_projections)."""
        w1, w2 = self.w1, self.w2
        fused = nn.Linear(w1.in_features, 2 * w1.out_features, device=w1.weight.device, dtype=w1.weight.dtype)
        fused.weight.copy_(torch.cat([w1.weight, w2.weight]))
        fused.bias.copy_(torch.cat([w1.bias, w2.bias]))
        self.w12 = fused
        del self.w1, self.w2

    def forward(self, x: Tensor) -> Tensor:
        if self.w12 is not None:
            gate, value = self.w12(x).chunk(2, dim=-1)
            return self.w3(self.ffn_norm(F.silu(gate) * value))
        return self.w3(self.ffn_norm(F.silu(self.w1(x)) * self.w2(x)))


class GeluMLP(nn.Module):
    """fc2(GELU(fc1 x)) with exact (erf) GELU."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
