"""The unified model (UM3): text-only, image-to-text and text-to-image in one autoregressive decoder.

::

    um = qlip.unified.load("runs/um3-shapes/last")     # or run_dir/last of a text-only language model (task: lm)
    um.complete("Return the")                           # text -> text
    um.caption(image)                                   # image -> text (a PIL image, encoded by the carried QLIP)
    um.generate(["a green star at the bottom."], cfg_scale=3.0)   # text -> images

Modules: ``corpus`` (the English text corpus: Python's own docstrings), ``model`` (one vocabulary, split softmax,
sequences, vocabulary extension), ``text`` (token streams, perplexity), ``mixing`` (the mixed batches and their
schedule), ``pipeline`` (the model directory, :class:`UnifiedModel`, :func:`load`), ``evaluate``
(``qlip eval unified``).
"""

from .corpus import TextCorpus, load_corpus, stdlib_docstrings
from .model import ImageVocab, UnifiedConfig, UnifiedLM, extend_vocabulary, split_nll, text_config, training_row
from .pipeline import (
    UnifiedDirectoryError,
    UnifiedInputError,
    UnifiedModel,
    is_unified_directory,
    load,
    load_lm,
    save_unified,
)

__all__ = [
    "ImageVocab",
    "TextCorpus",
    "UnifiedConfig",
    "UnifiedDirectoryError",
    "UnifiedInputError",
    "UnifiedLM",
    "UnifiedModel",
    "extend_vocabulary",
    "is_unified_directory",
    "load",
    "load_corpus",
    "load_lm",
    "save_unified",
    "split_nll",
    "stdlib_docstrings",
    "text_config",
    "training_row",
]
