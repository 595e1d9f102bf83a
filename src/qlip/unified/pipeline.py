"""A language-model or unified-model directory and the :class:`UnifiedModel` that completes, captions, generates.

Layout (self-contained)::

    DIR/config.json          the UnifiedConfig ("format": "qlip-lm" or "qlip-um3"), written last
    DIR/model.safetensors    the decoder's weights
    DIR/vocab.json, DIR/merges.txt, ...   the text tokenizer (a CLIP-style BPE, `qlip tokenizer train` layout)
    DIR/qlip/                (unified models) the QLIP tokenizer: image encoder, quantizer, decoder

::

    um = qlip.unified.load("runs/um3-shapes/last")
    um.complete("Return the")                               # text only
    um.caption(PIL.Image.open("shape.png"))                 # image -> text (encoded with DIR/qlip)
    um.generate(["a green star at the bottom."], cfg_scale=3.0)   # text -> images
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from ..ar.sampling import Chooser
from ..fileio import replace_files
from ..weights import read_weight_file
from .model import LM_FORMAT, UNIFIED_FORMAT, UnifiedConfig, UnifiedLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
QLIP_SUBDIR = "qlip"
_STAGE_PREFIX = ".staged-unified-"
FORMATS = (LM_FORMAT, UNIFIED_FORMAT)


class UnifiedInputError(ValueError):
    """A prompt, image or sampling setting the model cannot use (one line saying what to fix)."""


class UnifiedDirectoryError(ValueError):
    """A path that is not a language-model / unified-model directory (or not one that may be written)."""


def read_unified_config(directory: str | Path) -> UnifiedConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise UnifiedDirectoryError(f"{directory} has no {CONFIG_NAME}; give a language-model or unified-model "
                                    "directory (run_dir/last of a task: lm or task: unified run)")  # fmt: skip
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UnifiedDirectoryError(f"{path} does not parse as JSON ({e})") from None
    kind = d.get("format", "qlip") if isinstance(d, dict) else None
    if kind not in FORMATS:
        raise UnifiedDirectoryError(f"{directory} holds a {kind!r} model, not a language model or unified model "
                                    f"({' / '.join(FORMATS)}); give run_dir/last of a task: lm or task: unified "
                                    "run")  # fmt: skip
    try:
        return UnifiedConfig.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise UnifiedDirectoryError(f"{path} is not a valid {kind} config: {e}") from None


def is_unified_directory(directory: str | Path) -> bool:
    try:
        read_unified_config(directory)
    except (OSError, ValueError):
        return False
    return True


def check_unified_target(directory: str | Path, overwrite: bool = False) -> None:
    """Refuse a file, or a non-empty folder that is not a language-model / unified-model directory."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UnifiedDirectoryError(f"{directory} is a file; choose a directory path for the model")
    if overwrite or not directory.is_dir() or is_unified_directory(directory):
        return
    others = sorted(p.name for p in directory.iterdir() if not p.name.startswith(_STAGE_PREFIX))
    if others:
        raise UnifiedDirectoryError(f"{directory} is not empty and is not a model directory of qlip's language "
                                    f"models (it holds {', '.join(others[:5])}); choose a new or empty "
                                    "directory")  # fmt: skip


def save_unified(directory: str | Path, lm: UnifiedLM, tokenizer: Any, qlip_model: Any = None, *,
                 overwrite: bool = False) -> Path:  # fmt: skip
    """Write a language-model (``qlip_model`` None) or unified-model directory (layout above); config last."""
    directory = Path(directory)
    check_unified_target(directory, overwrite)
    if (lm.cfg.image is None) != (qlip_model is None):
        raise ValueError("a unified model is saved with the QLIP tokenizer of its images, a language model without")
    if qlip_model is not None:
        qlip_model.save_pretrained(directory / QLIP_SUBDIR, overwrite=overwrite)
    state = {k: v.detach().to("cpu").contiguous() for k, v in lm.state_dict().items()}
    with replace_files(directory, prefix=_STAGE_PREFIX, last=(CONFIG_NAME,)) as stage:
        tokenizer.save_pretrained(stage)
        save_file(state, str(stage / WEIGHTS_NAME), metadata={"format": "pt", "qlip": lm.cfg.format})
        (stage / CONFIG_NAME).write_text(json.dumps(lm.cfg.to_dict(), indent=1) + "\n")
    return directory


def load_lm(directory: str | Path) -> UnifiedLM:
    """The decoder of a directory written by :func:`save_unified`, on the CPU, in eval mode."""
    directory = Path(directory)
    lm = UnifiedLM(read_unified_config(directory))
    state = read_weight_file(directory / WEIGHTS_NAME)
    expected = set(lm.state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UnifiedDirectoryError(f"{directory / WEIGHTS_NAME} does not match its config: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}")  # fmt: skip
    lm.load_state_dict(state)
    return lm.eval()


def _chooser(cfg_scale: float, temperature: float, top_k: int, top_p: float, seed: int, device: torch.device,
             guided: bool = False) -> Chooser:  # fmt: skip
    try:
        return Chooser(guided=guided, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                       generator=torch.Generator(device=device).manual_seed(int(seed)))  # fmt: skip
    except (ValueError, TypeError) as e:
        raise UnifiedInputError(str(e)) from None


class UnifiedModel:
    """A decoder with its text tokenizer and (unified models) the QLIP tokenizer of its images."""

    def __init__(self, lm: UnifiedLM, tokenizer: Any, qlip_model: Any = None):
        self.lm, self.tokenizer, self.qlip = lm.eval(), tokenizer, qlip_model
        if qlip_model is not None:
            self.qlip.eval()
            self._check_image_spec(qlip_model)

    @property
    def cfg(self) -> UnifiedConfig:
        return self.lm.cfg

    @property
    def is_unified(self) -> bool:
        return self.cfg.image is not None

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def to(self, device: str | torch.device) -> UnifiedModel:
        self.lm.to(device)
        if self.qlip is not None:
            self.qlip.to(device)
        return self

    def _check_image_spec(self, qlip_model: Any) -> None:
        from ..tokenfile import TokenSpec

        image, spec = self.cfg.image, TokenSpec.of(qlip_model)
        if (spec.grid, spec.bits) != (image.grid, image.bits) or (
                image.fingerprint and spec.fingerprint and image.fingerprint != spec.fingerprint):  # fmt: skip
            raise UnifiedDirectoryError(f"the QLIP model {spec.model} makes {spec.grid}x{spec.grid} tokens of "
                                        f"{spec.bits} bits but the unified model reads {image.grid}x{image.grid} "
                                        f"tokens of {image.bits} bits ({image.model}); use its own QLIP model")

    def _need_images(self, what: str) -> None:
        if not self.is_unified:
            raise UnifiedInputError(f"this is a text-only language model: it cannot {what}; use a unified model "
                                    "(run_dir/last of a task: unified run)")  # fmt: skip

    def _text_ids(self, text: Any, what: str, allow_empty: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise UnifiedInputError(f"the {what} must be text, got {type(text).__name__}; images go to caption() "
                                    "(qlip chat --image), not to a text prompt")  # fmt: skip
        if not text.strip() and not allow_empty:
            raise UnifiedInputError(f"the {what} is empty; give some text, e.g. \"a red circle\"")
        return self.tokenizer.encode(text)

    # --- text only ------------------------------------------------------------------------------------------------
    def complete(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 0.95, seed: int = 0) -> str:  # fmt: skip
        """The continuation of ``prompt`` (the text after it), sampled until the end token or ``max_new_tokens``."""
        ids = self._text_ids(prompt, "prompt")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UnifiedInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        chooser = _chooser(1.0, temperature, top_k, top_p, seed, self.device)
        try:
            out = self.lm.sample_text([[self.cfg.sot_id, *ids]], max_new_tokens, chooser)[0]
        except ValueError as e:
            raise UnifiedInputError(str(e)) from None
        return self.tokenizer.decode(out)

    # --- image -> text --------------------------------------------------------------------------------------------
    def encode_images(self, images: Sequence[Image.Image] | Image.Image) -> Tensor:
        """PIL images -> tokens (B, grid, grid) with the QLIP tokenizer this model carries."""
        from ..transforms import image_transform

        self._need_images("read images")
        if isinstance(images, Image.Image):
            images = [images]
        if not images or not all(isinstance(im, Image.Image) for im in images):
            raise UnifiedInputError("give PIL images (or image tokens) to caption")
        transform = image_transform(self.qlip.image_size, train=False)
        pixels = torch.stack([transform(im.convert("RGB")) for im in images]).to(self.device)
        with torch.no_grad():
            return self.qlip.encode(pixels)

    def check_tokens(self, tokens: Tensor) -> Tensor:
        """Image tokens (B, grid, grid) as int64, or a one-line error when their grid or bit width is not the
        model's."""
        self._need_images("read images")
        image = self.cfg.image
        if not torch.is_tensor(tokens) or tokens.ndim not in (2, 3) or tokens.is_floating_point():
            raise UnifiedInputError("image tokens must be an integer tensor (grid, grid) or (B, grid, grid)")
        tokens = tokens[None] if tokens.ndim == 2 else tokens
        if tuple(tokens.shape[1:]) != (image.grid, image.grid):
            raise UnifiedInputError(f"the image tokens form a {tokens.shape[1]}x{tokens.shape[2]} grid but the model "
                                    f"reads {image.grid}x{image.grid} ({image.model}); encode the image with the "
                                    "model's own QLIP tokenizer")  # fmt: skip
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= 1 << image.bits):
            raise UnifiedInputError(f"the image tokens are not {image.bits}-bit indices (range {int(tokens.min())}.."
                                    f"{int(tokens.max())}); encode the image with the model's own QLIP tokenizer")
        return tokens.long().to(self.device)

    def caption(self, image: Image.Image | Tensor | Sequence[Image.Image], *, max_new_tokens: int = 32,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 0.95,
                seed: int = 0) -> str | list[str]:  # fmt: skip
        """The caption of an image (a PIL image, or its tokens (grid, grid)); a list of images (or a (B, grid,
        grid) tensor) gives a list of captions."""
        self._need_images("caption images")
        single = isinstance(image, Image.Image) or (torch.is_tensor(image) and image.ndim == 2)
        if torch.is_tensor(image):
            tokens = self.check_tokens(image)
        elif isinstance(image, (Image.Image, list, tuple)):
            tokens = self.encode_images(image)
        else:
            raise UnifiedInputError(f"caption() takes a PIL image or image tokens, got {type(image).__name__}")
        chooser = _chooser(1.0, temperature, top_k, top_p, seed, self.device)
        out = self.lm.sample_text(self.lm.image_prompt(tokens), max_new_tokens, chooser)
        texts = [self.tokenizer.decode(ids) for ids in out]
        return texts[0] if single else texts

    # --- text -> image --------------------------------------------------------------------------------------------
    def generate_tokens(self, prompts: Sequence[str] | str, *, cfg_scale: float = 3.0, temperature: float = 1.0,
                        top_k: int = 0, top_p: float = 0.95, seed: int = 0, n: int = 1) -> Tensor:  # fmt: skip
        """Image tokens (len(prompts) * n, grid, grid), prompt-major, reproducible for a seed."""
        self._need_images("generate images")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise UnifiedInputError("no prompts given; pass at least one caption")
        if not isinstance(n, int) or n < 1:
            raise UnifiedInputError(f"n (images per prompt) must be a positive integer, got {n!r}")
        ids = [self._text_ids(p, f"prompt {i}") for i, p in enumerate(prompts)]
        rows = [r for r in ids for _ in range(n)]
        chooser = _chooser(cfg_scale, temperature, top_k, top_p, seed, self.device, guided=cfg_scale != 1.0)
        try:
            return self.lm.sample_image(rows, chooser)
        except ValueError as e:  # a caption too long for the context
            raise UnifiedInputError(str(e)) from None

    def generate(self, prompts: Sequence[str] | str, **kwargs: Any) -> list[Image.Image]:
        """PIL images of :meth:`generate_tokens` (same arguments), decoded by the carried QLIP decoder."""
        from ..transforms import to_pil_images

        tokens = self.generate_tokens(prompts, **kwargs)
        with torch.no_grad():
            return to_pil_images(self.qlip.decode(tokens).float().cpu())

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        return save_unified(directory, self.lm, self.tokenizer, self.qlip, overwrite=overwrite)


def load(directory: str | Path, device: str | torch.device | None = None) -> UnifiedModel:
    """The :class:`UnifiedModel` of a language-model or unified-model directory."""
    from ..factory import create_model
    from ..tokenizer import get_tokenizer_from_dir

    directory = Path(directory)
    lm = load_lm(directory)
    tokenizer = get_tokenizer_from_dir(directory)
    qlip_model = None
    if lm.cfg.image is not None:
        sub = directory / QLIP_SUBDIR
        if not (sub / CONFIG_NAME).is_file():
            raise UnifiedDirectoryError(f"{directory} has no {QLIP_SUBDIR}/ QLIP model; a unified-model directory "
                                        "carries the tokenizer of its images")  # fmt: skip
        qlip_model = create_model(str(sub))
    um = UnifiedModel(lm, tokenizer, qlip_model)
    return um.to(device) if device is not None else um
