"""Text-to-image generation over QLIP tokens (LlamaGen-style).

::

    gen = qlip.generation.load("runs/t2i-shapes/last")      # generator + the QLIP model it was trained on
    images = gen.generate(["a blue circle"], cfg_scale=3.0, temperature=1.0, top_k=0, top_p=1.0, seed=0, n=1)

Modules: ``codec`` (image tokens <-> AR sequences: sub-tokens, depth head, bits), ``conditioning`` (frozen text
encoder states -> caption prefix, caption dropout), ``model`` (:class:`T2IModel`, :class:`T2IConfig`, saving),
``pipeline`` (the generator directory, :class:`Generator`, :func:`load`), ``errors``.
"""

from .codec import BitCodec, CodecConfig, DepthHeadCodec, ImageCodec, SubTokenCodec, make_codec
from .conditioning import ConditioningConfig
from .errors import EmptyCaptionError, GenerationInputError, GeneratorDirectoryError, TokenizerMismatchError
from .model import T2IConfig, T2IModel, check_token_spec
from .pipeline import CaptionTruncatedWarning, Generator, load, save_generator

__all__ = [
    "BitCodec",
    "CaptionTruncatedWarning",
    "CodecConfig",
    "ConditioningConfig",
    "DepthHeadCodec",
    "EmptyCaptionError",
    "GenerationInputError",
    "Generator",
    "GeneratorDirectoryError",
    "ImageCodec",
    "SubTokenCodec",
    "T2IConfig",
    "T2IModel",
    "TokenizerMismatchError",
    "check_token_spec",
    "load",
    "make_codec",
    "save_generator",
]
