"""Image loading and preprocessing in PIL/torch only (no torchvision).

Eval preprocessing follows the released QLIP/CLIP recipe: resize the shorter side to the model size with
bicubic resampling, center crop, scale to [0, 1] and normalize with the OpenAI CLIP mean/std. Training adds a
random resized crop and an optional horizontal flip. The inverse (:func:`denormalize`, :func:`to_uint8`,
:func:`to_pil_images`) turns decoder output, which lives in the same normalized space, back into pixels.

Every loader in :mod:`qlip.data` goes through :func:`load_image`, so that any image mode becomes RGB the same way
and every unreadable file fails with one exception type (:class:`ImageLoadError`) that names the file.

The training flip can keep captions true: ``hflip="caption"`` flips only images whose caption names no side
(:func:`caption_names_a_side`), so "a dog facing left" is never mirrored into a dog facing right.

Two choices for real photographs live here and nowhere else (``data.resize`` / ``data.background`` in a training
config, ``--resize`` / ``--background`` on the command line):

* ``resize``: ``crop`` (the default, the released recipe) fills the square and cuts the longer side;
  ``pad`` keeps the whole image, scaled to fit, and fills the rest of the square with the background;
* ``background``: the color transparent pixels are flattened onto (and that ``pad`` fills with): ``white`` (the
  default), ``black`` or ``#rrggbb``. The first flattened image is logged once per process.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import re
import struct
import warnings
from collections.abc import Callable, Sequence
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes]
Background = str | tuple[int, int, int]

RESIZE_MODES = ("crop", "pad")

# Whole words that a horizontal flip makes false: the two sides, and the turning sense (a mirrored clockwise arrow
# turns counterclockwise). Matched case-insensitively, so "Left", "left-hand" and "top-right" count.
MIRRORED_WORDS = ("left", "right", "leftmost", "rightmost", "leftward", "leftwards", "rightward", "rightwards",
                  "clockwise", "counterclockwise", "anticlockwise")
_MIRRORED_RE = re.compile(r"\b(?:" + "|".join(MIRRORED_WORDS) + r")\b", re.IGNORECASE)
NAMED_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}

logger = logging.getLogger(__name__)

# Modes that carry an alpha channel: composited on white rather than dropped, so that transparent regions
# (logos, icons) do not turn into whatever color the encoder left under the alpha.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageLoadError(ValueError):
    """An image could not be read; the message names the file and the reason.

    Attributes:
        reason: a short machine-readable cause, one of "empty", "missing_file", "unknown_format",
            "decompression_bomb", "corrupt" (bad-sample accounting in :mod:`qlip.data` counts by it).
    """

    def __init__(self, message: str, reason: str = "corrupt") -> None:
        super().__init__(message)
        self.reason = reason


def _describe(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes in memory>"
    return str(getattr(source, "name", "<file object>"))


def parse_background(spec: Background) -> tuple[int, int, int]:
    """``white``, ``black``, ``#rrggbb`` (or an (r, g, b) tuple of 0..255) -> the (r, g, b) color.

    Raises:
        ValueError: anything else, with the accepted forms.
    """
    if isinstance(spec, (tuple, list)):
        if len(spec) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in spec):
            return (int(spec[0]), int(spec[1]), int(spec[2]))
    elif isinstance(spec, str):
        text = spec.strip().lower()
        if text in NAMED_BACKGROUNDS:
            return NAMED_BACKGROUNDS[text]
        if len(text) == 7 and text.startswith("#"):
            try:
                return (int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16))
            except ValueError:
                pass
    raise ValueError(f"background {spec!r} is not a color; use white, black or #rrggbb (e.g. #808080)")


@functools.cache
def _note_flattened(background: tuple[int, int, int]) -> None:
    """Say once per process and background that transparent pixels are being flattened."""
    logger.warning("transparent images are flattened onto the background %s (#%02x%02x%02x); choose another with "
                   "data.background / --background (white, black or #rrggbb)",
                   next((k for k, v in NAMED_BACKGROUNDS.items() if v == background), "color"),
                   *background)  # fmt: skip


def load_image(source: ImageSource, *, name: str | None = None, max_pixels: int | None = None,
               background: Background = "white") -> Image.Image:  # fmt: skip
    """Read an image from a path, bytes or a binary file object into a fully decoded RGB PIL image.

    Any mode is converted with :func:`to_rgb`; EXIF orientation is applied so photos come out upright.

    Args:
        source: a path, the encoded bytes, or a binary file object.
        name: how to name the image in error messages (defaults to the path, or a description of the bytes).
        max_pixels: refuse images with more pixels than this (decompression-bomb guard). Defaults to
            ``PIL.Image.MAX_IMAGE_PIXELS`` (about 89 million).
        background: the color transparent pixels are flattened onto (see :func:`parse_background`).

    Returns:
        An RGB image whose pixels are already decoded (``img.load()`` was called).

    Raises:
        ImageLoadError: the file is missing, empty, truncated, corrupt, of an unknown format, or too large.
    """
    label = _describe(source, name)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(f"cannot read image {label}: the data is empty (0 bytes)", "empty")
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ImageLoadError(f"cannot read image {label}: no such file; check the path", "missing_file")
        if os.path.getsize(path) == 0:
            raise ImageLoadError(f"cannot read image {label}: the file is empty (0 bytes)", "empty")
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its pixel limit; a bomb must never get as far as decoding.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if limit is not None and width * height > limit:
                    raise ImageLoadError(
                        f"cannot read image {label}: {width}x{height} = {width * height} pixels exceeds the limit of "
                        f"{limit} (possible decompression bomb); raise max_pixels if the image is genuine",
                        "decompression_bomb",
                    )
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img, background)
    except ImageLoadError:
        raise
    except UnidentifiedImageError as err:
        message = f"cannot read image {label}: unknown or unsupported image format ({err})"
        raise ImageLoadError(message, "unknown_format") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        message = f"cannot read image {label}: possible decompression bomb ({err})"
        raise ImageLoadError(message, "decompression_bomb") from err
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        # PIL reports truncated or corrupt data as OSError / SyntaxError / struct.error depending on the plugin.
        reason = f"{type(err).__name__}: {err}"
        raise ImageLoadError(f"cannot read image {label}: corrupt or truncated data ({reason})", "corrupt") from err



def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Map a single-channel 16/32-bit integer or float image to uint8 by scaling its nominal range, not clipping."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)  # 65535 / 255 = 257 exactly
    if img.mode == "F":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        top = float(finite.max()) if finite.size else 0.0
        # Float images are conventionally in [0, 1]; larger values are taken as 8-bit-range data.
        scale = 255.0 if top <= 1.0 else 1.0
        return np.clip(np.round(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8)
    # Mode "I" (32-bit signed): 16-bit files often arrive this way, so infer the range from the data.
    arr = arr.astype(np.float64)
    top = float(arr.max()) if arr.size else 0.0
    if top <= 255:
        return np.clip(arr, 0, 255).astype(np.uint8)
    if top <= 65535:
        return np.round(np.clip(arr, 0, 65535) / 257.0).astype(np.uint8)
    return np.round(np.clip(arr, 0, None) / top * 255.0).astype(np.uint8)


def to_rgb(img: Image.Image, background: Background = "white") -> Image.Image:
    """Convert an image of any PIL mode to 8-bit RGB.

    Alpha is composited on ``background`` (white by default; see :func:`parse_background`); 16-bit, 32-bit and
    float single-channel images are scaled to 8 bits (not clipped); palette images keep their transparency;
    CMYK/YCbCr/LAB/HSV use PIL's color conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_high_depth_to_uint8(img)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        color = parse_background(background)
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        if alpha.min() < 1.0:
            _note_flattened(color)
        rgb = rgba[..., :3] * alpha + np.asarray(color, dtype=np.float32) * (1.0 - alpha)
        return Image.fromarray(np.round(rgb).astype(np.uint8))
    return img.convert("RGB")


def caption_names_a_side(caption: str | None) -> bool:
    """Whether a horizontal flip would make ``caption`` false: it holds one of :data:`MIRRORED_WORDS` as a whole
    word (any case). ``None`` (no caption) counts as naming a side: what cannot be checked is not flipped."""
    return caption is None or _MIRRORED_RE.search(caption) is not None


def _resize_shorter(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    short = min(width, height)
    if short == size:
        return img
    new_w = max(size, int(round(width * size / short))) if width != short else size
    new_h = max(size, int(round(height * size / short))) if height != short else size
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def fit_and_pad(img: Image.Image, size: int, color: tuple[int, int, int]) -> Image.Image:
    """The whole image scaled so its longer side is ``size``, centred on a ``size`` x ``size`` square of ``color``."""
    width, height = img.size
    scale = size / max(width, height)
    new_w, new_h = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if (new_w, new_h) == (size, size):
        return img
    canvas = Image.new("RGB", (size, size), color)
    canvas.paste(img, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def _pad_to_square(img: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    left = int(round((width - size) / 2))
    top = int(round((height - size) / 2))
    return img.crop((left, top, left + size, top + size))


def _to_normalized_tensor(img: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
    return x.sub_(mean).div_(std)


class ImageTransform:
    """PIL image -> normalized (3, S, S) float32 tensor; a class, not a closure, so DataLoader workers can pickle it.

    Randomness (train mode) comes from torch's global generator, which DataLoader seeds differently per worker.
    With ``hflip="caption"`` the transform takes the sample's caption too (``transform(img, caption=...)``;
    :attr:`uses_caption` says so) and flips only when the caption names no side.
    """

    def __init__(
        self,
        image_size: int,
        *,
        train: bool = False,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        hflip: bool | str = True,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        resize: str = "crop",
        background: Background = "white",
    ) -> None:
        if not (isinstance(hflip, bool) or hflip == "caption"):
            raise ValueError(f"hflip must be true, false or 'caption' (flip only images whose caption names no "
                             f"side), got {hflip!r}")  # fmt: skip
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES} (crop fills the square, pad keeps the whole "
                             f"image), got {resize!r}")  # fmt: skip
        self.resize = resize
        self.background = parse_background(background)
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1 (fractions of the image area), got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max (width / height), got {ratio}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each with std > 0, got mean={mean}, std={std}")
        self.image_size = image_size
        self.train = train
        self.hflip = hflip
        self.scale = scale
        self.ratio = ratio
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def _random_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(self.scale[0], self.scale[1]))
            aspect = math.exp(float(torch.empty(1).uniform_(log_lo, log_hi)))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, (1,)))
                top = int(torch.randint(0, height - h + 1, (1,)))
                return left, top, w, h
        # Fallback: the largest centered box whose aspect lies inside the allowed range.
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif aspect > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    @property
    def uses_caption(self) -> bool:
        """Whether the result depends on the caption (a caption-aware flip in train mode)."""
        return self.train and self.hflip == "caption"

    def __call__(self, img: Image.Image, caption: str | None = None) -> torch.Tensor:
        img = to_rgb(img, self.background)
        size = self.image_size
        if self.train:
            if self.resize == "pad":  # the random crop then works on the whole image, bordered to a square
                img = _pad_to_square(img, self.background)
            left, top, w, h = self._random_box(*img.size)
            img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
            if self.hflip and bool(torch.rand(1) < 0.5) and not (self.hflip == "caption" and
                                                                  caption_names_a_side(caption)):  # fmt: skip
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif self.resize == "pad":
            img = fit_and_pad(img, size, self.background)
        else:
            img = _center_crop(_resize_shorter(img, size), size)
        return _to_normalized_tensor(img, self.mean, self.std)

    def __repr__(self) -> str:
        mode = f"train, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}" if self.train else "eval"
        extra = f", resize=pad, background={self.background}" if self.resize == "pad" else ""
        return f"ImageTransform(image_size={self.image_size}, {mode}{extra})"


def image_transform(
    image_size: int,
    *,
    train: bool = False,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    hflip: bool | str = True,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    resize: str = "crop",
    background: Background = "white",
) -> Callable[[Image.Image], torch.Tensor]:
    """Build the released QLIP/CLIP preprocessing (eval) or its augmented variant (train).

    Eval: resize the shorter side to ``image_size`` (bicubic), center crop, scale to [0, 1], normalize.
    Train: random resized crop (area fraction in ``scale``, aspect ratio in ``ratio``) to ``image_size`` and, if
    ``hflip``, a random horizontal flip (turn it off when left/right matters, e.g. the ``shapes`` position task).

    Args:
        image_size: output side length S.
        train: use the random augmentation instead of the deterministic eval path.
        mean: per-channel normalization mean (defaults to OpenAI CLIP's).
        std: per-channel normalization std (defaults to OpenAI CLIP's).
        hflip: random horizontal flip in train mode: True, False, or "caption" (flip only images whose caption
            names no side, see :func:`caption_names_a_side`; call the transform with ``caption=``).
        scale: range of the crop's area as a fraction of the image area (train mode).
        ratio: range of the crop's width / height (train mode).
        resize: "crop" (fill the square, cut the longer side) or "pad" (keep the whole image, fill the rest of the
            square with ``background``); training pads to a square before its random crop.
        background: the color transparent pixels are flattened onto and "pad" fills with.

    Returns:
        A picklable callable mapping a PIL image to a float32 tensor of shape (3, S, S).
    """
    return ImageTransform(image_size, train=train, mean=mean, std=std, hflip=hflip, scale=scale, ratio=ratio,
                          resize=resize, background=background)  # fmt: skip


def denormalize(
    x: torch.Tensor, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
) -> torch.Tensor:
    """Undo the normalization: (..., 3, H, W) normalized values -> pixels in [0, 1] (clamped)."""
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected a tensor shaped (..., 3, H, W), got {tuple(x.shape)}")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> uint8 0..255 of the same shape and device (clamp, scale, round half to even), as saving a
    PNG would; uint8 input is returned unchanged.

    The one rounding of the library: :func:`to_uint8` (normalized input) and the metrics' protocol both use it.
    """
    if pixels.dtype == torch.uint8:
        return pixels
    if not pixels.is_floating_point():
        raise TypeError(f"pixels_to_uint8 expects uint8 or float pixels in [0, 1], got dtype {pixels.dtype}")
    return (pixels.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def to_uint8(
    x: torch.Tensor, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
) -> torch.Tensor:
    """Normalized (B, 3, H, W) (or (3, H, W)) -> uint8 of the same layout on the CPU, rounded to the nearest level.

    Channels stay first, like every image tensor in the library (``eval.metrics.psnr`` / ``ssim`` take this layout);
    :func:`to_pil_images` moves them last for PIL. For pixels already in [0, 1] use :func:`pixels_to_uint8`.
    """
    return pixels_to_uint8(denormalize(x.detach().float(), mean, std)).cpu()


def to_pil_images(
    x: torch.Tensor, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
) -> list[Image.Image]:
    """Normalized (B, 3, H, W) (or a single (3, H, W)) -> list of RGB PIL images."""
    arr = to_uint8(x if x.ndim == 4 else x.unsqueeze(0), mean, std).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    return [Image.fromarray(a) for a in arr]
