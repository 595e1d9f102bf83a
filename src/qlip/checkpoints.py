"""Saving and loading: our format, and the released Hugging Face checkpoint layout.

Our format is a directory with ``config.json`` (a :class:`QLIPConfig`, marked ``"format": "qlip"``) and
``model.safetensors`` (our parameter names), plus the tokenizer files when there is a text tower.

The released layout has a Hugging Face style ``config.json`` and a ``model.safetensors`` with the original key
names, mapped one to one by ``qlip.weights.released``. Files are read and placed by ``qlip.weights``, which reports
every key it could not place and every parameter it did not fill, by name, and never falls back to random weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import QLIPConfig, config_from_released, config_to_released, is_qlip_config
from .fileio import replace_files
from .weights import qlip_to_released_key, read_weight_file

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# The CLIP tokenizer's files, and the tokenizer.json of a pretrained Hugging Face text tower.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")

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
    """The ``model.safetensors`` of a model directory (:class:`qlip.weights.WeightFileError` if it is unreadable)."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        others = sorted(p.name for p in Path(directory).glob("*.bin")) + sorted(
            p.name for p in Path(directory).glob("*.pt*")
        )
        hint = f" (found {others}: convert them to safetensors; pickled weights are not loaded)" if others else ""
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}{hint}")
    return read_weight_file(path)


class ModelDirectoryError(FileExistsError):
    """``save_pretrained`` was pointed at a path that holds something other than a qlip model."""


# The files a model directory owns: saving replaces these and leaves every other file where it is.
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, *TOKENIZER_FILES)
_STAGE_PREFIX = ".qlip-save-"


def _is_model_directory(directory: Path) -> bool:
    try:
        read_config(directory)
    except (OSError, ValueError, TypeError, KeyError):
        return False
    return True


def check_save_target(directory: str | Path, overwrite: bool = False) -> None:
    """Raise :class:`ModelDirectoryError` for a path ``save_pretrained`` would refuse: a file, or a non-empty folder
    that is not a model directory (unless ``overwrite``). Callers that save late (the trainer) check early."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ModelDirectoryError(f"{directory} is a file, not a directory; choose a directory path for the model")
    if overwrite or not directory.is_dir():
        return
    others = sorted(p.name for p in directory.iterdir()
                    if p.name not in MODEL_FILES and not p.name.startswith(_STAGE_PREFIX))  # fmt: skip
    if others and not _is_model_directory(directory):
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ModelDirectoryError(
            f"{directory} is not empty and is not a qlip model directory (it holds {shown}); choose a new or empty "
            "directory, or pass overwrite=True to write the model files into it (its other files are left as they are)"
        )


def _write_model_dir(directory: str | Path, write: Any, overwrite: bool) -> Path:
    """Replace the model files of ``directory`` (only those) with what ``write(stage)`` puts into a staging folder.

    Each file is renamed into place atomically once all are written (``config.json`` last), so a crash while writing
    leaves the previous model files; files the save does not write (a README, a tokenizer saved earlier) stay.
    """
    directory = Path(directory).resolve()
    check_save_target(directory, overwrite)
    with replace_files(directory, prefix=_STAGE_PREFIX, last=(CONFIG_NAME,)) as stage:
        write(stage)
    return directory


def _contiguous_cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_pretrained(model: torch.nn.Module, directory: str | Path, tokenizer: Any = None, *,
                    overwrite: bool = False) -> Path:  # fmt: skip
    """Our format: config.json + model.safetensors (+ tokenizer files), each written atomically, and a model card.

    ``directory`` may be new, empty or a model directory; its other files are kept. A non-empty folder that is not
    a model directory raises :class:`ModelDirectoryError` unless ``overwrite`` (which writes the model files into
    it and still leaves the rest alone); a path that is a file always raises it. The card (``README.md``, see
    :mod:`qlip.model_card`) is written after the model files, and only where no README.md of someone else's is.
    """
    from .model_card import update_model_card

    def write(tmp: Path) -> None:
        model.cfg.to_json(tmp / CONFIG_NAME)
        save_file(_contiguous_cpu_state(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "qlip": "1"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    directory = _write_model_dir(directory, write, overwrite)
    update_model_card(directory, model.cfg)
    return directory


def save_released_layout(model: torch.nn.Module, directory: str | Path, tokenizer: Any = None, *,
                         overwrite: bool = False) -> Path:  # fmt: skip
    """Write a directory laid out like the released Hugging Face repos (config.json + original key names).

    ``directory`` is treated as in :func:`save_pretrained`.
    """

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

    return _write_model_dir(directory, write, overwrite)
