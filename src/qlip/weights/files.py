"""Reading weight files: the one place qlip opens a file of tensors.

``.safetensors`` files are read directly; ``.pt`` / ``.pth`` / ``.bin`` only through
``torch.load(weights_only=True)``, which refuses pickled code, so a file a user could swap never runs anything.
Trainer checkpoints that wrap their weights (``{"state_dict": ...}``, ``{"model": ...}``, DDP's ``module.``
prefix) are unwrapped. Anything else that is not a mapping from names to tensors, and every truncated, empty or
corrupt file, raises :class:`WeightFileError` with one line that names the file and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
_WRAPPERS = ("state_dict", "model", "module")


class WeightFileError(ValueError):
    """A weight file cannot be read: truncated, empty, corrupt, of an unknown type or not a state dict."""


class WeightsMismatchError(ValueError):
    """Weights do not fit a network; the message lists every missing, unexpected or misshaped key by name."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else 'no details'}"


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # the Rust SafetensorError derives from Exception only
        raise WeightFileError(
            f"{path} could not be read as a safetensors file ({_first_line(err)}); it is truncated, empty or "
            "corrupt: download or export it again"
        ) from err


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (bad zip), EOFError (truncated), ...
        raise WeightFileError(
            f"{path} could not be read as a plain tensor state dict ({_first_line(err)}); it is truncated, corrupt "
            "or holds pickled code: download it again, or convert it to safetensors"
        ) from err


def _unwrap(obj: object) -> object:
    while isinstance(obj, Mapping):
        inner = next((obj[w] for w in _WRAPPERS if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def read_weight_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict (name -> tensor, on CPU) from a ``.safetensors``, ``.pt``, ``.pth`` or ``.bin`` file.

    Raises:
        FileNotFoundError: the file does not exist.
        WeightFileError: the file cannot be read as a state dict (one line: the file, the cause, what to do).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if suffix not in PICKLE_SUFFIXES:
        raise WeightFileError(
            f"{path} has an unknown weight file type {path.suffix!r}: give a {SAFETENSORS_SUFFIX} file, or a "
            f"{' / '.join(PICKLE_SUFFIXES)} state dict (read with torch.load(weights_only=True))"
        )
    state = _unwrap(_read_pickle(path))
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightFileError(
            f"{path} is not a plain state dict (a mapping from names to tensors); got {type(state).__name__}: "
            "give the file of the network's weights"
        )
    if not state:
        raise WeightFileError(f"{path} holds no tensors: give the file of the network's weights")
    return {str(k).removeprefix("module."): v for k, v in state.items()}
