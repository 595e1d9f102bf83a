"""Initialization of the visual and text towers from a pretrained CLIP-family checkpoint.

The paper starts the visual encoder from EVA-02 / EVA-CLIP and the text encoder from CLIP. Three key layouts are
understood (OpenCLIP / OpenAI, EVA-CLIP, Hugging Face CLIPModel), each translated key by key into our names by
the rules of :data:`CLIP_KEYS`; every key that finds no place (or whose shape differs) is reported, and so is
every parameter of the chosen towers left unfilled.

The full table (source key -> our key -> transform) is in docs/training.md; :data:`CLIP_KEYS` is its code.

Not placeable by design (reported): the OpenAI / HF vision tower's ``ln_pre`` / ``pre_layrnorm`` (our EVA02
encoder has none) and its GELU MLP (``c_fc``, ``c_proj`` / ``fc1``, ``fc2``: our visual blocks use SwiGLU); a key
bias where our encoder has none (EVA02 has ``k_bias=False``); RoPE tables (recomputed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import Tensor, nn

from .mapping import RECOMPUTED_KEYS, KeyMap, KeyRule, LoadReport, Transform, load_into, rule

log = logging.getLogger(__name__)


def _transpose(t: Tensor) -> Tensor:
    return t.t().contiguous()


def _squeeze_leading(t: Tensor) -> Tensor:
    return t.reshape(t.shape[-1]) if t.ndim == 3 and t.shape[0] == t.shape[1] == 1 else t


def _drop_batch(t: Tensor) -> Tensor:
    return t[0] if t.ndim == 3 and t.shape[0] == 1 else t


def _third(k: int) -> Transform:
    def take(t: Tensor) -> Tensor:
        n = t.shape[0] // 3
        return t[k * n : (k + 1) * n].contiguous()

    return take


_P = r"(?P<p>weight|bias)"
_I = r"(?P<i>\d+)"
_T = r"(?:text\.)?"  # OpenCLIP's CustomTextCLIP (EVA-CLIP) nests the text tower under "text."


def _openai_block(src: str, ours: str, mlp: bool) -> list[KeyRule]:
    rules = [
        rule(rf"{src}\.{_I}\.ln_1\.{_P}", ours + ".{i}.norm1.{p}"),
        rule(rf"{src}\.{_I}\.ln_2\.{_P}", ours + ".{i}.norm2.{p}"),
        rule(rf"{src}\.{_I}\.attn\.out_proj\.{_P}", ours + ".{i}.attn.proj.{p}"),
        # nn.MultiheadAttention's fused in_proj holds q, k and v stacked along the output dimension.
        KeyRule(rf"{src}\.{_I}\.attn\.in_proj_{_P}",
                tuple((ours + ".{i}.attn." + name + ".{p}", _third(k)) for k, name in enumerate("qkv"))),
    ]  # fmt: skip
    if mlp:
        rules += [rule(rf"{src}\.{_I}\.mlp\.c_fc\.{_P}", ours + ".{i}.mlp.fc1.{p}"),
                  rule(rf"{src}\.{_I}\.mlp\.c_proj\.{_P}", ours + ".{i}.mlp.fc2.{p}")]  # fmt: skip
    return rules


def _hf_block(src: str, ours: str, mlp: bool) -> list[KeyRule]:
    rules = [
        rule(rf"{src}\.{_I}\.layer_norm1\.{_P}", ours + ".{i}.norm1.{p}"),
        rule(rf"{src}\.{_I}\.layer_norm2\.{_P}", ours + ".{i}.norm2.{p}"),
        rule(rf"{src}\.{_I}\.self_attn\.(?P<n>q|k|v)_proj\.{_P}", ours + ".{i}.attn.{n}.{p}"),
        rule(rf"{src}\.{_I}\.self_attn\.out_proj\.{_P}", ours + ".{i}.attn.proj.{p}"),
    ]
    if mlp:
        rules += [rule(rf"{src}\.{_I}\.mlp\.(?P<n>fc1|fc2)\.{_P}", ours + ".{i}.mlp.{n}.{p}")]
    return rules


_VB = "visual.transformer.blocks"
_TB = "text.transformer.blocks"

# The first matching rule wins.
CLIP_KEYS = KeyMap(
    [
        rule("logit_scale", "logit_scale"),
        # --- OpenCLIP / OpenAI vision ---
        rule(r"visual\.conv1\.weight", "visual.patch_embed.weight"),
        rule(r"visual\.class_embedding", "visual.class_embedding"),
        rule(r"visual\.positional_embedding", "visual.pos_embed"),
        *_openai_block(r"visual\.transformer\.resblocks", _VB, mlp=False),
        rule(rf"visual\.ln_post\.{_P}", "visual.post_norm.{p}"),
        rule(r"visual\.proj", "visual.proj.weight", _transpose),
        # --- OpenCLIP / OpenAI text (optionally under "text.") ---
        rule(rf"{_T}token_embedding\.weight", "text.token_embed.weight"),
        rule(rf"{_T}positional_embedding", "text.pos_embed"),
        *_openai_block(rf"{_T}transformer\.resblocks", _TB, mlp=True),
        rule(rf"{_T}ln_final\.{_P}", "text.final_norm.{p}"),
        rule(rf"{_T}text_projection", "text.proj.weight", _transpose),
        # --- EVA-CLIP vision ---
        rule(rf"visual\.patch_embed\.proj\.{_P}", "visual.patch_embed.{p}"),
        rule(r"visual\.cls_token", "visual.class_embedding", _squeeze_leading),
        rule(r"visual\.pos_embed", "visual.pos_embed", _drop_batch),
        rule(rf"visual\.blocks\.{_I}\.(?P<n>norm1|norm2)\.{_P}", _VB + ".{i}.{n}.{p}"),
        rule(rf"visual\.blocks\.{_I}\.attn\.(?P<n>q|k|v)_proj\.weight", _VB + ".{i}.attn.{n}.weight"),
        rule(rf"visual\.blocks\.{_I}\.attn\.(?P<n>q|k|v)_bias", _VB + ".{i}.attn.{n}.bias"),
        rule(rf"visual\.blocks\.{_I}\.attn\.inner_attn_ln\.{_P}", _VB + ".{i}.attn.inner_norm.{p}"),
        rule(rf"visual\.blocks\.{_I}\.attn\.proj\.{_P}", _VB + ".{i}.attn.proj.{p}"),
        rule(rf"visual\.blocks\.{_I}\.mlp\.(?P<n>w1|w2|w3)\.{_P}", _VB + ".{i}.mlp.{n}.{p}"),
        rule(rf"visual\.blocks\.{_I}\.mlp\.ffn_ln\.{_P}", _VB + ".{i}.mlp.ffn_norm.{p}"),
        rule(rf"visual\.norm\.{_P}", "visual.post_norm.{p}"),
        rule(rf"visual\.head\.{_P}", "visual.proj.{p}"),
        # --- Hugging Face CLIPModel ---
        rule(r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"),
        rule(rf"vision_model\.embeddings\.patch_embedding\.{_P}", "visual.patch_embed.{p}"),
        rule(r"vision_model\.embeddings\.position_embedding\.weight", "visual.pos_embed"),
        *_hf_block(r"vision_model\.encoder\.layers", _VB, mlp=False),
        rule(rf"vision_model\.post_layernorm\.{_P}", "visual.post_norm.{p}"),
        rule(rf"visual_projection\.{_P}", "visual.proj.{p}"),
        rule(r"text_model\.embeddings\.token_embedding\.weight", "text.token_embed.weight"),
        rule(r"text_model\.embeddings\.position_embedding\.weight", "text.pos_embed"),
        *_hf_block(r"text_model\.encoder\.layers", _TB, mlp=True),
        rule(rf"text_model\.final_layer_norm\.{_P}", "text.final_norm.{p}"),
        rule(r"text_projection\.weight", "text.proj.weight"),
    ],
    skip=(*RECOMPUTED_KEYS, r".*attn_mask"),
)


def translate_clip_key(key: str) -> list[tuple[str, Transform]]:
    """Our key(s) and transforms for one CLIP-family key (three for a fused qkv projection); [] if it has no place."""
    return CLIP_KEYS.translate(key)


def load_clip_towers(
    model: nn.Module, state: dict[str, Tensor], parts: Iterable[str] = ("visual", "text")
) -> LoadReport:
    """Copy a CLIP-family state dict into ``model``'s visual and/or text towers (and the logit scale).

    Args:
        model: a :class:`qlip.QLIP`.
        state: OpenCLIP / EVA-CLIP or Hugging Face CLIPModel state dict.
        parts: towers to fill ("visual", "text"); keys of other towers are skipped.

    Returns:
        A :class:`LoadReport` (partial by design: unplaced keys and unfilled parameters are listed, not errors);
        it is also logged.
    """
    report = load_into(model, state, CLIP_KEYS, parts=(*parts, "logit_scale"), strict=False)
    log.info("pretrained CLIP init: placed %d tensors\n%s", len(report.placed), report.describe())
    return report
