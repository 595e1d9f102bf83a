"""Saving and loading: our format, and the released Hugging Face checkpoint layout (spec section 7).

Our format is a directory with ``config.json`` (a :class:`QLIPConfig`, marked ``"format": "qlip"``) and
``model.safetensors`` (our parameter names), plus the tokenizer files when there is a text tower.

The released layout has a Hugging Face style ``config.json`` and a ``model.safetensors`` with the original key
names, mapped one to one by ``qlip.weights.released``. Files are read and placed by ``qlip.weights``, which reports
every key it could not place and every parameter it did not fill, by name, and never falls back to random weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import QLIPConfig, config_from_released, config_to_released, is_qlip_config
from .weights import qlip_to_released_key, read_weight_file

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

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
    if is_qlip_config(d):
        return QLIPConfig.from_dict(d), False
    if "vision_config" in d:
        return config_from_released(d, name=directory.name), True
    raise ValueError(f'{path} is neither a qlip config ("format": "qlip") nor a released QLIP config.json')


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The ``model.safetensors`` of a model directory (:class:`qlip.weights.WeightFileError` if it is unreadable)."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        others = sorted(p.name for p in Path(directory).glob("*.bin")) + sorted(
            p.name for p in Path(directory).glob("*.pt*")
        )
        hint = f" (found {others}: convert them to safetensors; pickled weights are not loaded)" if others else ""
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}{hint}")
    return read_weight_file(path)


def _atomic_dir_write(directory: Path, write: Any) -> Path:
    """Write into a temporary sibling directory, then swap it in, so a crash never leaves a half-written model."""
    directory = directory.resolve()
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
