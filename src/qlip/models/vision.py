"""EVA02-style ViT image encoder with a CLS head (QLIP's image encoder)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from ..config import VisionConfig
from ..nn.rope import Rope2D
from ..nn.transformer import eva_transformer


@dataclass
class VisionOutput:
    cls: Tensor  # (B, width) the CLS token after the last block (before post_norm)
    patches: Tensor  # (B, N, width) the patch tokens after the last block
    layers: list[Tensor]  # (B, 1 + N, width) outputs of the blocks asked for with ``return_layers``


class VisionEncoder(nn.Module):
    """Patch embedding, CLS token, absolute positions, RoPE blocks; ``embed`` maps CLS to the contrastive space."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        w, g = cfg.width, cfg.grid_size
        self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.pos_embed = nn.Parameter(torch.randn(g * g + 1, w) * 0.02)
        # The CLS token (position 0) is not rotated: rope shift 1.
        self.rope = Rope2D(w // cfg.heads, g, cfg.rope_pretrain_grid, shift=1) if cfg.rope else None
        self.transformer = eva_transformer(cfg)
        self.post_norm = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(w, embed_dim, bias=cfg.proj_bias)

    def forward(self, images: Tensor, return_layers: tuple[int, ...] = ()) -> VisionOutput:
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            raise ValueError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        x = self.patch_embed(images)  # (B, W, g, g)
        # The residual stream keeps the parameters' precision: float32 under bf16 autocast (only the matmuls run in
        # bf16), bf16 only if the model itself was cast. A bf16 stream flips ~3x more token bits (docs/benchmarks.md).
        x = rearrange(x, "b c h w -> b (h w) c").to(self.pos_embed.dtype)  # (B, N, W), row-major patches
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, W)
        out = self.transformer(x, self.rope, return_layers=return_layers)
        x, layers = out if return_layers else (out, [])
        return VisionOutput(cls=x[:, 0], patches=x[:, 1:], layers=layers)

    def embed(self, cls: Tensor) -> Tensor:
        """CLS token -> post_norm -> projection: the (unnormalized) image embedding."""
        return self.proj(self.post_norm(cls))
