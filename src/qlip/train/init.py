"""Initialization of the visual and text towers from a pretrained CLIP-style checkpoint (spec section 8).

The paper starts the visual encoder from EVA-02 / EVA-CLIP and the text encoder from CLIP. Three key layouts are
understood, each translated key by key into our names by the table :data:`CLIP_KEY_MAP`; every key that finds no
place (or whose shape differs) is reported, and so is every parameter of the chosen towers left unfilled.

The full table (source key -> our key -> transform) is in docs/training.md; :data:`CLIP_KEY_MAP` is its code.

Not placeable by design (reported): the OpenAI / HF vision tower's ``ln_pre`` / ``pre_layrnorm`` (our EVA02
encoder has none) and its GELU MLP (``c_fc``, ``c_proj`` / ``fc1``, ``fc2``: our visual blocks use SwiGLU); a key
bias where our encoder has none (EVA02 has ``k_bias=False``); RoPE tables (recomputed).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

Transform = Callable[[Tensor], Tensor]


def _copy(t: Tensor) -> Tensor:
    return t


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


def _openai_block(src: str, ours: str, mlp: bool) -> list[tuple[str, str, Transform]]:
    rows = [
        (rf"{src}\.{_I}\.ln_1\.{_P}", ours + ".{i}.norm1.{p}", _copy),
        (rf"{src}\.{_I}\.ln_2\.{_P}", ours + ".{i}.norm2.{p}", _copy),
        (rf"{src}\.{_I}\.attn\.out_proj\.{_P}", ours + ".{i}.attn.proj.{p}", _copy),
    ]
    for k, name in enumerate("qkv"):
        rows.append((rf"{src}\.{_I}\.attn\.in_proj_(?P<p>weight|bias)", ours + ".{i}.attn." + name + ".{p}",
                     _third(k)))  # fmt: skip
    if mlp:
        rows += [(rf"{src}\.{_I}\.mlp\.c_fc\.{_P}", ours + ".{i}.mlp.fc1.{p}", _copy),
                 (rf"{src}\.{_I}\.mlp\.c_proj\.{_P}", ours + ".{i}.mlp.fc2.{p}", _copy)]  # fmt: skip
    return rows


def _hf_block(src: str, ours: str, mlp: bool) -> list[tuple[str, str, Transform]]:
    rows = [
        (rf"{src}\.{_I}\.layer_norm1\.{_P}", ours + ".{i}.norm1.{p}", _copy),
        (rf"{src}\.{_I}\.layer_norm2\.{_P}", ours + ".{i}.norm2.{p}", _copy),
        (rf"{src}\.{_I}\.self_attn\.q_proj\.{_P}", ours + ".{i}.attn.q.{p}", _copy),
        (rf"{src}\.{_I}\.self_attn\.k_proj\.{_P}", ours + ".{i}.attn.k.{p}", _copy),
        (rf"{src}\.{_I}\.self_attn\.v_proj\.{_P}", ours + ".{i}.attn.v.{p}", _copy),
        (rf"{src}\.{_I}\.self_attn\.out_proj\.{_P}", ours + ".{i}.attn.proj.{p}", _copy),
    ]
    if mlp:
        rows += [(rf"{src}\.{_I}\.mlp\.fc1\.{_P}", ours + ".{i}.mlp.fc1.{p}", _copy),
                 (rf"{src}\.{_I}\.mlp\.fc2\.{_P}", ours + ".{i}.mlp.fc2.{p}", _copy)]  # fmt: skip
    return rows


_VB = "visual.transformer.blocks"
_TB = "text.transformer.blocks"

# (source key regex, our key template, transform); the first matching row wins.
CLIP_KEY_MAP: list[tuple[str, str, Transform]] = [
    ("logit_scale", "logit_scale", _copy),
    # --- OpenCLIP / OpenAI vision ---
    ("visual\\.conv1\\.weight", "visual.patch_embed.weight", _copy),
    ("visual\\.class_embedding", "visual.class_embedding", _copy),
    ("visual\\.positional_embedding", "visual.pos_embed", _copy),
    *_openai_block(r"visual\.transformer\.resblocks", _VB, mlp=False),
    (rf"visual\.ln_post\.{_P}", "visual.post_norm.{p}", _copy),
    ("visual\\.proj", "visual.proj.weight", _transpose),
    # --- OpenCLIP / OpenAI text (optionally under "text.") ---
    (rf"{_T}token_embedding\.weight", "text.token_embed.weight", _copy),
    (rf"{_T}positional_embedding", "text.pos_embed", _copy),
    *_openai_block(rf"{_T}transformer\.resblocks", _TB, mlp=True),
    (rf"{_T}ln_final\.{_P}", "text.final_norm.{p}", _copy),
    (rf"{_T}text_projection", "text.proj.weight", _transpose),
    # --- EVA-CLIP vision ---
    (rf"visual\.patch_embed\.proj\.{_P}", "visual.patch_embed.{p}", _copy),
    ("visual\\.cls_token", "visual.class_embedding", _squeeze_leading),
    ("visual\\.pos_embed", "visual.pos_embed", _drop_batch),
    (rf"visual\.blocks\.{_I}\.norm1\.{_P}", _VB + ".{i}.norm1.{p}", _copy),
    (rf"visual\.blocks\.{_I}\.norm2\.{_P}", _VB + ".{i}.norm2.{p}", _copy),
    (rf"visual\.blocks\.{_I}\.attn\.(?P<n>q|k|v)_proj\.weight", _VB + ".{i}.attn.{n}.weight", _copy),
    (rf"visual\.blocks\.{_I}\.attn\.(?P<n>q|k|v)_bias", _VB + ".{i}.attn.{n}.bias", _copy),
    (rf"visual\.blocks\.{_I}\.attn\.inner_attn_ln\.{_P}", _VB + ".{i}.attn.inner_norm.{p}", _copy),
    (rf"visual\.blocks\.{_I}\.attn\.proj\.{_P}", _VB + ".{i}.attn.proj.{p}", _copy),
    (rf"visual\.blocks\.{_I}\.mlp\.(?P<n>w1|w2|w3)\.{_P}", _VB + ".{i}.mlp.{n}.{p}", _copy),
    (rf"visual\.blocks\.{_I}\.mlp\.ffn_ln\.{_P}", _VB + ".{i}.mlp.ffn_norm.{p}", _copy),
    (rf"visual\.norm\.{_P}", "visual.post_norm.{p}", _copy),
    (rf"visual\.head\.{_P}", "visual.proj.{p}", _copy),
    # --- Hugging Face CLIPModel ---
    ("vision_model\\.embeddings\\.class_embedding", "visual.class_embedding", _copy),
    (rf"vision_model\.embeddings\.patch_embedding\.{_P}", "visual.patch_embed.{p}", _copy),
    ("vision_model\\.embeddings\\.position_embedding\\.weight", "visual.pos_embed", _copy),
    *_hf_block(r"vision_model\.encoder\.layers", _VB, mlp=False),
    (rf"vision_model\.post_layernorm\.{_P}", "visual.post_norm.{p}", _copy),
    (rf"visual_projection\.{_P}", "visual.proj.{p}", _copy),
    ("text_model\\.embeddings\\.token_embedding\\.weight", "text.token_embed.weight", _copy),
    ("text_model\\.embeddings\\.position_embedding\\.weight", "text.pos_embed", _copy),
    *_hf_block(r"text_model\.encoder\.layers", _TB, mlp=True),
    (rf"text_model\.final_layer_norm\.{_P}", "text.final_norm.{p}", _copy),
    ("text_projection\\.weight", "text.proj.weight", _copy),
]
_COMPILED = [(re.compile(pattern + "$"), template, fn) for pattern, template, fn in CLIP_KEY_MAP]
_IGNORED = re.compile(r".*(rope\.freqs_(cos|sin)|position_ids|attn_mask)$")


def translate_clip_key(key: str) -> list[tuple[str, Transform]]:
    """Our key(s) and transforms for one source key (several for a fused qkv projection); [] if it has no place."""
    out = []
    for pattern, template, fn in _COMPILED:
        m = pattern.match(key)
        if m:
            out.append((template.format(**m.groupdict()), fn))
            if "in_proj" not in key:
                break
    return out


@dataclass
class InitReport:
    """What a CLIP-style initialization did; ``describe()`` for a human."""

    placed: list[str] = field(default_factory=list)  # our keys filled
    unplaced: list[str] = field(default_factory=list)  # source keys with no place in the chosen towers (+ reason)
    unfilled: list[str] = field(default_factory=list)  # our keys of the chosen towers left at their init

    def describe(self, limit: int = 40) -> str:
        lines = [f"placed {len(self.placed)} tensors"]
        for title, keys in (("unplaced source keys", self.unplaced), ("unfilled parameters", self.unfilled)):
            if keys:
                more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
                lines.append(f"{title} ({len(keys)}): " + ", ".join(keys[:limit]) + more)
        return "\n".join(lines)


def read_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from .safetensors, or a torch pickle (.pt / .pth / .bin) loaded with ``weights_only``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}


@torch.no_grad()
def load_clip_towers(
    model: nn.Module, state: dict[str, Tensor], parts: Iterable[str] = ("visual", "text")
) -> InitReport:
    """Copy a CLIP-style state dict into ``model``'s visual and/or text towers (and the logit scale).

    Args:
        model: a :class:`qlip.QLIP`.
        state: OpenCLIP / EVA-CLIP or Hugging Face CLIPModel state dict.
        parts: towers to fill ("visual", "text"); keys of other towers are reported as unplaced.

    Returns:
        An :class:`InitReport`; it is also logged.
    """
    parts = tuple(parts)
    own = model.state_dict()
    report = InitReport()
    for key, tensor in state.items():
        if _IGNORED.match(key):
            continue
        targets = translate_clip_key(key)
        if not targets:
            report.unplaced.append(f"{key} (no place in our architecture)")
            continue
        for ours, fn in targets:
            tower = ours.split(".", 1)[0]
            if tower not in parts and tower != "logit_scale":
                report.unplaced.append(f"{key} -> {ours} (tower {tower!r} not asked for)")
                continue
            if ours not in own:
                report.unplaced.append(f"{key} -> {ours} (our model has no such parameter)")
                continue
            value = fn(tensor)
            if tuple(value.shape) != tuple(own[ours].shape):
                report.unplaced.append(f"{key} -> {ours} (shape {tuple(value.shape)} vs ours {tuple(own[ours].shape)})")
                continue
            own[ours].copy_(value)
            report.placed.append(ours)
    chosen = tuple(f"{p}." for p in parts)
    placed = set(report.placed)
    report.unfilled = sorted(k for k in own if k.startswith(chosen) and k not in placed)
    log.info("pretrained CLIP init: %s", report.describe())
    return report
