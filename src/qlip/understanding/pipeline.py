"""The VLM directory: save and load a self-contained vision-language model.

Layout::

    DIR/config.json          the VLMConfig ("format": "qlip-vlm"): tower, projector, LM kind (+ ARConfig or source)
    DIR/model.safetensors    the projector and, for "qlip-ar", the language model ("hf": the LM is read from
                             lm.source when the directory is loaded, offline; its weights are not copied)
    DIR/language_model.safetensors   "hf" with lm.weights "full": every LM weight, loaded over the source's
    DIR/adapters.safetensors         "hf" with lm.weights "lora": the LoRA adapters only, applied to the source
    DIR/tokenizer.json       the word tokenizer ("qlip-ar")
    DIR/vision/              the QLIP model of the tower (image encoder, + quantizer for "codes"), save_pretrained

The language model of a config comes from :data:`LM_BUILDERS` by its ``kind``: "qlip-ar" builds the package's
:class:`qlip.ar.ARTransformer`; "hf" reads a pretrained causal LM and its tokenizer from ``lm.source`` ("smollm2",
a .gguf file or a local Hugging Face folder) with :func:`qlip.hf.load_causal_lm`, then applies what the directory
holds of its own (``lm.weights``: nothing, all the LM's weights, or LoRA adapters).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..fileio import check_model_target, replace_files
from .errors import UnderstandingError
from .model import LMConfig, VisionLanguageModel, VisionTower, VLMConfig
from .text import WordTokenizer

FORMAT = "qlip-vlm"
FORMAT_VERSION = 2  # 2: an "hf" LM may carry its own weights ("full") or adapters ("lora"); 1 is written otherwise
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
VISION_SUBDIR = "vision"
LM_WEIGHTS_NAME = "language_model.safetensors"
ADAPTERS_NAME = "adapters.safetensors"
LM_FILES = {"full": LM_WEIGHTS_NAME, "lora": ADAPTERS_NAME}  # lm.weights -> the file that holds them
_STAGE_PREFIX = ".qlip-vlm-save-"


def _build_qlip_ar(cfg: LMConfig, directory: Path | None) -> tuple[nn.Module, Any]:
    from ..ar import ARConfig, ARTransformer

    tokenizer = WordTokenizer.load(directory / TOKENIZER_NAME) if directory is not None else None
    return ARTransformer(ARConfig.from_dict(cfg.ar)), tokenizer


def _build_hf(cfg: LMConfig, directory: Path | None) -> tuple[nn.Module, Any]:
    from ..hf import HFModelError, load_causal_lm

    try:
        lm, tokenizer = load_causal_lm(cfg.source)
    except HFModelError as e:
        raise UnderstandingError(f"cannot read the VLM's 'hf' language model (lm.source {cfg.source!r}): {e}") from None
    lm.requires_grad_(False)
    if cfg.weights == "lora":
        apply_lora(lm, cfg.lora, where=f"lm.source {cfg.source!r}")
    if directory is not None and cfg.weights != "source":
        _load_lm_file(lm, cfg, directory / LM_FILES[cfg.weights])
    return lm, tokenizer


def apply_lora(lm: nn.Module, options: dict[str, Any], *, where: str) -> list[str]:
    """Wrap the layers ``options["targets"]`` of an "hf" LM in LoRA adapters (rank, alpha, dropout of ``options``);
    returns the wrapped layers' names. A target that matches no layer of the LM is an UnderstandingError."""
    from ..nn.lora import add_lora

    try:
        return add_lora(lm, options["targets"], rank=int(options["rank"]), alpha=float(options["alpha"]),
                        dropout=float(options.get("dropout", 0.0)))  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise UnderstandingError(f"the LoRA adapters ({options}) do not fit the language model of {where}: "
                                 f"{e}") from None  # fmt: skip


def lm_weights_state(lm: nn.Module, weights: str) -> dict[str, torch.Tensor]:
    """What a VLM directory keeps of its "hf" LM: nothing ("source"), the adapters ("lora"), or every weight once
    ("full"; a tensor tied to another, like an output head sharing the input embeddings, is stored under its first
    name only and stays tied on loading)."""
    from ..nn.lora import lora_state_dict

    if weights == "lora":
        return lora_state_dict(lm)
    if weights != "full":
        return {}
    out, seen = {}, set()
    for k, v in lm.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().to("cpu").contiguous()
    return out


def _load_lm_file(lm: nn.Module, cfg: LMConfig, path: Path) -> None:
    from ..nn.lora import load_lora_state_dict
    from ..weights import WeightFileError
    from ..weights.files import read_weight_file

    try:
        state = read_weight_file(path)
    except FileNotFoundError:
        raise UnderstandingError(f"{path} is missing: the VLM directory is incomplete") from None
    except WeightFileError as e:
        raise UnderstandingError(str(e)) from None
    what = "adapters" if cfg.weights == "lora" else "language model weights"
    fix = (f"the VLM directory's {what} in {path.name} do not fit the language model of lm.source {cfg.source!r} "
           "(another model than the one it was trained on?); point lm.source in config.json at that model")
    try:
        if cfg.weights == "lora":
            load_lora_state_dict(lm, state)
            return
        expected = lm_weights_state(lm, "full")
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        reshaped = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
        if missing or unexpected or reshaped:
            raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}, reshaped {reshaped[:3]}")
        lm.load_state_dict(state, strict=False)  # strict=False: a tied tensor is stored under one name
    except (ValueError, RuntimeError) as e:
        raise UnderstandingError(f"{fix} ({str(e)[:300]})") from None


# kind -> (LM config, VLM directory or None) -> (language model, its tokenizer or None). A builder for "hf" reads
# cfg.source and applies the directory's own LM file (lm.weights, LM_FILES); the LM weights of model.safetensors
# are loaded afterwards under the "lm." prefix (none for "hf": see SOURCE_LM_KINDS).
LM_BUILDERS: dict[str, Callable[[LMConfig, Path | None], tuple[nn.Module, Any]]] = {
    "qlip-ar": _build_qlip_ar,
    "hf": _build_hf,
}


def build_language_model(cfg: LMConfig, directory: Path | None = None) -> tuple[nn.Module, Any]:
    if cfg.kind not in LM_BUILDERS:
        raise UnderstandingError(f"language model kind {cfg.kind!r} is not one of {sorted(LM_BUILDERS)}")
    return LM_BUILDERS[cfg.kind](cfg, directory)


# LM kinds read from a source: model.safetensors holds none of their weights (what the VLM changed of them, all its
# weights or adapters, is in their own file, LM_FILES).
SOURCE_LM_KINDS = ("hf",)


def _saved_state(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Projector and LM weights (the tower is saved as a QLIP model directory of its own; an LM of
    SOURCE_LM_KINDS is rebuilt from its source and its own file)."""
    skip = ("tower.", "lm.") if model.cfg.lm.kind in SOURCE_LM_KINDS else ("tower.",)
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if not k.startswith(skip)}


def check_vlm_target(directory: Path) -> None:
    """Refuse a file, or a non-empty folder that is not a VLM directory."""
    check_model_target(directory, is_ours=_is_vlm, error=UnderstandingError, what="VLM", staging_prefix=_STAGE_PREFIX)


def _is_vlm(directory: Path) -> bool:
    try:
        return json.loads((directory / CONFIG_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_vlm(directory: str | Path, model: VisionLanguageModel) -> Path:
    """Write a self-contained VLM directory (the tower's QLIP model first, config.json last)."""
    directory = Path(directory)
    check_vlm_target(directory)
    if model.tower is None:
        raise UnderstandingError("cannot save a VLM without its vision tower: the directory must be self-contained")
    model.tower.qlip.save_pretrained(directory / VISION_SUBDIR, overwrite=True)
    weights = model.cfg.lm.weights
    with replace_files(directory, prefix=_STAGE_PREFIX, last=(CONFIG_NAME,)) as stage:
        save_file(_saved_state(model), str(stage / WEIGHTS_NAME), metadata={"format": "pt", "qlip": FORMAT})
        if weights in LM_FILES:
            save_file(lm_weights_state(model.lm, weights), str(stage / LM_FILES[weights]),
                      metadata={"format": "pt", "qlip": FORMAT})  # fmt: skip
        if isinstance(model.tokenizer, WordTokenizer):
            model.tokenizer.save(stage / TOKENIZER_NAME)
        version = FORMAT_VERSION if weights != "source" else 1  # readable by a qlip that knows frozen LMs only
        payload = {"format": FORMAT, "format_version": version, **model.cfg.to_dict()}
        (stage / CONFIG_NAME).write_text(json.dumps(payload, indent=1) + "\n")
    for kind, name in LM_FILES.items():  # a previous export of the other kind into this VLM directory
        if kind != weights:
            (directory / name).unlink(missing_ok=True)
    return directory


def read_vlm_config(directory: str | Path) -> VLMConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise UnderstandingError(f"{directory} has no {CONFIG_NAME}; is it a VLM directory (run_dir/last of a "
                                 "`task: vlm` run)?")  # fmt: skip
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnderstandingError(f"{path} is not a valid VLM config: {e}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise UnderstandingError(f'{path} is not a VLM config (expected "format": "{FORMAT}")')
    if d.get("format_version", 0) > FORMAT_VERSION:
        raise UnderstandingError(f"{path}: VLM format version {d['format_version']} is newer than this qlip reads; "
                                 "upgrade qlip")  # fmt: skip
    try:
        return VLMConfig.from_dict(d)
    except (KeyError, TypeError) as e:
        raise UnderstandingError(f"{path} is not a valid VLM config: {e}") from None


def load(directory: str | Path, device: str | torch.device | None = None) -> VisionLanguageModel:
    """The :class:`VisionLanguageModel` of a VLM directory, in eval mode."""
    from ..checkpoints import ModelDirectoryError
    from ..factory import create_model
    from ..weights import WeightFileError, WeightsMismatchError
    from ..weights.files import read_weight_file

    directory = Path(directory)
    if not directory.is_dir():
        raise UnderstandingError(f"{directory} is not a directory; give a VLM directory (run_dir/last)")
    cfg = read_vlm_config(directory)
    sub = directory / VISION_SUBDIR
    if not (sub / "config.json").is_file():
        raise UnderstandingError(f"{directory} has no {VISION_SUBDIR}/ QLIP model; the VLM directory is incomplete")
    try:
        qlip_model = create_model(str(sub))
    except (ValueError, KeyError, OSError, WeightsMismatchError, ModelDirectoryError) as e:
        raise UnderstandingError(f"cannot load the vision tower in {sub}: {e}") from None
    tower = VisionTower(qlip_model, cfg.tower)
    lm, tokenizer = build_language_model(cfg.lm, directory)
    model = VisionLanguageModel(cfg, tower, lm, tokenizer)
    try:
        state = read_weight_file(directory / WEIGHTS_NAME)
    except FileNotFoundError:
        raise UnderstandingError(f"{directory / WEIGHTS_NAME} is missing: the VLM directory is incomplete") from None
    except WeightFileError as e:
        raise UnderstandingError(str(e)) from None
    expected = set(_saved_state(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UnderstandingError(f"{directory / WEIGHTS_NAME} does not match its config: missing {missing[:4]}, "
                                 f"unexpected {unexpected[:4]}")  # fmt: skip
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UnderstandingError(f"{directory / WEIGHTS_NAME} does not match its config: {str(e)[:300]}") from None
    model.eval()
    return model.to(device) if device is not None else model
