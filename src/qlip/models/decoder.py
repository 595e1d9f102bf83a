"""ViT pixel decoder: latents (B, N, W) -> pixels (B, 3, H, W) in CLIP-normalized space."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from ..config import DecoderConfig
from ..nn.rope import Rope2D
from ..nn.transformer import eva_transformer


class PixelHead(nn.Module):
    """LayerNorm'd tokens -> Linear -> Tanh -> Linear to 3 * p * p values per token."""

    def __init__(self, width: int, hidden: int, patch_size: int):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, 3 * patch_size * patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.fc(x)))


class VisionDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        g = cfg.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, g * g, cfg.width))  # zero init, as released
        self.rope = Rope2D(cfg.width // cfg.heads, g, cfg.rope_pretrain_grid, shift=0) if cfg.rope else None
        self.transformer = eva_transformer(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.head = PixelHead(cfg.width, cfg.head_hidden, cfg.patch_size)

    def forward(self, latents: Tensor) -> Tensor:
        g, p = self.cfg.grid_size, self.cfg.patch_size
        if latents.ndim != 3 or latents.shape[1] != g * g:
            raise ValueError(f"expected decoder latents (B, {g * g}, {self.cfg.width}), got {tuple(latents.shape)}")
        x = latents.to(self.pos_embed.dtype) + self.pos_embed  # (B, N, W); float32 stream under autocast, as encoder
        x = self.transformer(x, self.rope)
        x = self.head(self.norm(x))  # (B, N, 3 p p), each token ordered (channel, row, col)
        return rearrange(x, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=g, w=g, c=3, p1=p, p2=p)
