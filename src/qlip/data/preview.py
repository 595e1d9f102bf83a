"""A picture of a data source: a grid of samples with their captions (``qlip data preview``)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .shapes import ShapesConfig, generate_shapes_sample


def render_grid(samples: Sequence[dict[str, Any]], *, cols: int = 4, side: int = 128,
                upscale: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:  # fmt: skip
    """A grid of samples (``{"image": PIL image, "caption": str | None}``), each with its caption underneath.

    Every image is fitted into a ``side`` x ``side`` cell keeping its aspect ratio (centred on white), so a
    panorama or a portrait shows whole, as the file holds it. A sample without a caption shows its ``key``.
    """
    if cols < 1 or side < 1:
        raise ValueError(f"render_grid: cols and side must be >= 1, got cols={cols}, side={side}")
    if not samples:
        raise ValueError("render_grid: no samples to draw")
    font = ImageFont.load_default()
    chars = max(12, side // 6)
    wrapped = [textwrap.wrap(s.get("caption") or f"[{s.get('key', '')}]", chars)[:6] for s in samples]
    text_h = 12 * max(1, max(len(w) for w in wrapped)) + 6
    rows = (len(samples) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (side + 8) + 8, rows * (side + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(grid)
    for i, (sample, lines) in enumerate(zip(samples, wrapped)):
        x = 8 + (i % cols) * (side + 8)
        y = 8 + (i // cols) * (side + text_h + 8)
        image = sample["image"].convert("RGB")
        scale = side / max(image.size)
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        image = image.resize(size, upscale if scale > 1 else Image.Resampling.BICUBIC)
        grid.paste(image, (x + (side - size[0]) // 2, y + (side - size[1]) // 2))
        for j, line in enumerate(lines):
            draw.text((x, y + side + 3 + 12 * j), line, fill="black", font=font)
    return grid


def render_preview(n: int = 16, *, cols: int = 4, config: ShapesConfig | None = None, split: str = "train",
                   seed: int = 0, scale: int = 2) -> Image.Image:  # fmt: skip
    """A grid of ``n`` shapes samples, each with its caption written underneath (pixels upscaled ``scale`` times)."""
    for name, value in (("n", n), ("cols", cols), ("scale", scale)):
        if value < 1:
            raise ValueError(f"render_preview: {name} must be >= 1, got {value}")
    cfg = config or ShapesConfig()
    samples = [generate_shapes_sample(i, cfg, split=split, seed=seed) for i in range(n)]
    return render_grid(samples, cols=cols, side=cfg.image_size * scale, upscale=Image.Resampling.NEAREST)
