"""The caption grid of generated images (qlip generate --grid)."""

from __future__ import annotations

import pytest
from PIL import Image

from qlip.generation.grid import caption_grid


def test_caption_grid_lays_out_images_with_wrapped_captions():
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    captions = ["a red one", "a green one with a caption long enough to need several lines under it", "blue"]
    grid = caption_grid(images, captions, columns=2, cell=128, pad=8)
    assert grid.width == 8 + 2 * (128 + 8)
    one_line = caption_grid(images[:1], captions[:1], columns=2, cell=128, pad=8)
    assert grid.height > 2 * one_line.height - 8  # two rows, the taller captions of the wrapped one
    assert grid.getpixel((8 + 64, 8 + 64)) == (255, 0, 0) and grid.getpixel((8 + 136 + 64, 8 + 64)) == (0, 128, 0)
    assert grid.getpixel((8 + 127, 8 + 127)) == (255, 0, 0)  # enlarged 2x
    text = one_line.crop((8, 8 + 128, 8 + 128, one_line.height)).convert("L")
    assert text.getextrema()[0] < 100 and text.getextrema()[1] == 255  # dark text on white
    with pytest.raises(ValueError, match="one caption per image"):
        caption_grid(images, captions[:2])
    with pytest.raises(ValueError, match="one size"):
        caption_grid([images[0], Image.new("RGB", (32, 32))], captions[:2])
