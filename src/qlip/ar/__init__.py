"""The autoregressive core shared by every sequence model of the package (text-to-image now, others later).

A Llama-style decoder and its sampling utilities::

    from qlip.ar import ARConfig, ARTransformer, KVCache
    from qlip.ar import Chooser, cfg_logits, decode, sample

    core = ARTransformer(ARConfig(vocab_size=1024, width=256, depth=4, heads=4, max_seq_len=128))
    logits = core(tokens)                                   # (B, T) -> (B, T, V), causal
    hidden = core.forward_embeds(x)                         # (B, T, W) in: prepend conditions, mix vocabularies
    cache = core.new_cache(batch=B, max_len=T_max)          # static KV cache for incremental decoding
    h = core.forward_embeds(prefix, cache=cache)            # prefill; the cache position advances by T
    h = core.forward_embeds(next_embed, cache=cache)        # one step; RoPE positions follow the cache position
    ids = decode(core, prompt, 20, Chooser(guided=False, temperature=0.8, top_p=0.95, generator=g))  # LM sampling

Models that own their input embeddings and output heads (the image-token codecs of qlip.generation) build the
core with ``vocab_size=0`` and use :meth:`ARTransformer.forward_embeds` only.
"""

from .decode import decode
from .model import ARConfig, ARTransformer, KVCache, set_ar_attention_impl
from .sampling import Chooser, cfg_logits, filter_logits, sample

__all__ = [
    "ARConfig",
    "ARTransformer",
    "Chooser",
    "KVCache",
    "cfg_logits",
    "decode",
    "filter_logits",
    "sample",
    "set_ar_attention_impl",
]
