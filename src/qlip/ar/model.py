"""A Llama-style decoder-only transformer with a static KV cache.

Pre-RMSNorm blocks: causal self-attention with 1-D RoPE (optional QK-norm, SDPA or an explicit reference path) and
a SwiGLU MLP; a final RMSNorm and an output head (optionally tied to the token embedding).

The block forward has no data-dependent Python control flow: the only branches depend on whether a cache or a
padding mask is given and on the attention implementation, so ``torch.compile`` traces one graph per call pattern.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..nn.mlp import SwiGLU
from ..nn.rope import apply_rope

ATTENTION_IMPLS = ("sdpa", "reference")


def default_mlp_hidden(width: int) -> int:
    """Llama's SwiGLU size: 8/3 of the width (equal parameters to a 4x GELU MLP), rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * width / 3 / 64)


@dataclass
class ARConfig:
    """Size and options of an :class:`ARTransformer`.

    ``vocab_size`` 0 builds no token embedding and no head (callers feed embeddings and read hidden states).
    ``mlp_hidden`` None means :func:`default_mlp_hidden` of the width. ``max_seq_len`` bounds the RoPE table and
    the default cache length.
    """

    vocab_size: int = 0
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_hidden: int | None = None
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    qk_norm: bool = False
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.width <= 0 or self.depth <= 0 or self.heads <= 0 or self.max_seq_len <= 0:
            raise ValueError(f"width, depth, heads and max_seq_len must be positive, got {self}")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width {self.width} must split into {self.heads} heads of an even size (RoPE pairs)")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0, got {self.vocab_size}")
        if self.tie_embeddings and self.vocab_size == 0:
            raise ValueError("tie_embeddings needs a vocabulary (vocab_size > 0)")
        if self.mlp_hidden is None:
            self.mlp_hidden = default_mlp_hidden(self.width)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ARConfig:
        from ..config import dataclass_from_dict

        return dataclass_from_dict(cls, d, where="ARConfig")


def rope_1d_tables(head_dim: int, max_len: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Cos / sin tables (max_len, head_dim) for positions 0..max_len-1, in the interleaved-pair layout that
    :func:`qlip.nn.rope.apply_rope` rotates: pair i turns at frequency theta^(-2i / head_dim)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (Dh/2,)
    angles = repeat(torch.outer(torch.arange(max_len, dtype=torch.float64), freqs), "n f -> n (f two)", two=2)
    return angles.cos().float(), angles.sin().float()


class KVCache:
    """Preallocated keys and values, (B, heads, max_len, head_dim) per layer, plus which slots hold real tokens.

    ``pos`` counts the tokens written so far; each :meth:`ARTransformer.forward_embeds` call with the cache writes
    its T tokens at ``pos .. pos+T-1`` and advances ``pos`` by T once all layers have run.
    """

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):  # fmt: skip
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)  # key padding of written slots
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0
        self.valid.fill_(True)


def _reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v written out, softmax in float32; mask: bool, True = may attend."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.impl = "sdpa"

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                kv: tuple[Tensor, Tensor, int] | None) -> Tensor:  # fmt: skip
        """x (B, T, W); cos/sin (T, Dh) of the tokens' positions; mask (B|1, 1, T, S) bool or None (plain causal);
        kv: (cache keys, cache values, write position) or None."""
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        if kv is not None:
            ck, cv, pos = kv
            t = x.shape[1]
            ck[:, :, pos : pos + t] = k.to(ck.dtype)
            cv[:, :, pos : pos + t] = v.to(cv.dtype)
            k, v = ck[:, :, : pos + t].to(q.dtype), cv[:, :, : pos + t].to(q.dtype)  # (B, H, S, Dh)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        elif self.impl == "reference":
            if mask is None:
                n = q.shape[-2]
                mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            out = _reference_attention(q, k, v, mask)
        else:
            raise ValueError(f"unknown attention impl {self.impl!r}; choose one of {ATTENTION_IMPLS}")
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))


class ARBlock(nn.Module):
    """x = x + Attn(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.width, cfg.mlp_hidden, subln=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                kv: tuple[Tensor, Tensor, int] | None = None) -> Tensor:  # fmt: skip
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv)
        return x + self.mlp(self.mlp_norm(x))


class ARTransformer(nn.Module):
    """Decoder-only transformer. Key names: tok_embed, blocks.{i}.{attn_norm,attn.{qkv,proj},mlp_norm,mlp}, norm,
    lm_head (absent when tied or without a vocabulary)."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.width) if cfg.vocab_size else None
        self.blocks = nn.ModuleList(ARBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        own_head = cfg.vocab_size and not cfg.tie_embeddings
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False) if own_head else None
        cos, sin = rope_1d_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # deterministic: recomputed, never saved
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.apply(_init_weights)

    # --- sizes (the language-model interface of qlip.understanding reads these) ---------------------------------
    @property
    def width(self) -> int:
        """Width W of the embeddings and hidden states."""
        return self.cfg.width

    @property
    def vocab_size(self) -> int:
        """Size V of the token vocabulary (0: embeddings in, hidden states out)."""
        return self.cfg.vocab_size

    @property
    def max_seq_len(self) -> int:
        """Most positions one sequence may hold (prefix, prompt and generated tokens together)."""
        return self.cfg.max_seq_len

    # --- vocabulary side -----------------------------------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """Token ids (B, T) -> embeddings (B, T, W)."""
        if self.tok_embed is None:
            raise RuntimeError("this ARTransformer has no vocabulary (vocab_size=0): feed embeddings to forward_embeds")
        return self.tok_embed(tokens)

    def head(self, hidden: Tensor) -> Tensor:
        """Final hidden states (B, T, W) (already normalized by forward_embeds) -> logits (B, T, V)."""
        if self.tok_embed is None:
            raise RuntimeError("this ARTransformer has no vocabulary (vocab_size=0): it has no output head")
        if self.lm_head is None:
            return hidden @ self.tok_embed.weight.t()
        return self.lm_head(hidden)

    def forward(self, tokens: Tensor, *, cache: KVCache | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:  # fmt: skip
        """Token ids (B, T) -> logits (B, T, V)."""
        return self.head(self.forward_embeds(self.embed(tokens), cache=cache, key_padding_mask=key_padding_mask))

    # --- sequence side -------------------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                  cache_class: type[KVCache] = KVCache) -> KVCache:  # fmt: skip
        """An empty :class:`KVCache` on the model's device (dtype: the parameters', unless given); ``cache_class``:
        a subclass that carries more per-row state (the unified model's)."""
        p = self.norm.weight
        return cache_class(self.cfg.depth, batch, self.cfg.heads, max_len or self.cfg.max_seq_len, self.cfg.head_dim,
                           device=p.device, dtype=dtype or p.dtype)  # fmt: skip

    def forward_embeds(self, x: Tensor, *, cache: KVCache | None = None,
                       key_padding_mask: Tensor | None = None) -> Tensor:  # fmt: skip
        """Embeddings (B, T, W) -> final-normed hidden states (B, T, W), causal.

        Args:
            x: input embeddings; with a cache, the T tokens that follow the cache's ``pos`` tokens.
            cache: a :class:`KVCache` (from :meth:`new_cache`); positions start at its ``pos``, which advances by T.
            key_padding_mask: (B, T) bool, True for real tokens: False ones are never attended to (they still get
                an output). With a cache it is stored, so later steps keep ignoring those slots.
        """
        t = x.shape[1]
        pos = cache.pos if cache is not None else 0
        if pos + t > self.cfg.max_seq_len or (cache is not None and pos + t > cache.max_len):
            limit = min(self.cfg.max_seq_len, cache.max_len) if cache is not None else self.cfg.max_seq_len
            raise ValueError(f"sequence of {pos + t} tokens exceeds the limit of {limit} (max_seq_len / cache length)")
        cos, sin = self.rope_cos[pos : pos + t], self.rope_sin[pos : pos + t]  # (T, Dh)
        mask = None
        if cache is not None or key_padding_mask is not None:
            keys = torch.arange(pos + t, device=x.device)
            mask = (keys[None, :] <= keys[pos:, None])[None, None]  # (1, 1, T, S): causal from position pos
            if cache is not None:
                if key_padding_mask is not None:
                    cache.valid[:, pos : pos + t] = key_padding_mask
                valid = cache.valid[:, : pos + t]
            else:
                valid = key_padding_mask
            if valid is not None:
                mask = mask & valid[:, None, None, :]  # (B, 1, T, S)
        for i, block in enumerate(self.blocks):
            kv = (cache.k[i], cache.v[i], pos) if cache is not None else None
            if self.grad_checkpointing and cache is None and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv)
        if cache is not None:
            cache.pos = pos + t
        return self.norm(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def set_ar_attention_impl(module: nn.Module, impl: str) -> None:
    """Switch every AR attention layer under ``module`` to ``impl`` ("sdpa" or "reference")."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {ATTENTION_IMPLS}")
    for m in module.modules():
        if isinstance(m, CausalSelfAttention):
            m.impl = impl
