"""A picture of a data source: a grid of samples with their captions (``qlip data preview``)."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

from .shapes import ShapesConfig, generate_shapes_sample


def render_preview(n: int = 16, *, cols: int = 4, config: ShapesConfig | None = None, split: str = "train",
                   seed: int = 0, scale: int = 2) -> Image.Image:  # fmt: skip
    """A grid of ``n`` shapes samples, each with its caption written underneath."""
    for name, value in (("n", n), ("cols", cols), ("scale", scale)):
        if value < 1:
            raise ValueError(f"render_preview: {name} must be >= 1, got {value}")
    cfg = config or ShapesConfig()
    side = cfg.image_size * scale
    font = ImageFont.load_default()
    chars = max(12, side // 6)
    samples = [generate_shapes_sample(i, cfg, split=split, seed=seed) for i in range(n)]
    wrapped = [textwrap.wrap(s["caption"], chars) for s in samples]
    text_h = 12 * max(len(w) for w in wrapped) + 6
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * (side + 8) + 8, rows * (side + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(grid)
    for i, (sample, lines) in enumerate(zip(samples, wrapped)):
        x = 8 + (i % cols) * (side + 8)
        y = 8 + (i // cols) * (side + text_h + 8)
        grid.paste(sample["image"].resize((side, side), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + side + 3 + 12 * j), line, fill="black", font=font)
    return grid
