"""A pretrained Hugging Face encoder (BERT-like, e.g. all-MiniLM-L6-v2) as QLIP's text tower.

    text ids --HF encoder--> token states --mean over real tokens--> proj -> text embedding (contrastive)

The paper initializes the text tower from a pretrained model; this tower does so with a small offline encoder. It
offers the interface of :class:`qlip.models.text.TextEncoder` (``forward`` pools, ``embed`` projects,
``token_states`` / ``text_mask`` for conditioning). The encoder is rebuilt from the Hugging Face config kept in
:class:`qlip.config.HFTextConfig`; its weights live in the model's own safetensors file like every other part.
Building it needs transformers (the optional extra ``hf``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from ..config import HFTextConfig
from ..hf.errors import INSTALL_HF, HFModelError

# Keys of a Hugging Face config.to_dict() that describe where and how it was saved, not the network.
_VOLATILE_KEYS = ("transformers_version", "torch_dtype", "dtype", "_name_or_path", "_attn_implementation_autoset")


def hf_config_dict(config: Any) -> dict[str, Any]:
    """The parts of a Hugging Face config that define the network (JSON-ready), for :class:`HFTextConfig`.

    Generic fields (generation settings and the like) are left out where they hold the value that both the base
    config and the model's config class give by default, so rebuilding yields them again."""
    from transformers import PretrainedConfig

    generic, own = PretrainedConfig().to_dict(), type(config)().to_dict()
    return {k: v for k, v in config.to_dict().items()
            if k not in _VOLATILE_KEYS and not (k in generic and generic[k] == v == own.get(k))}  # fmt: skip


def build_hf_encoder(cfg: HFTextConfig) -> nn.Module:
    """A randomly initialized encoder of the kept config (the weights are loaded afterwards)."""
    try:
        import transformers
    except ImportError:
        raise HFModelError(f"this model's text tower is a pretrained {cfg.model_type} encoder and building it needs "
                           f"the transformers library: {INSTALL_HF}; or build the model without it, "
                           "parts=('vision', 'quantizer', 'decoder')") from None  # fmt: skip
    d = dict(cfg.hf_config)
    try:
        config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
        return transformers.AutoModel.from_config(config)
    except Exception as e:  # an unknown model type of a newer transformers, or a config it refuses
        text = str(e).strip().splitlines()
        raise HFModelError(f"cannot build the {cfg.model_type} text tower from its config ({type(e).__name__}: "
                           f"{text[0] if text else 'no details'}); is transformers older than the one that "
                           "saved it?") from None  # fmt: skip


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's list of transformer blocks (BERT's ``encoder.layer``, ...): the longest ModuleList."""
    lists = [m for m in encoder.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise HFModelError(f"{type(encoder).__name__} has no list of layers to unfreeze or shard")
    return max(lists, key=len)


class HFTextTower(nn.Module):
    """Pretrained encoder + mean pooling + a learned projection. See the module docstring."""

    def __init__(self, cfg: HFTextConfig, embed_dim: int, encoder: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder if encoder is not None else build_hf_encoder(cfg)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.width**-0.5)

    @property
    def blocks(self) -> nn.ModuleList:
        return encoder_layers(self.encoder)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def set_trainable(self, spec: str) -> HFTextTower:
        """Which encoder weights train (the projection always does): "projection" (none, the default), "all", or
        "last-N" (the top N blocks). A pooler head, unused by mean pooling, never trains."""
        n = len(self.blocks)
        match = re.fullmatch(r"last-(\d+)", spec)
        if spec not in ("projection", "all") and not (match and 1 <= int(match[1]) <= n):
            raise ValueError(f"text tower trainable={spec!r}: choose 'projection', 'all' or 'last-N' with N in "
                             f"1..{n} (the encoder's blocks)")  # fmt: skip
        self.encoder.requires_grad_(spec == "all")
        if match:
            for block in list(self.blocks)[n - int(match[1]) :]:
                block.requires_grad_(True)
        for name, module in self.encoder.named_children():
            if name == "pooler":
                module.requires_grad_(False)
        self.train(self.training)
        return self

    def set_grad_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif self.encoder.is_gradient_checkpointing:
            self.encoder.gradient_checkpointing_disable()

    def train(self, mode: bool = True) -> HFTextTower:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # a frozen encoder never drops out: its outputs are the pretrained ones
        return self

    def text_mask(self, text: Tensor) -> Tensor:
        """(B, L) bool, True for real tokens (everything but the padding id)."""
        return text != self.cfg.pad_token_id

    def token_states(self, text: Tensor) -> Tensor:
        """Token ids (B, L) -> last-layer states of every token (B, L, width); padding positions are meaningless."""
        if text.ndim != 2 or text.shape[1] > self.cfg.context_length:
            raise ValueError(f"expected token ids (B, L <= {self.cfg.context_length}), got {tuple(text.shape)}: "
                             "tokenize with qlip.get_tokenizer(MODEL), which pads to the model's context")  # fmt: skip
        if not self.training and text.numel() and (int(text.max()) >= self.cfg.vocab_size or int(text.min()) < 0):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got [{int(text.min())}, "
                             f"{int(text.max())}]: was the text tokenized with this model's tokenizer?")  # fmt: skip
        mask = self.text_mask(text)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.encoder(input_ids=text, attention_mask=mask.long()).last_hidden_state

    def forward(self, text: Tensor) -> Tensor:
        """Token ids (B, L) -> the mean of the real tokens' states (B, width)."""
        states = self.token_states(text)  # (B, L, W)
        mask = self.text_mask(text).unsqueeze(-1).to(states.dtype)  # (B, L, 1)
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def embed(self, pooled: Tensor) -> Tensor:
        return self.proj(pooled)
