"""Understanding: a LLaVA-style vision-language model over a QLIP vision tower.

::

    vlm = qlip.understanding.load("runs/vlm-shapes/last")
    vlm.chat(image, "Where is the shape?")                 # -> "in the top left corner"
    vlm.answer([img1, img2], ["What color is the shape?", "Is the shape a star?"])

Modules: ``protocols`` (the language-model and tokenizer slots), ``text`` (the word tokenizer of the from-scratch
LM), ``model`` (tower, projector, conversation format, :class:`VisionLanguageModel`), ``pipeline`` (the VLM
directory), ``data`` (shapes questions and answers, LLaVA's JSON conversations), ``evaluate`` (VQA accuracy).
"""

from .errors import UnderstandingError
from .model import (
    IMAGE_TOKEN,
    LMConfig,
    TowerConfig,
    VisionLanguageModel,
    VisionTower,
    VLMConfig,
    collate_conversations,
    make_projector,
    render_conversation,
)
from .pipeline import LM_BUILDERS, build_language_model, load, read_vlm_config, save_vlm
from .protocols import LanguageModel, TextTokenizer
from .text import WordTokenizer

__all__ = [
    "IMAGE_TOKEN",
    "LM_BUILDERS",
    "LMConfig",
    "LanguageModel",
    "TextTokenizer",
    "TowerConfig",
    "UnderstandingError",
    "VLMConfig",
    "VisionLanguageModel",
    "VisionTower",
    "WordTokenizer",
    "build_language_model",
    "collate_conversations",
    "load",
    "make_projector",
    "read_vlm_config",
    "render_conversation",
    "save_vlm",
]
