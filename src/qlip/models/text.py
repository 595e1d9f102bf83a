"""OpenAI CLIP text transformer (QLIP's text tower)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import TextConfig
from ..nn.transformer import Transformer


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.transformer = Transformer(
            cfg.layers,
            cfg.width,
            cfg.heads,
            cfg.mlp_hidden,
            mlp="gelu",
            k_bias=True,
            subln=False,
            eps=cfg.layer_norm_eps,
            causal=True,
        )
        self.final_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, text: Tensor) -> Tensor:
        """Token ids (B, L) -> the final hidden state at the end-of-text token (B, width).

        The EOT token is the largest id of the vocabulary, so its position is the argmax of each row (this is
        what the released configs' legacy ``eos_token_id`` 2 selects as well).
        """
        x = self.token_states(text)  # (B, L, W)
        eot = text.argmax(dim=-1)  # (B,)
        return x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W)

    def token_states(self, text: Tensor) -> Tensor:
        """Token ids (B, L) -> the final-normed hidden state of every token (B, L, width), for conditioning.

        The tower is causal, so the states up to the end token do not depend on the padding after it; the padding
        positions' states are meaningless (mask them with ``text_mask``).
        """
        if text.ndim != 2 or text.shape[1] > self.cfg.context_length:
            raise ValueError(
                f"expected token ids (B, L <= {self.cfg.context_length}), got {tuple(text.shape)}: tokenize with "
                "qlip.get_tokenizer(MODEL) (or vocabulary=DIR for a trained BPE), which pads to the model's context"
            )
        # The range check syncs with the device: done in eval mode only (the trainer's data is tokenized by us).
        if not self.training and text.numel() and (int(text.max()) >= self.cfg.vocab_size or int(text.min()) < 0):
            raise ValueError(
                f"token ids must lie in [0, {self.cfg.vocab_size}), got [{int(text.min())}, {int(text.max())}]: "
                "was the text tokenized with this model's tokenizer?"
            )
        n = text.shape[1]
        x = self.token_embed(text) + self.pos_embed[:n]  # (B, L, W)
        return self.final_norm(self.transformer(x))

    @staticmethod
    def text_mask(text: Tensor) -> Tensor:
        """(B, L) bool, True for the tokens up to and including the end token (the argmax id), False after it."""
        positions = torch.arange(text.shape[1], device=text.device)
        return positions[None, :] <= text.argmax(dim=-1, keepdim=True)

    def embed(self, pooled: Tensor) -> Tensor:
        return self.proj(pooled)
