"""Saving and loading: our format, and the released Hugging Face checkpoint layout (spec section 7).

Our format is a directory with ``config.json`` (a :class:`QLIPConfig`, marked ``"format": "qlip"``) and
``model.safetensors`` (our parameter names), plus the tokenizer files when there is a text tower.

The released layout has a Hugging Face style ``config.json`` and a ``model.safetensors`` with the original key
names. :func:`released_to_qlip_key` / :func:`qlip_to_released_key` map names one to one; the deterministic RoPE
tables some files carry are recomputed, never read. Loading reports every key it could not place and every
parameter it did not fill, by name, and never falls back to random weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import QLIPConfig, config_from_released, config_to_released, is_qlip_config

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

# ---------------------------------------------------------------------------------------------------------------------
# Key mapping. Each row: (our name, released name); "{i}" is a layer index, "{p}" is weight|bias.
# ---------------------------------------------------------------------------------------------------------------------

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


KEY_MAP: list[tuple[str, str]] = [
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

# Deterministic buffers that released files may hold; recomputed or unused, so skipped on load.
RECOMPUTED_KEY_PATTERNS = [re.compile(r".*rope\.freqs_(cos|sin)$"), re.compile(r".*position_ids$")]


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern + "$")


_OURS_TO_THEIRS = [(_template_regex(a), b) for a, b in KEY_MAP]
_THEIRS_TO_OURS = [(_template_regex(b), a) for a, b in KEY_MAP]


def _translate(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for regex, target in table:
        m = regex.match(key)
        if m:
            return target.format(**m.groupdict())
    return None


def released_to_qlip_key(key: str) -> str | None:
    """Released state-dict key -> our parameter name, or None if it has no place."""
    return _translate(key, _THEIRS_TO_OURS)


def qlip_to_released_key(key: str) -> str | None:
    return _translate(key, _OURS_TO_THEIRS)


# ---------------------------------------------------------------------------------------------------------------------
# Loading state dicts with a full report
# ---------------------------------------------------------------------------------------------------------------------


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model: the message lists every offending key by name."""


@dataclass
class LoadReport:
    unplaced: list[str] = field(default_factory=list)  # keys in the file with no parameter to go to
    unfilled: list[str] = field(default_factory=list)  # model parameters the file did not provide
    shape_mismatch: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # recomputed tables, or parts the model was built without

    @property
    def ok(self) -> bool:
        return not (self.unplaced or self.unfilled or self.shape_mismatch)

    def describe(self, limit: int = 50) -> str:
        lines = []
        for title, keys in (
            ("keys in the checkpoint with no place in the model", self.unplaced),
            ("model parameters the checkpoint did not fill", self.unfilled),
            ("shape mismatches", self.shape_mismatch),
        ):
            if keys:
                shown = "\n    ".join(keys[:limit])
                more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
                lines.append(f"  {title} ({len(keys)}):\n    {shown}{more}")
        return "\n".join(lines)


def load_state_dict_into(
    model: torch.nn.Module, state: dict[str, torch.Tensor], *, released: bool = False, strict: bool = True
) -> LoadReport:
    """Copy ``state`` into ``model`` by name; with ``released`` the keys are translated first.

    Keys of parts the model was built without (e.g. the text tower of a tokenizer-only model) are skipped, not
    errors. With ``strict`` any unplaced key, unfilled parameter or shape mismatch raises
    :class:`CheckpointMismatchError` listing them all.
    """
    own = model.state_dict()
    report = LoadReport()
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if any(p.match(key) for p in RECOMPUTED_KEY_PATTERNS):
            report.skipped.append(key)
            continue
        ours = released_to_qlip_key(key) if released else key
        if ours is None:
            report.unplaced.append(key)
            continue
        if ours not in own:
            # A part the model was built without (its attribute is None) is skipped; anything else has no place.
            built_without = getattr(model, ours.split(".", 1)[0], "absent") is None
            (report.skipped if built_without else report.unplaced).append(key)
            continue
        if tuple(tensor.shape) != tuple(own[ours].shape):
            report.shape_mismatch.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(own[ours].shape)}")
            continue
        mapped[ours] = tensor
    report.unfilled = sorted(k for k in own if k not in mapped)
    if strict and not report.ok:
        raise CheckpointMismatchError(
            f"checkpoint does not match the {getattr(getattr(model, 'cfg', None), 'name', 'model')} model:\n"
            + report.describe()
        )
    with torch.no_grad():
        for k, t in mapped.items():
            own[k].copy_(t)
    if report.skipped:
        log.info("skipped %d checkpoint keys (recomputed tables or absent parts)", len(report.skipped))
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Directories
# ---------------------------------------------------------------------------------------------------------------------


def read_config(directory: str | Path) -> tuple[QLIPConfig, bool]:
    """Read ``config.json`` of a model directory -> (config, is_released_layout)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is it a QLIP model directory?")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object of config fields, not a {type(d).__name__}; is it a QLIP "
                         "model's config.json?")  # fmt: skip
    try:
        if is_qlip_config(d):
            return QLIPConfig.from_dict(d), False
        if "vision_config" in d:
            return config_from_released(d, name=directory.name), True
    except (TypeError, ValueError) as e:  # a field of the wrong type or value
        raise ValueError(f"{path}: {e}") from e
    raise ValueError(f'{path} is neither a qlip config ("format": "qlip") nor a released QLIP config.json')


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        others = sorted(p.name for p in Path(directory).glob("*.bin")) + sorted(
            p.name for p in Path(directory).glob("*.pt*")
        )
        hint = f" (found {others}: convert them to safetensors; pickled weights are not loaded)" if others else ""
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}{hint}")
    try:
        return load_file(str(path))
    except SafetensorError as e:  # truncated or not a safetensors file at all
        raise ValueError(f"{path} is not a readable safetensors file ({e}); download or save the model again") from e


def _atomic_dir_write(directory: Path, write: Any) -> Path:
    """Write into a temporary sibling directory, then swap it in, so a crash never leaves a half-written model."""
    directory = directory.resolve()
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not a model folder; choose a folder name to save the model in")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _contiguous_cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_pretrained(model: torch.nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Our format: config.json + model.safetensors (+ tokenizer files), written atomically."""

    def write(tmp: Path) -> None:
        model.cfg.to_json(tmp / CONFIG_NAME)
        save_file(_contiguous_cpu_state(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "qlip": "1"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return _atomic_dir_write(Path(directory), write)


def save_released_layout(model: torch.nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write a directory laid out like the released Hugging Face repos (config.json + original key names)."""

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config_to_released(model.cfg), indent=2) + "\n")
        state, unnamed = {}, []
        for k, v in _contiguous_cpu_state(model).items():
            released = qlip_to_released_key(k)
            if released is None:
                unnamed.append(k)
            else:
                state[released] = v
        if unnamed:
            raise RuntimeError(f"these parameters have no name in the released layout: {unnamed}")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return _atomic_dir_write(Path(directory), write)
