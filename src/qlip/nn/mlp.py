"""Feed-forward layers: SwiGLU with sub-LN (EVA02, spec section 2), GELU MLP (CLIP text, section 5)."""

from __future__ import annotations

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

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(self.ffn_norm(F.silu(self.w1(x)) * self.w2(x)))


class GeluMLP(nn.Module):
    """fc2(GELU(fc1 x)) with exact (erf) GELU."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
