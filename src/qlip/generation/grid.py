"""One picture of generated images with the caption under each (``qlip generate --grid``, the README's figure).

    grid = caption_grid(images, captions, columns=4)   # a PIL image; cells are upscaled to at least ``cell`` px
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def _wrap(text: str, font: ImageFont.ImageFont, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than the width gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def caption_grid(images: Sequence[Image.Image], captions: Sequence[str], *, columns: int | None = None,
                 cell: int = 192, font_size: int = 14, pad: int = 8) -> Image.Image:  # fmt: skip
    """Images in rows of ``columns`` (default: up to 6), each above its caption, on white.

    Args:
        images: the images (any equal size; each is enlarged by the largest whole factor that keeps it at or
            under ``cell`` pixels wide, at least 1, with nearest-neighbour sampling so that tokens stay sharp).
        captions: one per image, wrapped to the cell width.
        columns: images per row.
        cell: target cell width in pixels.
        font_size: caption size in pixels (Pillow's built-in scalable font: no font file needed).
        pad: margin around and between cells.

    Raises:
        ValueError: no images, or not one caption per image.
    """
    if not images or len(images) != len(captions):
        raise ValueError(f"a caption grid needs one caption per image, got {len(images)} images and "
                         f"{len(captions)} captions")  # fmt: skip
    w, h = images[0].size
    if any(img.size != (w, h) for img in images):
        raise ValueError(f"a caption grid needs images of one size, got {sorted({img.size for img in images})}")
    columns = max(1, min(columns or 6, len(images)))
    scale = max(1, cell // w)
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default(size=font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(c, font, cw, probe) for c in captions]
    line_h = font_size + 4
    text_h = line_h * max(len(lines) for lines in wrapped)
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (pad + columns * (cw + pad), pad + rows * (ch + text_h + 2 * pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        x = pad + (i % columns) * (cw + pad)
        y = pad + (i // columns) * (ch + text_h + 2 * pad)
        grid.paste(img.convert("RGB").resize((cw, ch), Image.NEAREST), (x, y))
        for k, line in enumerate(lines):
            draw.text((x, y + ch + pad // 2 + k * line_h), line, fill="black", font=font)
    return grid
