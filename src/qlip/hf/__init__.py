"""The Hugging Face bridge: pretrained causal LMs and text encoders from local files (the optional extra ``hf``).

Importing this package imports no transformers; each loader does, and says ``pip install "qlip[hf]"`` when it
is missing. Every failure to find or load a model is an :class:`HFModelError` (one line).

* :func:`load_causal_lm` ("smollm2", a .gguf file or a local folder) -> (:class:`HFCausalLM`, :class:`HFTokenizer`):
  the LM behind the interface of :class:`qlip.ar.ARTransformer`, so :func:`qlip.ar.decode` drives it.
* :func:`load_text_encoder` ("minilm" or a local T5 / BERT-like / CLIP text folder) -> :class:`HFTextEncoder`:
  frozen per-token states for caption conditioning (``ConditioningConfig.encoder = "hf:<source>"``).
"""

from .causal_lm import SMOLLM2, HFCache, HFCausalLM, HFTokenizer, load_causal_lm
from .errors import HFModelError
from .text_encoder import MINILM, HFCaptionTokenizer, HFTextEncoder, TextTruncatedWarning, load_text_encoder

__all__ = [
    "MINILM",
    "SMOLLM2",
    "HFCache",
    "HFCaptionTokenizer",
    "HFCausalLM",
    "HFModelError",
    "HFTextEncoder",
    "HFTokenizer",
    "TextTruncatedWarning",
    "load_causal_lm",
    "load_text_encoder",
]
