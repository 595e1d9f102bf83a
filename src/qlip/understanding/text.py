"""A word-level text tokenizer for the language model trained from scratch (the shapes demo).

Words (lower-cased runs of letters and digits), single punctuation marks and line breaks are tokens. The
vocabulary is built from a corpus (the question-answer texts and the chat template), so a small model never spends
capacity on sub-words. It implements :class:`qlip.understanding.protocols.TextTokenizer`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import UnderstandingError

SPECIALS = ("<pad>", "<eos>", "<unk>")
_TOKEN = re.compile(r"[a-z0-9]+|\n|[^\sa-z0-9]")
_NO_SPACE_BEFORE = set(".,:;?!)'")
USER_PREFIX = "USER: "
ASSISTANT_PREFIX = "\nASSISTANT:"


def split_words(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class WordTokenizer:
    """Word-level ids: 0 <pad>, 1 <eos>, 2 <unk>, then the corpus words in sorted order."""

    def __init__(self, words: Iterable[str]):
        vocab = list(SPECIALS) + sorted(set(words) - set(SPECIALS))
        self.vocab = vocab
        self.ids = {w: i for i, w in enumerate(vocab)}

    @classmethod
    def from_corpus(cls, texts: Iterable[str]) -> WordTokenizer:
        """Every word of ``texts`` and of the chat template."""
        words = set(split_words(USER_PREFIX + ASSISTANT_PREFIX))
        for t in texts:
            words.update(split_words(t))
        return cls(words)

    # --- the TextTokenizer protocol ------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def unk_id(self) -> int:
        return 2

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk_id) for w in split_words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        out = ""
        for i in ids:
            i = int(i)
            if i < len(SPECIALS) or i >= len(self.vocab):
                continue
            w = self.vocab[i]
            if w == "\n" or out.endswith("\n") or not out or w in _NO_SPACE_BEFORE:
                out += w
            else:
                out += " " + w
        return out

    def chat_prompt(self, user_text: str) -> str:
        return f"{USER_PREFIX}{user_text}{ASSISTANT_PREFIX}"

    # --- files ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": "word", "vocab": self.vocab}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            vocab = d["vocab"]
        except FileNotFoundError:
            raise UnderstandingError(f"{path} is missing: the model directory lacks its text tokenizer") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UnderstandingError(f"{path} is not a word tokenizer file ({e})") from None
        if d.get("kind") != "word" or list(vocab[: len(SPECIALS)]) != list(SPECIALS):
            raise UnderstandingError(f"{path} is not a word tokenizer file (kind 'word', specials {SPECIALS} first)")
        tok = cls(vocab[len(SPECIALS) :])
        if tok.vocab != vocab:
            raise UnderstandingError(f"{path}: the vocabulary is not sorted or holds duplicates; rebuild it")
        return tok
