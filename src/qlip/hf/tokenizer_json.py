"""A Hugging Face ``tokenizer.json`` (WordPiece for BERT / MiniLM) called like the QLIP tokenizer.

The text tower of :mod:`qlip.models.hf_text` reads the ids this tokenizer makes: ``tokenizer(texts)`` -> (B, L)
ids with the encoder's special tokens (``[CLS] ... [SEP]``), cut to the context and right-padded with the padding
id. It reads the file with the ``tokenizers`` package only (transformers is not needed to tokenize), pickles (for
DataLoader workers), and saves itself into a model directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..fileio import write_text_atomic
from ..tokenizer import TruncationReport
from .errors import INSTALL_HF, HFModelError

log = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"


def _require_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise HFModelError(f"reading a {TOKENIZER_JSON} needs the tokenizers package: {INSTALL_HF}") from None
    return tokenizers


class JSONTokenizer(TruncationReport):
    """Texts -> LongTensor (B, context_length): special tokens added, cut to the context, padded with ``pad_token_id``.

    Attributes:
        context_length: default length of the rows ``__call__`` returns.
        pad_token_id: the padding id (the text tower masks it out).
        num_special_tokens: tokens every row carries besides the text (2 for ``[CLS]`` and ``[SEP]``).
    """

    def __init__(self, backend: Any, *, pad_token_id: int, context_length: int):
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        self.pad_token_id = int(pad_token_id)
        self.context_length = int(context_length)
        self.pad_token = backend.id_to_token(self.pad_token_id)
        if self.pad_token is None:
            raise HFModelError(f"the padding id {pad_token_id} is not in the tokenizer's vocabulary")
        self.num_special_tokens = int(backend.post_processor.num_special_tokens_to_add(False)) if \
            backend.post_processor is not None else 0  # fmt: skip

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, pad_token_id: int, context_length: int) -> JSONTokenizer:
        """Read a ``tokenizer.json``; :class:`HFModelError` when it is missing or unreadable."""
        tokenizers = _require_tokenizers()
        path = Path(path)
        if not path.is_file():
            raise HFModelError(f"{path.parent} has no {TOKENIZER_JSON}: the model's pretrained text tower needs the "
                               "tokenizer it was trained with; copy it from the run that wrote the model")  # fmt: skip
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust reader's errors derive from Exception only; a user's file, one line
            raise HFModelError(f"{path} is not a readable tokenizer.json ({type(e).__name__}: "
                               f"{str(e).strip()[:200]})") from None  # fmt: skip
        return cls(backend, pad_token_id=pad_token_id, context_length=context_length)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` into ``directory`` (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / TOKENIZER_JSON, self.backend.to_str(pretty=True))

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without special tokens and without padding."""
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenize a text or a batch into (B, context_length) ids; a long text keeps its first tokens and its
        closing special token."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else int(context_length)
        if length <= self.num_special_tokens:
            raise ValueError(f"context_length must exceed the {self.num_special_tokens} special tokens, got {length}")
        self.backend.enable_truncation(max_length=length)
        self.backend.enable_padding(length=length, pad_id=self.pad_token_id, pad_token=self.pad_token)
        try:
            rows = [e.ids for e in self.backend.encode_batch(list(texts))]
        finally:
            self.backend.no_padding()
            self.backend.no_truncation()
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)  # (B, L)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of one sequence of ids, special tokens and padding dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)
