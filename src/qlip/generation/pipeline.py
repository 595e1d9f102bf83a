"""A generator directory and the :class:`Generator` that turns prompts into images.

Layout of a generator directory (self-contained)::

    DIR/config.json          the T2IConfig ("format": "qlip-t2i")
    DIR/model.safetensors    the generator's trainable weights
    DIR/qlip/                the QLIP model the tokens came from (text tower + quantizer + decoder), written by
                             QLIP.save_pretrained, with its text tokenizer

``load(DIR)`` rebuilds both and checks that the QLIP model matches (bits, grid, quantizer fingerprint). A generator
conditioned on a Hugging Face text encoder (``conditioning.encoder`` "hf:<source>" in config.json) names it there
and ``load`` rebuilds it from local files (it is not copied into DIR).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..tokenfile import TokenSpec
from .conditioning import ConditioningConfig, hf_encoder_source
from .errors import EmptyCaptionError, GenerationInputError
from .model import T2IModel, check_generator_target, check_token_spec, read_generator_config

log = logging.getLogger(__name__)

QLIP_SUBDIR = "qlip"


class CaptionTruncatedWarning(UserWarning):
    """A caption longer than the text tower's context was cut."""


class Generator:
    """A :class:`T2IModel` with the QLIP model (decoder, quantizer, text tower) and tokenizer it was trained on.

    ``tokenizer`` is the QLIP model's own; ``caption_tokenizer`` turns prompts into the generator's caption ids
    (the QLIP tokenizer unless the generator is conditioned on another text encoder).
    """

    def __init__(self, model: T2IModel, qlip_model: Any, tokenizer: Any, caption_tokenizer: Any = None):
        check_token_spec(model.cfg, TokenSpec.of(qlip_model))
        self.model, self.qlip, self.tokenizer = model.eval(), qlip_model.eval(), tokenizer
        self.caption_tokenizer = caption_tokenizer if caption_tokenizer is not None else tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.bos.device

    def to(self, device: str | torch.device) -> Generator:
        self.model.to(device)
        self.qlip.to(device)
        return self

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Caption ids (B, L); empty captions raise, over-long ones are cut with a :class:`CaptionTruncatedWarning`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise GenerationInputError("no prompts given; pass at least one caption")
        length = self.model.cfg.conditioning.context_length
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise EmptyCaptionError(f"prompt {i} is empty; give every image a caption")
            n = len(self.caption_tokenizer.encode(p)) + self.caption_tokenizer.num_special_tokens
            if n > length:
                warnings.warn(f"prompt {i} has {n} tokens but the text tower reads {length}: the last {n - length} "
                              f"were dropped", CaptionTruncatedWarning, stacklevel=3)  # fmt: skip
        return self.caption_tokenizer(prompts, context_length=length).to(self.device)

    @torch.no_grad()
    def generate_tokens(self, prompts: list[str], cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, seed: int = 0, n: int = 1) -> torch.Tensor:  # fmt: skip
        """Tokens (len(prompts) * n, h, w): the n samples of prompt 0 first, then those of prompt 1, ..."""
        if not isinstance(n, int) or n < 1:
            raise GenerationInputError(f"n (images per prompt) must be a positive integer, got {n!r}")
        ids = self.tokenize(list(prompts) if not isinstance(prompts, str) else [prompts]).repeat_interleave(n, 0)
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        return self.model.generate(ids, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator)  # fmt: skip

    @torch.no_grad()
    def generate(self, prompts: list[str], cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, n: int = 1) -> list[Image.Image]:  # fmt: skip
        """PIL images, ``n`` per prompt (prompt-major order), reproducible for a ``seed``."""
        from ..transforms import to_pil_images

        tokens = self.generate_tokens(prompts, cfg_scale, temperature, top_k, top_p, seed, n)
        return to_pil_images(self.qlip.decode(tokens).float().cpu())

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        return save_generator(directory, self.model, self.qlip, self.tokenizer, overwrite=overwrite)


def save_generator(directory: str | Path, model: T2IModel, qlip_model: Any, tokenizer: Any = None, *,
                   overwrite: bool = False) -> Path:  # fmt: skip
    """Write a self-contained generator directory: the QLIP model into ``DIR/qlip`` first, then the generator's
    config and weights (config last, so a directory with a config is complete)."""
    directory = Path(directory)
    check_generator_target(directory, overwrite)
    check_token_spec(model.cfg, TokenSpec.of(qlip_model))
    qlip_model.save_pretrained(directory / QLIP_SUBDIR, tokenizer=tokenizer, overwrite=overwrite)
    return model.save_pretrained(directory, overwrite=True)


def load(directory: str | Path, device: str | torch.device | None = None) -> Generator:
    """The :class:`Generator` of a generator directory (see the module docstring)."""
    from ..factory import create_model, get_tokenizer

    directory = Path(directory)
    cfg = read_generator_config(directory)
    sub = directory / QLIP_SUBDIR
    if not (sub / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no {QLIP_SUBDIR}/ QLIP model; a generator directory carries the "
                                f"tokenizer it was trained on (save it with qlip.generation.save_generator)")
    qlip_model = create_model(str(sub))  # every part it was saved with (the image encoder serves evaluation)
    check_token_spec(cfg, TokenSpec.of(qlip_model), what=f"the QLIP model in {sub}")
    text_encoder, caption_tokenizer = load_caption_encoder(cfg.conditioning, qlip_model)
    model = T2IModel.from_pretrained(directory, text_encoder=text_encoder)
    gen = Generator(model, qlip_model, get_tokenizer(str(sub)), caption_tokenizer)
    return gen.to(device) if device is not None else gen


def load_caption_encoder(cond: ConditioningConfig, qlip_model: Any) -> tuple[Any, Any]:
    """(text tower, caption tokenizer) that ``cond.encoder`` names: the QLIP model's text tower with no tokenizer
    of its own (None: the QLIP tokenizer), or a Hugging Face text encoder with its tokenizer, from local files."""
    source = hf_encoder_source(cond.encoder)
    if source is None:
        return qlip_model.text, None
    from ..hf import load_text_encoder

    encoder = load_text_encoder(source, context_length=cond.context_length)
    return encoder, encoder.tokenizer
