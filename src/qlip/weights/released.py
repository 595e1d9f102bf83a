"""The released QLIP checkpoints' key names (Hugging Face layout) <-> ours, one to one.

Each row of :data:`RELEASED_NAMES` is (our name, released name); ``{i}`` is a layer index, ``{p}`` is
weight|bias. The deterministic RoPE tables some released files carry are recomputed, never read.
"""

from __future__ import annotations

from .mapping import RECOMPUTED_KEYS, KeyMap

_COMMON_BLOCK = [
    ("norm1.{p}", "layer_norm1.{p}"),
    ("norm2.{p}", "layer_norm2.{p}"),
    ("attn.q.{p}", "self_attn.q_proj.{p}"),
    ("attn.k.{p}", "self_attn.k_proj.{p}"),
    ("attn.v.{p}", "self_attn.v_proj.{p}"),
    ("attn.proj.{p}", "self_attn.out_proj.{p}"),
]
_EVA_BLOCK = _COMMON_BLOCK + [
    ("attn.inner_norm.{p}", "self_attn.inner_attn_ln.{p}"),
    *((f"mlp.{w}.{{p}}", f"mlp.{w}.{{p}}") for w in ("w1", "w2", "w3")),
    ("mlp.ffn_norm.{p}", "mlp.ffn_ln.{p}"),
]
_CLIP_TEXT_BLOCK = _COMMON_BLOCK + [("mlp.fc1.{p}", "mlp.fc1.{p}"), ("mlp.fc2.{p}", "mlp.fc2.{p}")]


def _block_rows(ours: str, theirs: str, block: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(f"{ours}.{{i}}.{a}", f"{theirs}.{{i}}.{b}") for a, b in block]


RELEASED_NAMES: list[tuple[str, str]] = [
    ("logit_scale", "logit_scale"),
    ("visual.proj.{p}", "visual_projection.{p}"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.patch_embed.{p}", "vision_model.embeddings.patch_embedding.{p}"),
    ("visual.pos_embed", "vision_model.embeddings.position_embedding.weight"),
    *_block_rows("visual.transformer.blocks", "vision_model.encoder.layers", _EVA_BLOCK),
    ("visual.post_norm.{p}", "vision_model.post_layernorm.{p}"),
    ("quant_in.fc1.{p}", "vision_model.quant_embed.c_fc.{p}"),
    ("quant_in.fc2.{p}", "vision_model.quant_embed.c_proj.{p}"),
    ("quant_out.fc1.{p}", "vision_model.quant_embed_post.c_fc.{p}"),
    ("quant_out.fc2.{p}", "vision_model.quant_embed_post.c_proj.{p}"),
    ("decoder.pos_embed", "vision_decoder.position_embeddings"),
    *_block_rows("decoder.transformer.blocks", "vision_decoder.encoder.layers", _EVA_BLOCK),
    ("decoder.norm.{p}", "vision_decoder.norm.{p}"),
    ("decoder.head.fc.{p}", "vision_decoder.ffn.0.{p}"),
    ("decoder.head.out.{p}", "vision_decoder.conv_out.{p}"),
    ("text.token_embed.weight", "text_model.embeddings.token_embedding.weight"),
    ("text.pos_embed", "text_model.embeddings.position_embedding.weight"),
    *_block_rows("text.transformer.blocks", "text_model.encoder.layers", _CLIP_TEXT_BLOCK),
    ("text.final_norm.{p}", "text_model.final_layer_norm.{p}"),
    ("text.proj.weight", "text_projection.weight"),
]

RELEASED_KEYS = KeyMap.from_templates(((theirs, ours) for ours, theirs in RELEASED_NAMES), skip=RECOMPUTED_KEYS)
TO_RELEASED_KEYS = KeyMap.from_templates(RELEASED_NAMES)


def released_to_qlip_key(key: str) -> str | None:
    """Released state-dict key -> our parameter name, or None if it has no place."""
    return RELEASED_KEYS.rename(key)


def qlip_to_released_key(key: str) -> str | None:
    """Our parameter name -> the released key, or None if the released layout has no such tensor."""
    return TO_RELEASED_KEYS.rename(key)
