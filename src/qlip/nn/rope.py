"""2-D rotary position embedding of the EVA02 vision towers (encoder and decoder).

The tables are deterministic functions of (head dim, grid size, pretraining grid), so they are recomputed here and
never read from checkpoints.
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import Tensor


def rope_2d_tables(head_dim: int, grid: int, pretrain_grid: int = 16, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Cos / sin tables of shape (grid * grid, head_dim), patches in row-major order.

    Half of the channels rotate with the row index, the other half with the column index. Each half holds
    head_dim / 4 frequencies f_i = theta^(-2i / (head_dim/2)), each used for one interleaved channel pair.
    Positions are arange(grid) / grid * pretrain_grid, so a larger grid interpolates the pretraining positions.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (head_dim/4,)
    t = torch.arange(grid, dtype=torch.float64) / grid * pretrain_grid  # (g,)
    angles = repeat(torch.outer(t, freqs), "g f -> g (f two)", two=2)  # (g, half), interleaved pairs
    rows = repeat(angles, "r c -> r g c", g=grid)  # (g, g, half): varies with the row
    cols = repeat(angles, "c ch -> r c ch", r=grid)  # (g, g, half): varies with the column
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)  # (g*g, head_dim)
    return table.cos().float(), table.sin().float()


def rotate_pairs(x: Tensor) -> Tensor:
    """(x0, x1) -> (-x1, x0) on interleaved channel pairs."""
    x = x.unflatten(-1, (-1, 2))
    x0, x1 = x.unbind(-1)
    return torch.stack((-x1, x0), dim=-1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate every token of x (B, H, N, Dh) by its row of the tables (N, Dh); an identity row leaves it as it is."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_pairs(x) * sin


class Rope2D(torch.nn.Module):
    """Holds the cos/sin tables as non-persistent buffers (they follow .to(device) but stay out of state dicts)."""

    def __init__(self, head_dim: int, grid: int, pretrain_grid: int = 16, shift: int = 0):
        super().__init__()
        cos, sin = rope_2d_tables(head_dim, grid, pretrain_grid)
        # The ``shift`` leading tokens (the CLS token) are left unrotated by identity rows (cos 1, sin 0) in front of
        # the tables: x * 1 + rotated * 0 is exactly x, with no split and concatenation of the sequence per call.
        cos = torch.cat([torch.ones(shift, head_dim), cos])
        sin = torch.cat([torch.zeros(shift, head_dim), sin])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return apply_rope(x, self.cos, self.sin)
