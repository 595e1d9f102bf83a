"""What the demo page does, as plain functions of plain inputs: no Gradio here, so every tab is testable alone.

A :class:`DemoSession` holds the loaded models; its methods take an image (a path, bytes or a PIL image) and text,
and return images, numbers and text. A user mistake (no image, a file that is not an image, no labels, an empty
prompt) raises :class:`DemoInputError`, whose message the page shows as it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

GRID_PICTURE_SIZE = 256  # the token grid picture is drawn at least this large (nearest-neighbour cells)
MAX_IMAGES = 8  # images per prompt the Generate tab may ask for


class DemoInputError(ValueError):
    """A mistake on the page (no image, not an image, no labels, empty prompt): shown to the user as it is."""


class DemoSetupError(ValueError):
    """The demo cannot start with these models (a tokenizer without a decoder, a missing generator, ...)."""


@dataclass
class TokenizeResult:
    """One image through the tokenizer, as the Tokenize tab shows it."""

    image: Image.Image  # the input as the model sees it (resized, cropped)
    token_grid: Image.Image  # one colored cell per token (see :func:`token_grid_picture`)
    reconstruction: Image.Image
    tokens: np.ndarray  # (h, w) int64 indices
    bits_per_token: int
    psnr: float  # dB, reconstruction vs the input as the model sees it
    compression_ratio: float  # 24-bit RGB pixels over token bits

    @property
    def distinct_tokens(self) -> int:
        return int(np.unique(self.tokens).size)

    def summary(self) -> str:
        h, w = self.tokens.shape
        return (f"{h} x {w} tokens of {self.bits_per_token} bits ({h * w * self.bits_per_token} bits for the image, "
                f"{self.distinct_tokens} distinct tokens); compression {self.compression_ratio:.1f}x vs 24-bit RGB; "
                f"reconstruction PSNR {self.psnr:.2f} dB")  # fmt: skip


def token_grid_picture(tokens: np.ndarray | torch.Tensor, bits: int, size: int = GRID_PICTURE_SIZE) -> Image.Image:
    """Token indices (h, w) -> an RGB picture with one flat cell per token.

    The index's bits are split into three runs (most significant first) read as red, green and blue, so tokens
    that share their leading bits get similar colors and equal tokens equal colors.
    """
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.int64)
    if tokens.ndim != 2:
        raise ValueError(f"expected token indices shaped (h, w), got {tuple(tokens.shape)}")
    from ..quantizers.bsq import indices_to_bits

    b = indices_to_bits(tokens, bits).to(torch.int64)  # (h, w, bits), MSB first
    channels = []
    for run in torch.tensor_split(b, 3, dim=-1):  # bits // 3 (+1) bits per color channel
        n = run.shape[-1]
        if n == 0:
            channels.append(torch.zeros(tokens.shape, dtype=torch.int64))
            continue
        weights = 2 ** torch.arange(n - 1, -1, -1)
        channels.append((run * weights).sum(-1) * 255 // (2**n - 1))
    rgb = torch.stack(channels, dim=-1).to(torch.uint8).numpy()  # (h, w, 3)
    h, w = tokens.shape
    cell = max(1, -(-size // max(h, w)))
    return Image.fromarray(rgb).resize((w * cell, h * cell), Image.NEAREST)


def parse_labels(text: str | None) -> list[str]:
    """Comma-separated labels -> the distinct non-empty ones in order; fewer than two is a :class:`DemoInputError`."""
    labels: list[str] = []
    for part in (text or "").split(","):
        label = part.strip()
        if label and label not in labels:
            labels.append(label)
    if len(labels) < 2:
        got = f" (got {text.strip()!r})" if text and text.strip() else ""
        raise DemoInputError(f"type at least two different labels, comma-separated, e.g. \"a dog, a cat\"{got}")
    return labels


def read_image(image: Any) -> Image.Image:
    """An upload (a path, bytes or a PIL image) -> an RGB image; nothing or a non-image is a :class:`DemoInputError`."""
    from ..transforms import ImageLoadError, load_image, to_rgb

    if image is None or (isinstance(image, str) and not image.strip()):
        raise DemoInputError("no image: upload an image file (PNG, JPEG, WebP, ...) first")
    if isinstance(image, Image.Image):
        return to_rgb(image)
    name = Path(image).name if isinstance(image, (str, Path)) else None
    try:
        return load_image(image, name=name)
    except ImageLoadError as e:
        raise DemoInputError(f"{e}; upload an image file (PNG, JPEG, WebP, ...)") from None


class DemoSession:
    """The models behind the page and one method per tab.

    Args:
        model: the QLIP model (a :class:`qlip.QLIP` with vision, quantizer and decoder; a text tower enables
            Classify).
        tokenizer: its text tokenizer (None: no Classify).
        generator: a :class:`qlip.generation.Generator` (None: no Generate tab).
        vlm: anything with ``chat(image, question) -> str`` (None: no Chat tab).
    """

    def __init__(self, model: Any, tokenizer: Any = None, generator: Any = None, vlm: Any = None) -> None:
        missing = [part for part in ("vision", "quantizer", "decoder") if getattr(model.cfg, part) is None]
        if missing:
            raise DemoSetupError(f"{model.cfg.name} has no {', '.join(missing)}: the demo needs a tokenizer that "
                                 f"encodes and decodes (a stage-2 model directory or a released QLIP)")  # fmt: skip
        from ..transforms import image_transform

        self.model, self.tokenizer, self.generator, self.vlm = model.eval(), tokenizer, generator, vlm
        self.transform = image_transform(model.image_size, train=False)
        self._classifiers: dict[tuple[str, ...], torch.Tensor] = {}

    @classmethod
    def from_dirs(cls, model_dir: str | Path, generator_dir: str | Path | None = None,
                  vlm_dir: str | Path | None = None, device: str | torch.device = "cpu") -> DemoSession:  # fmt: skip
        """Load the models of ``qlip demo``; ``vlm_dir`` goes through ``qlip.understanding.load`` (imported only then).

        Raises:
            DemoSetupError: a directory that cannot be loaded (the loader's reason in the message).
        """
        from ..factory import create_model, get_tokenizer

        try:
            model = create_model(str(model_dir), device=device)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            raise DemoSetupError(f"cannot load the model {model_dir}: {e}") from e
        tokenizer = None
        if model.cfg.text is not None:
            try:
                tokenizer = get_tokenizer(str(model_dir))
            except (OSError, ValueError) as e:
                log.warning("no text tokenizer in %s (%s): the Classify tab is off", model_dir, e)
        generator = None
        if generator_dir is not None:
            from ..generation import load as load_generator

            try:
                generator = load_generator(generator_dir, device=device)
            except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
                raise DemoSetupError(f"cannot load the generator {generator_dir}: {e}") from e
        vlm = load_vlm(vlm_dir, device) if vlm_dir is not None else None
        return cls(model, tokenizer, generator, vlm)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def can_classify(self) -> bool:
        return self.model.cfg.text is not None and self.tokenizer is not None

    def _pixels(self, image: Any) -> tuple[Image.Image, torch.Tensor]:
        img = read_image(image)
        return img, self.transform(img).unsqueeze(0).to(self.device)  # (1, 3, S, S)

    # --- tabs -----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def tokenize(self, image: Any) -> TokenizeResult:
        """Tokenize tab: the tokens, their picture, the reconstruction, PSNR and the compression ratio."""
        from ..eval.metrics import psnr
        from ..transforms import to_pil_images, to_uint8

        _, x = self._pixels(image)
        tokens = self.model.encode(x)  # (1, h, w)
        recon = self.model.decode(tokens).float()  # (1, 3, S, S)
        score = float(psnr(to_uint8(x), to_uint8(recon))[0])
        grid = tokens[0].cpu().numpy()
        return TokenizeResult(image=to_pil_images(x.cpu())[0], token_grid=token_grid_picture(grid, self.model.num_bits),
                              reconstruction=to_pil_images(recon.cpu())[0], tokens=grid,
                              bits_per_token=self.model.num_bits, psnr=score,
                              compression_ratio=float(self.model.cfg.compression_ratio))  # fmt: skip

    @torch.inference_mode()
    def classify(self, image: Any, labels: str) -> dict[str, float]:
        """Classify tab: zero-shot probabilities of the typed labels (comma-separated), highest first."""
        if not self.can_classify:
            raise DemoInputError(f"{self.model.cfg.name} has no text tower or tokenizer: zero-shot classification "
                                 f"is not available with this model")  # fmt: skip
        names = parse_labels(labels)
        _, x = self._pixels(image)
        from ..eval.zero_shot import build_zero_shot_classifier, zero_shot_probabilities

        key = tuple(names)
        if key not in self._classifiers:
            self._classifiers = {key: build_zero_shot_classifier(self.model, self.tokenizer, names, ["{}"],
                                                                 device=self.device)}  # fmt: skip
        probs = zero_shot_probabilities(self.model, self._classifiers[key], x, device=self.device)[0]
        return dict(sorted(zip(names, probs.tolist()), key=lambda kv: -kv[1]))

    def generate(self, prompt: str, seed: int = 0, cfg_scale: float = 3.0, n: int = 1) -> list[Image.Image]:
        """Generate tab: ``n`` images for ``prompt`` (reproducible for a seed)."""
        if self.generator is None:
            raise DemoInputError("no generator was loaded: start the demo with --generator DIR")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DemoInputError("type a prompt, e.g. \"a red circle on the left\"")
        try:
            seed, n, cfg_scale = int(seed), int(n), float(cfg_scale)
        except (TypeError, ValueError):
            raise DemoInputError(f"seed and images must be whole numbers and CFG a number, got {seed!r}, {n!r}, "
                                 f"{cfg_scale!r}") from None  # fmt: skip
        if not 1 <= n <= MAX_IMAGES:
            raise DemoInputError(f"images per prompt must be between 1 and {MAX_IMAGES}, got {n}")
        from ..generation import GenerationInputError

        try:
            return self.generator.generate([prompt.strip()], cfg_scale=cfg_scale, seed=seed, n=n)
        except GenerationInputError as e:
            raise DemoInputError(str(e)) from None

    def chat(self, image: Any, question: str) -> str:
        """Chat tab: the vision-language model's answer to a question about the image."""
        if self.vlm is None:
            raise DemoInputError("no vision-language model was loaded: start the demo with --vlm DIR")
        if not isinstance(question, str) or not question.strip():
            raise DemoInputError("type a question about the image, e.g. \"what shape is this?\"")
        img = read_image(image)
        return str(self.vlm.chat(img, question.strip()))


def load_vlm(directory: str | Path, device: str | torch.device = "cpu") -> Any:
    """``qlip.understanding.load(directory)``, imported only when a VLM is asked for.

    Raises:
        DemoSetupError: this qlip has no ``qlip.understanding``, or the directory does not load.
    """
    try:
        from .. import understanding
    except ImportError as e:
        raise DemoSetupError(f"--vlm needs qlip.understanding, which this qlip install lacks ({e})") from e
    try:
        vlm = understanding.load(directory)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise DemoSetupError(f"cannot load the vision-language model {directory}: {e}") from e
    return vlm.to(device) if hasattr(vlm, "to") and str(device) != "cpu" else vlm
