"""The two duck-typed slots of the vision-language model: the language model and its text tokenizer.

Anything with these attributes fits: the package's own :class:`qlip.ar.ARTransformer` with
:class:`qlip.understanding.text.WordTokenizer` (trained from scratch for the shapes demo), or a wrapper around a
pretrained causal LM and its tokenizer (a Hugging Face model, e.g. SmolLM2 from its GGUF file).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class LanguageModel(Protocol):
    """A causal language model that takes input embeddings (so image features can be spliced in)."""

    @property
    def width(self) -> int: ...  # W of embeddings and hidden states

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_seq_len(self) -> int: ...  # the context: prompt, image features and answer together

    def embed(self, ids: Tensor) -> Tensor: ...  # (B, T) int64 -> (B, T, W)

    def forward_embeds(self, x: Tensor, cache: Any = None, key_padding_mask: Tensor | None = None) -> Tensor:
        """(B, T, W) -> hidden states (B, T, W), causal; with a cache (from ``new_cache``) the T positions follow
        the ones already in it. ``key_padding_mask`` (B, T) bool, True for real tokens."""
        ...

    def head(self, hidden: Tensor) -> Tensor: ...  # (B, T, W) -> logits (B, T, V)

    def new_cache(self, batch: int, max_len: int | None = None) -> Any: ...


@runtime_checkable
class TextTokenizer(Protocol):
    """Text <-> ids for a :class:`LanguageModel`."""

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...  # no special tokens added

    def decode(self, ids: list[int]) -> str: ...  # special tokens skipped

    def chat_prompt(self, user_text: str) -> str:
        """The whole prompt string for one user turn, ending where the assistant's answer begins."""
        ...
