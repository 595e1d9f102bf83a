"""qlip: QLIP visual tokenizer - BSQ image tokens aligned with text.

The public API, re-exported::

    model, preprocess_train, preprocess = qlip.create_model_and_transforms("./QLIP-B-16-256")
    tokenizer = qlip.get_tokenizer("./QLIP-B-16-256")
    tokens = model.encode(images)          # (B, h, w) int64 in [0, 2**28)
    recon = model.decode(tokens)           # (B, 3, H, W), CLIP-normalized
    gen = qlip.generation.load("runs/t2i-shapes/last")   # a text-to-image generator over QLIP tokens
    vlm = qlip.understanding.load("runs/vlm-shapes/last")  # a vision-language model: vlm.chat(image, question)
    um = qlip.unified.load("runs/um3-shapes/last")       # one decoder: complete, caption, generate
"""

from . import generation, understanding, unified
from .config import DecoderConfig, QLIPConfig, QuantizerConfig, TextConfig, VisionConfig
from .factory import create_model, create_model_and_transforms, get_model_config, get_tokenizer, list_models
from .models.qlip import QLIP
from .quantizers.bsq import BSQOutput, BSQuantizer
from .tokenizer import CLIPTokenizer, train_bpe
from .transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageLoadError, image_transform, load_image, to_pil_images

__version__ = "0.1.0"

__all__ = [
    "generation",
    "understanding",
    "unified",
    "QLIP",
    "BSQOutput",
    "BSQuantizer",
    "CLIPTokenizer",
    "DecoderConfig",
    "ImageLoadError",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "QLIPConfig",
    "QuantizerConfig",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "create_model_and_transforms",
    "get_model_config",
    "get_tokenizer",
    "image_transform",
    "list_models",
    "load_image",
    "to_pil_images",
    "train_bpe",
]
