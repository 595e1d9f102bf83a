"""The one error of the Hugging Face bridge, and the checks that the optional extra is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

INSTALL_HF = 'pip install "qlip[hf]"'


class HFModelError(ValueError):
    """A Hugging Face model that cannot be used: missing (package, file or folder), unloadable, or of an
    architecture the bridge does not take. The message is one line saying what was wrong and what to do."""


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else 'no details'}"


def require_transformers() -> ModuleType:
    """The ``transformers`` module, or :class:`HFModelError` naming the install line when it is missing."""
    try:
        import transformers
    except ImportError:
        raise HFModelError(f"Hugging Face models need the transformers library: {INSTALL_HF}") from None
    return transformers


def require_gguf() -> None:
    """Reading a .gguf file needs ``gguf`` (the reader) and ``accelerate`` (transformers refuses GGUF files without
    it); transformers' own messages would not say how to get them."""
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as e:
        raise HFModelError(f"reading a .gguf file needs the {e.name} package: {INSTALL_HF}") from None


def require_sentencepiece() -> None:
    """A tokenizer shipped only as a SentencePiece model (T5's spiece.model, no tokenizer.json) needs it."""
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        raise HFModelError(f"this tokenizer is a SentencePiece model and needs the sentencepiece package: "
                           f"{INSTALL_HF}") from None  # fmt: skip


def packaged_model_dir(module: str, distribution: str, subdir: str = "") -> Path:
    """The folder of model files a pip package ships, located WITHOUT importing the package (importing it could
    run code; its files are all we read). Raises :class:`HFModelError` naming the install line when missing."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise HFModelError(f"the model package {distribution} is not installed: pip install --no-deps {distribution}")
    folder = Path(locations[0]) / subdir
    if not folder.is_dir():
        raise HFModelError(f"the package {distribution} has no {subdir or 'model'} folder at {folder}; reinstall it "
                           f"with pip install --force-reinstall --no-deps {distribution}")  # fmt: skip
    return folder
