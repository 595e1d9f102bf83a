"""The QLIP model: a CLIP-style image/text model whose image encoder is also a BSQ tokenizer.

    image --ViT--> CLS -> post_norm -> proj -> image embedding (contrastive)
                   patches -> quant_in MLP -> BSQ (d bits / token) -> quant_out MLP -> ViT decoder -> pixels
    text --CLIP text transformer--> EOT token -> proj -> text embedding (contrastive)
         (or a pretrained Hugging Face encoder --mean over tokens--> proj: :mod:`qlip.models.hf_text`)

Any part can be left out through the config (``vision``, ``quantizer``, ``decoder``, ``text`` set to ``None``):
a tokenizer without a text tower, an encoder for understanding, or a decoder that only turns indices into pixels.

Loading lives in :mod:`qlip.factory` (``create_model``), which builds this class; this module never imports it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import HFTextConfig, QLIPConfig
from ..nn.attention import set_attention_impl
from ..quantizers.bsq import BSQOutput, BSQuantizer, bits_to_indices, indices_to_bits, indices_to_group_indices
from .decoder import VisionDecoder
from .hf_text import HFTextTower
from .text import TextEncoder
from .vision import VisionEncoder

log = logging.getLogger(__name__)

TOKEN_OUTPUTS = ("indices", "bits", "group_indices", "codes")


class BottleneckMLP(nn.Module):
    """Linear -> exact GELU -> Linear (quant_embed / quant_embed_post of the released models)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def build_text_tower(cfg: QLIPConfig) -> TextEncoder | HFTextTower | None:
    """The CLIP text transformer, a pretrained Hugging Face encoder with a projection, or None, as ``cfg.text`` says."""
    if cfg.text is None:
        return None
    if isinstance(cfg.text, HFTextConfig):
        return HFTextTower(cfg.text, cfg.embed_dim)
    return TextEncoder(cfg.text, cfg.embed_dim)


class QLIP(nn.Module):
    def __init__(self, cfg: QLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionEncoder(cfg.vision, cfg.embed_dim) if cfg.vision is not None else None
        q = cfg.quantizer
        if q is not None:
            if cfg.vision is not None:
                self.quant_in = BottleneckMLP(cfg.vision.width, cfg.vision.width, q.dim)
            else:
                self.quant_in = None
            self.quantizer = BSQuantizer(
                q.dim,
                group_size=q.group_size,
                inv_temperature=q.inv_temperature,
                l2_norm=q.l2_norm,
                beta=q.beta,
                gamma0=q.gamma0,
                gamma1=q.gamma1,
                entropy=q.entropy,
            )
            post = cfg.quant_post_width
            self.quant_out = BottleneckMLP(q.dim, post, post) if post else None
        else:
            self.quant_in = self.quantizer = self.quant_out = None
        self.decoder = VisionDecoder(cfg.decoder) if cfg.decoder is not None else None
        self.text = build_text_tower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        # Ablation switch (paper Table 3c), not part of the config: reconstruct from the continuous latents.
        self.bypass_quantizer = False

    # --- properties ----------------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        part = self.cfg.vision or self.cfg.decoder
        return part.grid_size

    @property
    def image_size(self) -> int:
        part = self.cfg.vision or self.cfg.decoder
        return part.image_size

    @property
    def num_bits(self) -> int:
        return self._need("quantizer").dim

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def _need(self, part: str) -> Any:
        module = getattr(self, {"vision": "visual"}.get(part, part))
        if module is None:
            raise RuntimeError(
                f"this {self.cfg.name} model was built without its {part} part; create it with that part to use this"
            )
        return getattr(self.cfg, part) if part != "vision" else self.cfg.vision

    # --- switches ------------------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enabled: bool = True) -> QLIP:
        """Recompute each transformer block in the backward pass (less activation memory, ~30% more compute)."""
        for m in (self.visual, self.decoder, self.text):
            if isinstance(m, HFTextTower):
                m.set_grad_checkpointing(enabled)
            elif m is not None:
                m.transformer.grad_checkpointing = enabled
        return self

    def set_quantizer_bypass(self, enabled: bool = True) -> QLIP:
        """Training ablation: the decoder sees the l2-normalized continuous latents instead of the BSQ codes.

        The paper's "quantizer added afterwards" recipe trains stage 1 this way and learns the quantizer in stage 2.
        Indices and usage statistics are still reported; the BSQ loss terms are zero.
        """
        self.bypass_quantizer = enabled
        return self

    def set_attention_impl(self, impl: str) -> QLIP:
        """ "sdpa" (fused kernels, default) or "reference" (explicit softmax(qk^T)v, for tests and benchmarks)."""
        set_attention_impl(self, impl)
        return self

    # --- image side ----------------------------------------------------------------------------------------------
    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """Images (B, 3, S, S), CLIP-normalized -> image embeddings (B, embed_dim)."""
        self._need("vision")
        emb = self.visual.embed(self.visual(images).cls)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_image_features(self, images: Tensor, layer: int = -2, include_cls: bool = False) -> Tensor:
        """Continuous features of one encoder block (default: second to last, the LLaVA choice the paper follows).

        Returns (B, N, width) patch features, or (B, 1 + N, width) with the CLS token first.
        """
        self._need("vision")
        feats = self.visual(images, return_layers=(layer,)).layers[0]
        return feats if include_cls else feats[:, 1:]

    def _latents(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images -> (CLS token (B, W), pre-quantization latents u (B, N, d))."""
        self._need("vision")
        self._need("quantizer")
        out = self.visual(images)
        return out.cls, self.quant_in(out.patches)

    @torch.no_grad()
    def encode(self, images: Tensor, output: str = "indices", group_size: int | None = None) -> Tensor:
        """Images -> discrete tokens on the (h, w) patch grid.

        Args:
            images: (B, 3, S, S) CLIP-normalized pixels.
            output: "indices" (B, h, w) int64 in [0, 2**d); "bits" (B, h, w, d) bool, MSB first;
                "group_indices" (B, h, w, d // group_size) int64; "codes" (B, h, w, d) float in {+-1/sqrt(d)}.
            group_size: bits per group for "group_indices" (defaults to the quantizer's group size).
        """
        if output not in TOKEN_OUTPUTS:
            raise ValueError(f"unknown output {output!r}; choose one of {TOKEN_OUTPUTS}")
        _, u = self._latents(images)
        codes, indices = self.quantizer.quantize(u)  # (B, N, d), (B, N)
        g = self.grid_size
        if output == "codes":
            return rearrange(codes, "b (h w) d -> b h w d", h=g)
        indices = rearrange(indices, "b (h w) -> b h w", h=g)
        if output == "indices":
            return indices
        if output == "bits":
            return indices_to_bits(indices, self.num_bits)
        return indices_to_group_indices(indices, self.num_bits, group_size or self.cfg.quantizer.group_size)

    def tokens_to_codes(self, tokens: Tensor, kind: str = "indices", group_size: int | None = None) -> Tensor:
        """Discrete tokens (indices (B, h, w), bits (B, h, w, d) or group indices (B, h, w, G)) -> codes (B, N, d)."""
        d = self.num_bits
        if kind == "bits":
            tokens = bits_to_indices(tokens.to(torch.int64))
        elif kind == "group_indices":
            from ..quantizers.bsq import group_indices_to_indices

            tokens = group_indices_to_indices(tokens, group_size or self.cfg.quantizer.group_size)
        elif kind != "indices":
            raise ValueError(f"unknown token kind {kind!r}; choose 'indices', 'bits' or 'group_indices'")
        if tokens.dtype.is_floating_point:
            raise TypeError(f"token indices must be an integer tensor, got {tokens.dtype}")
        tokens = tokens.to(torch.int64)
        if tokens.ndim == 3:
            tokens = rearrange(tokens, "b h w -> b (h w)")
        n = self.grid_size**2
        if tokens.ndim != 2 or tokens.shape[1] != n:
            raise ValueError(
                f"expected token indices of shape (B, {self.grid_size}, {self.grid_size}) or (B, {n}) for "
                f"{self.cfg.name}, got {tuple(tokens.shape)}"
            )
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= 2**d:
            raise ValueError(f"token indices must lie in [0, 2**{d}), got values in [{lo}, {hi}]")
        return self.quantizer.indices_to_codes(tokens)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Quantized codes (B, N, d) or (B, h, w, d) -> pixels (B, 3, S, S), CLIP-normalized."""
        self._need("decoder")
        if codes.ndim == 4:
            codes = rearrange(codes, "b h w d -> b (h w) d")
        return self.decoder(self.quant_out(codes.to(self.quant_out.fc1.weight.dtype)))

    @torch.no_grad()
    def decode(self, tokens: Tensor, kind: str = "indices", group_size: int | None = None) -> Tensor:
        """Token indices (B, h, w) -> pixels (B, 3, S, S) in the CLIP-normalized space (see transforms.to_uint8)."""
        self._need("quantizer")
        return self.decode_codes(self.tokens_to_codes(tokens, kind, group_size))

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Encode then decode; equal to ``decode(encode(images))``."""
        _, u = self._latents(images)
        codes, _ = self.quantizer.quantize(u)
        return self.decode_codes(codes)

    # --- text side -----------------------------------------------------------------------------------------------
    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        """Token ids (B, L) -> text embeddings (B, embed_dim)."""
        self._need("text")
        emb = self.text.embed(self.text(text))
        return F.normalize(emb, dim=-1) if normalize else emb

    # --- training forward ----------------------------------------------------------------------------------------
    def forward(self, images: Tensor | None = None, text: Tensor | None = None) -> dict[str, Any]:
        """The training forward pass; computes whatever the given inputs and the model's parts allow.

        Returns a dict with (when available): ``image_embeds`` / ``text_embeds`` (L2-normalized),
        ``logit_scale`` (exp of the learned scalar), ``latents`` (pre-quantization u, (B, N, d)),
        ``reconstruction`` (B, 3, S, S), ``quantizer`` (a :class:`BSQOutput`: codes, indices, loss, commit loss,
        entropies, usage stats).
        """
        out: dict[str, Any] = {"logit_scale": self.logit_scale.exp()}
        if images is not None:
            self._need("vision")
            vis = self.visual(images)
            out["image_embeds"] = F.normalize(self.visual.embed(vis.cls), dim=-1)
            if self.quantizer is not None:
                u = self.quant_in(vis.patches)  # (B, N, d)
                q: BSQOutput = self.quantizer(u)
                if self.bypass_quantizer:
                    zero = q.loss.new_zeros(())
                    q = dataclasses.replace(
                        q,
                        codes=F.normalize(u.float(), dim=-1),
                        loss=zero,
                        commit_loss=zero,
                        per_sample_entropy=zero,
                        codebook_entropy=zero,
                    )
                out["latents"] = u
                out["quantizer"] = q
                if self.decoder is not None:
                    out["reconstruction"] = self.decoder(self.quant_out(q.codes.to(u.dtype)))
        if text is not None:
            out["text_embeds"] = self.encode_text(text, normalize=True)
        return out

    # --- saving --------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, tokenizer: Any = None, *, overwrite: bool = False) -> Path:
        """Write our format: ``config.json`` (QLIPConfig) + ``model.safetensors``, each file atomically.

        Only the model's own files are replaced; see :func:`qlip.checkpoints.save_pretrained` for ``overwrite``.
        """
        from ..checkpoints import save_pretrained

        return save_pretrained(self, directory, tokenizer=tokenizer, overwrite=overwrite)
