"""Model configuration: dataclasses with a JSON round trip, and the reader for released config.json files.

A QLIP model has four parts; any of them may be absent (``None``) to build a smaller model:
``vision`` (ViT encoder + CLS projection), ``quantizer`` (BSQ bottleneck with its two MLPs), ``decoder``
(ViT pixel decoder) and ``text`` (CLIP text transformer, or a pretrained Hugging Face encoder: :class:`HFTextConfig`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

FORMAT_NAME = "qlip"
FORMAT_VERSION = 1


def compression_ratio(patch_size: int, num_bits: int) -> float:
    """24 * p^2 / d: 8-bit RGB pixels of one p x p patch over the d bits of its token."""
    if patch_size < 1 or num_bits < 1:
        raise ValueError(f"patch size and bits must be positive, got p={patch_size}, d={num_bits}")
    return 24.0 * patch_size**2 / num_bits


@dataclass
class ViTConfig:
    """An EVA02-style ViT tower (encoder and decoder): SwiGLU, sub-LN, 2-D RoPE, no key bias."""

    image_size: int = 256
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_hidden: int = 2048
    layer_norm_eps: float = 1e-6
    k_bias: bool = False  # EVA02: no bias on the key projection
    subln: bool = True  # LayerNorm over concatenated heads before out-proj, and over the SwiGLU hidden
    rope: bool = True  # 2-D rotary embedding on the patch tokens
    rope_pretrain_grid: int = 16  # fixed "pretraining grid" constant of the released models' RoPE positions

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class VisionConfig(ViTConfig):
    """The image encoder; its CLS token feeds the contrastive projection."""

    proj_bias: bool = True  # the visual projection has a bias in the released models


@dataclass
class QuantizerConfig:
    """BSQ bottleneck (binary spherical quantization, with its input and output MLPs)."""

    dim: int = 28  # bits per token
    group_size: int = 1  # bits per entropy group
    inv_temperature: float = 1.0
    l2_norm: bool = True
    beta: float = 0.0  # commitment weight inside the BSQ loss
    gamma0: float = 1.0  # per-sample entropy weight
    gamma1: float = 1.0  # codebook entropy weight
    entropy: str = "group"  # "group" or "analytical"
    post_width: int | None = None  # width after quant_embed_post; None = the decoder width


@dataclass
class DecoderConfig(ViTConfig):
    """The pixel decoder: same block type as the encoder, RoPE over all tokens."""

    head_hidden: int = 2048  # Linear(width, head_hidden) -> Tanh -> Linear(head_hidden, 3 p^2)


@dataclass
class TextConfig:
    """OpenAI CLIP text transformer."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_hidden: int = 2048
    layer_norm_eps: float = 1e-5


HF_TEXT_KIND = "hf"


@dataclass
class HFTextConfig:
    """A pretrained Hugging Face encoder (BERT-like, e.g. all-MiniLM-L6-v2) with a learned projection as the text
    tower; its states are mean-pooled over the real tokens. The encoder's own config is kept whole, so the model
    directory rebuilds it without the folder it came from."""

    kind: str = HF_TEXT_KIND  # tells this section from a CLIP text transformer's in config.json
    source: str = ""  # where the pretrained weights came from ("minilm" or a folder); informative, never read back
    hf_config: dict[str, Any] = field(default_factory=dict)  # the encoder's Hugging Face config (config.to_dict())
    context_length: int = 77
    pad_token_id: int = 0  # the tokenizer's padding id: padding is masked out of attention and pooling
    pooling: str = "mean"  # mean over the real tokens (the sentence-embedding recipe of MiniLM)

    @property
    def model_type(self) -> str:
        return str(self.hf_config.get("model_type", ""))

    @property
    def width(self) -> int:
        return int(self.hf_config["hidden_size"])

    @property
    def layers(self) -> int:
        return int(self.hf_config.get("num_hidden_layers", 0))

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    def validate(self, name: str) -> None:
        if self.kind != HF_TEXT_KIND:
            raise ValueError(f"{name}: text.kind={self.kind!r} is unknown; a pretrained text tower has kind "
                             f"{HF_TEXT_KIND!r}")  # fmt: skip
        missing = [k for k in ("model_type", "hidden_size", "vocab_size") if k not in self.hf_config]
        if missing:
            raise ValueError(f"{name}: text.hf_config lacks {missing}; it must be the encoder's whole Hugging Face "
                             "config")  # fmt: skip
        if self.pooling != "mean":
            raise ValueError(f"{name}: text.pooling={self.pooling!r} is not supported (only 'mean')")
        limit = self.hf_config.get("max_position_embeddings")
        if self.context_length < 2 or (limit and self.context_length > limit):
            raise ValueError(f"{name}: text.context_length={self.context_length} must lie in [2, {limit}] (the "
                             "encoder's position limit)")  # fmt: skip


@dataclass
class QLIPConfig:
    """The whole model. ``embed_dim`` is the shared contrastive embedding size."""

    name: str = "qlip"
    embed_dim: int = 512
    logit_scale_init: float = 2.6592  # ln(1/0.07)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    quantizer: QuantizerConfig | None = field(default_factory=QuantizerConfig)
    decoder: DecoderConfig | None = field(default_factory=DecoderConfig)
    text: TextConfig | HFTextConfig | None = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        self.validate()

    # --- derived -------------------------------------------------------------------------------------------------
    @property
    def quant_post_width(self) -> int:
        q = self.quantizer
        if q is not None and q.post_width is not None:
            return q.post_width
        if self.decoder is not None:
            return self.decoder.width
        return self.vision.width if self.vision is not None else 0

    @property
    def compression_ratio(self) -> float | None:
        """See :func:`compression_ratio`; None without a vision tower or a quantizer."""
        if self.quantizer is None or self.vision is None:
            return None
        return compression_ratio(self.vision.patch_size, self.quantizer.dim)

    def validate(self) -> None:
        for part, cfg in (("vision", self.vision), ("decoder", self.decoder)):
            if cfg is None:
                continue
            if cfg.image_size % cfg.patch_size:
                raise ValueError(
                    f"{self.name}: {part}.image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}"
                )
            if cfg.width % cfg.heads:
                raise ValueError(f"{self.name}: {part}.width {cfg.width} is not divisible by heads {cfg.heads}")
            if cfg.rope and (cfg.width // cfg.heads) % 4:
                raise ValueError(
                    f"{self.name}: {part} head dim {cfg.width // cfg.heads} must be a multiple of 4 for 2-D RoPE"
                )
        if isinstance(self.text, HFTextConfig):
            self.text.validate(self.name)
        elif self.text is not None and self.text.width % self.text.heads:
            raise ValueError(f"{self.name}: text.width {self.text.width} is not divisible by heads {self.text.heads}")
        if self.decoder is not None and self.quantizer is not None and self.quant_post_width != self.decoder.width:
            raise ValueError(
                f"{self.name}: quantizer.post_width {self.quant_post_width} "
                f"must equal decoder.width {self.decoder.width}"
            )
        if self.vision is not None and self.decoder is not None:
            if self.vision.grid_size != self.decoder.grid_size:
                raise ValueError(
                    f"{self.name}: the encoder grid {self.vision.grid_size} and the decoder grid "
                    f"{self.decoder.grid_size} differ; image_size / patch_size must match"
                )

    # --- JSON ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **d}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QLIPConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a QLIP config is a JSON object of fields, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if not k.startswith("_")}  # "_comment" and the like
        d.pop("format", None)
        d.pop("format_version", None)
        sub = {"vision": VisionConfig, "quantizer": QuantizerConfig, "decoder": DecoderConfig, "text": TextConfig}
        kwargs: dict[str, Any] = {}
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QLIP config field(s) {sorted(unknown)}; known fields: {sorted(known)}")
        for key, value in d.items():
            if key == "text" and isinstance(value, dict) and "kind" in value:
                kwargs[key] = dataclass_from_dict(HFTextConfig, value, where=key)
            elif key in sub and value is not None:
                kwargs[key] = dataclass_from_dict(sub[key], value, where=key)
            else:
                kwargs[key] = value
        _check_types(cls, {k: v for k, v in kwargs.items() if k not in sub}, where="the top level")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> QLIPConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> QLIPConfig:
        return dataclasses.replace(self, **changes)


def dataclass_from_dict(cls: type, d: dict[str, Any], where: str, error: type[ValueError] = ValueError) -> Any:
    """``cls(**d)`` for a config dataclass read from JSON: unknown fields and wrong scalar types raise ``error``
    (a ValueError) with one line naming the section ``where``, the field and the known ones."""
    if not isinstance(d, dict):
        raise error(f"config section '{where}' must be a JSON object of fields, got {d!r}")
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise error(f"unknown field(s) {sorted(unknown)} in config section '{where}'; known: {sorted(known)}")
    try:
        _check_types(cls, d, where=f"section '{where}'")
    except ValueError as e:
        raise error(str(e)) from None
    return cls(**d)


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_types(cls: type, d: dict[str, Any], where: str) -> None:
    """Fields annotated int / float / bool / str (optionally ``| None``) must hold such a value."""
    hints = {f.name: str(f.type) for f in fields(cls)}
    for key, value in d.items():
        hint = hints.get(key, "")
        optional = hint.endswith(" | None")
        expected = _SCALARS.get(hint.removesuffix(" | None"))
        if expected is None or (value is None and optional):
            continue
        wrong_bool = isinstance(value, bool) and bool not in expected
        if wrong_bool or not isinstance(value, expected):
            raise ValueError(f"config {where}: {key} must be {hint.removesuffix(' | None')}"
                             f"{' or null' if optional else ''}, got {value!r}")  # fmt: skip


def is_qlip_config(d: dict[str, Any]) -> bool:
    return d.get("format") == FORMAT_NAME


# ---------------------------------------------------------------------------------------------------------------------
# Released (Hugging Face) config.json -> QLIPConfig
# ---------------------------------------------------------------------------------------------------------------------

_UNSUPPORTED_FALSE = ("swiglu",)


def config_from_released(d: dict[str, Any], name: str = "qlip") -> QLIPConfig:
    """Build a :class:`QLIPConfig` from a released ``config.json``; absent fields take the documented defaults."""
    vc = d.get("vision_config") or {}
    dc = d.get("decoder_config")
    tc = d.get("text_config")
    for section, cfg in (("vision_config", vc), ("decoder_config", dc or {})):
        for flag in _UNSUPPORTED_FALSE:
            if cfg.get(flag, True) is False:
                raise ValueError(
                    f"{section}.{flag}=false is not supported: the released QLIP models all use {flag}=true"
                )
    quantizer_name = vc.get("quantizer", "bsq")
    if quantizer_name not in ("bsq", None):
        raise ValueError(f"vision_config.quantizer={quantizer_name!r} is not supported (only 'bsq')")
    if vc.get("quantizer_embed_type", "mlp") != "mlp":
        raise ValueError(
            f"vision_config.quantizer_embed_type={vc['quantizer_embed_type']!r} is not supported (only 'mlp')"
        )

    vision = VisionConfig(
        image_size=vc.get("image_size", 256),
        patch_size=vc.get("patch_size", 16),
        width=vc.get("hidden_size", 768),
        layers=vc.get("num_hidden_layers", 12),
        heads=vc.get("num_attention_heads", 12),
        mlp_hidden=vc.get("intermediate_size", 2048),
        layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
        k_bias=vc.get("k_bias", False),
        subln=vc.get("subln", True),
        rope=vc.get("rope", True),
        proj_bias=d.get("vision_projection_bias", True),
    )
    qc = vc.get("quantizer_cfg") or {}
    quantizer = QuantizerConfig(
        dim=qc.get("embed_dim", 28),
        group_size=qc.get("group_size", 1),
        inv_temperature=qc.get("inv_temperature", 1.0),
        l2_norm=qc.get("l2_norm", vc.get("quantizer_l2_norm", True)),
        post_width=vc.get("hidden_size_post_q"),
    )
    decoder = None
    if dc is not None:
        decoder = DecoderConfig(
            image_size=dc.get("image_size", vision.image_size),
            patch_size=dc.get("patch_size", vision.patch_size),
            width=dc.get("hidden_size", 768),
            layers=dc.get("num_hidden_layers", 12),
            heads=dc.get("num_attention_heads", 12),
            mlp_hidden=dc.get("intermediate_size", 2048),
            layer_norm_eps=dc.get("layer_norm_eps", 1e-6),
            k_bias=dc.get("k_bias", False),
            subln=dc.get("subln", True),
            rope=dc.get("rope", True),
        )
    if quantizer.post_width is None and decoder is not None:
        quantizer.post_width = None  # derived from the decoder width
    text = None
    if tc is not None:
        if tc.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"text_config.hidden_act={tc['hidden_act']!r} is not supported (only exact 'gelu')")
        text = TextConfig(
            vocab_size=tc.get("vocab_size", 49408),
            context_length=tc.get("max_position_embeddings", 77),
            width=tc.get("hidden_size", 512),
            layers=tc.get("num_hidden_layers", 12),
            heads=tc.get("num_attention_heads", 8),
            mlp_hidden=tc.get("intermediate_size", 2048),
            layer_norm_eps=tc.get("layer_norm_eps", 1e-5),
        )
    if d.get("text_projection_bias", False):
        raise ValueError("text_projection_bias=true is not supported: the released QLIP text projection has no bias")
    return QLIPConfig(
        name=name,
        embed_dim=d.get("projection_dim", 512),
        logit_scale_init=d.get("logit_scale_init_value", 2.6592),
        vision=vision,
        quantizer=quantizer,
        decoder=decoder,
        text=text,
    )


def config_to_released(cfg: QLIPConfig) -> dict[str, Any]:
    """The inverse of :func:`config_from_released`, used to write directories in the released layout."""
    v, q, dec, t = cfg.vision, cfg.quantizer, cfg.decoder, cfg.text
    if v is None or q is None:
        raise ValueError("the released layout needs a vision encoder and a quantizer")
    if isinstance(t, HFTextConfig):
        raise ValueError("the released layout has no place for a pretrained Hugging Face text tower; save in the qlip "
                         "format (save_pretrained)")
    out: dict[str, Any] = {
        "architectures": ["QLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "text_projection_bias": False,
        "vision_projection_bias": v.proj_bias,
        "vision_config": {
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_size": v.width,
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads,
            "intermediate_size": v.mlp_hidden,
            "k_bias": v.k_bias,
            "layer_norm_eps": v.layer_norm_eps,
            "rope": v.rope,
            "subln": v.subln,
            "swiglu": True,
            "quantizer": "bsq",
            "quantizer_embed_type": "mlp",
            "quantizer_l2_norm": q.l2_norm,
            "hidden_size_post_q": cfg.quant_post_width,
            "quantizer_cfg": {
                "embed_dim": q.dim,
                "group_size": q.group_size,
                "input_format": "blc",
                "inv_temperature": q.inv_temperature,
                "l2_norm": q.l2_norm,
            },
        },
    }
    if dec is not None:
        out["decoder_config"] = {
            "image_size": dec.image_size,
            "patch_size": dec.patch_size,
            "hidden_size": dec.width,
            "num_hidden_layers": dec.layers,
            "num_attention_heads": dec.heads,
            "intermediate_size": dec.mlp_hidden,
            "k_bias": dec.k_bias,
            "layer_norm_eps": dec.layer_norm_eps,
            "rope": dec.rope,
            "subln": dec.subln,
            "swiglu": True,
        }
    if t is not None:
        out["text_config"] = {
            "bos_token_id": 0,
            "eos_token_id": 2,
            "vocab_size": t.vocab_size,
            "hidden_size": t.width,
            "intermediate_size": t.mlp_hidden,
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length,
            "hidden_act": "gelu",
            "layer_norm_eps": t.layer_norm_eps,
        }
    return out
