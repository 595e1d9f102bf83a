"""Errors of the generation package: each is a ValueError with a one-line message saying what to fix."""

from __future__ import annotations


class GenerationInputError(ValueError):
    """A caption, a sampling setting or a token grid the generator cannot use."""


class EmptyCaptionError(GenerationInputError):
    """A caption with no text."""


class TokenizerMismatchError(GenerationInputError):
    """A QLIP model or token file whose bits, grid or quantizer differ from the ones the generator was made for."""


class GeneratorDirectoryError(ValueError):
    """A path that is not a generator directory (or not one save_pretrained may write into)."""
