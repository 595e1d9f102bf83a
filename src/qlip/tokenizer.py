"""The CLIP text tokenizer: byte-level BPE with "</w>" word ends, as QLIP's text tower uses.

QLIP keeps the OpenAI CLIP text encoder, so its captions must be tokenized exactly as CLIP does:

1. clean: HTML entities unescaped (twice, as CLIP does), runs of whitespace collapsed to one space,
   stripped, lower-cased. CLIP optionally runs ``ftfy`` first; we do not (no extra dependency), which only
   matters for mojibake text.
2. pre-tokenize with CLIP's pattern: the special tokens, the contractions ``'s 't 're 've 'm 'll 'd``,
   runs of letters ``\\p{L}+``, single digits ``\\p{N}``, runs of other non-space characters.
3. map each word's UTF-8 bytes to printable characters with the GPT-2 byte table, mark the last symbol of
   the word with ``</w>``, and apply the BPE merges in rank order.
4. ids: ``[<|startoftext|>] + ids + [<|endoftext|>]``, zero-padded to the context length (77); a text that is
   too long is truncated and its last position set to ``<|endoftext|>``.

The text model pools the hidden state at the largest id of each row (argmax), so ``<|endoftext|>`` must
be the largest id of the vocabulary; loading and training both check this.

The released checkpoints ship the vocabulary as Hugging Face ``CLIPTokenizer`` files (``vocab.json`` +
``merges.txt``); :func:`train_bpe` learns a small vocabulary of the same layout for models trained from
scratch on our own captions.
"""

from __future__ import annotations

import heapq
import html
import json
import logging
import os
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
MERGES_HEADER = "#version: 0.2"
DEFAULT_CONTEXT_LENGTH = 77
# The 256 byte symbols, the same 256 with "</w>", and the two special tokens: the vocabulary with no merge.
MIN_VOCAB_SIZE = 2 * 256 + 2
# Words are cached after BPE; captions reuse a small set of words, but an unbounded cache could grow with
# every distinct word of a web-scale stream, so it is emptied when it reaches this size.
_CACHE_LIMIT = 200_000

_WHITESPACE_RE = re.compile(r"\s+")
_CONTRACTIONS = r"'s|'t|'re|'ve|'m|'ll|'d"
_SPECIALS = f"{re.escape(SOT_TOKEN)}|{re.escape(EOT_TOKEN)}"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte table: every byte value -> one printable unicode character.

    Bytes that are already printable, non-space Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') map to
    themselves; the remaining 68 bytes (controls, space, NBSP, soft hyphen) map to ``chr(256 + n)`` in byte
    order, so BPE never sees whitespace or control characters. Insertion order is the order of CLIP's
    vocabulary: the printable bytes first, then the others.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


def clean_text(text: str) -> str:
    """CLIP's caption cleaning: unescape HTML entities (twice), collapse whitespace, strip, lower-case.

    ``html.unescape`` runs twice because web captions are often escaped twice ("&amp;amp;").
    """
    text = html.unescape(html.unescape(text))
    return _WHITESPACE_RE.sub(" ", text).strip().lower()


def _ranges_class(codepoints: list[int]) -> str:
    """A regex character-class body (no brackets) matching exactly the given sorted code points."""
    parts = []
    start = prev = codepoints[0]
    for cp in [*codepoints[1:], -2]:
        if cp == prev + 1:
            prev = cp
            continue
        parts.append(re.escape(chr(start)) if start == prev else f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
        start = prev = cp
    return "".join(parts)


@lru_cache(maxsize=1)
def _emulated_pattern() -> re.Pattern:
    """CLIP's pre-tokenization pattern for the standard ``re`` module, which has no ``\\p{L}``/``\\p{N}``.

    Classes such as ``[^\\W\\d_]`` come close but also match numeric symbols like '²' or '½', so the exact
    letter (category L*) and number (N*) classes are built from ``unicodedata`` once (~0.2 s).
    """
    letters, numbers = [], []
    for cp in range(sys.maxunicode + 1):
        major = unicodedata.category(chr(cp))[0]
        if major == "L":
            letters.append(cp)
        elif major == "N":
            numbers.append(cp)
    letter_class, number_class = _ranges_class(letters), _ranges_class(numbers)
    # Only the contractions are case-insensitive: ``re`` would also case-fold the classes, so that U+0345 (a
    # combining mark that folds to a Greek letter) became a letter. CLIP's ``regex`` matches U+0345 with no
    # branch at all (it is dropped, like a space), which the negated class reproduces.
    pattern = (
        rf"{_SPECIALS}|(?i:{_CONTRACTIONS})|[{letter_class}]+|[{number_class}]"
        rf"|[^\s\u0345{letter_class}{number_class}]+"
    )
    return re.compile(pattern)


@lru_cache(maxsize=1)
def _pretokenize_pattern():
    """CLIP's pre-tokenization pattern, compiled with ``regex`` when installed, else emulated with ``re``.

    The two agree on every code point assigned in Python's Unicode database (checked over all of them),
    except U+001C..U+001F, which ``re`` counts as whitespace and ``regex`` does not; ``clean_text`` has
    already turned them into spaces. Characters assigned only in the newer Unicode version of one of the two
    modules may be split differently.
    """
    try:
        import regex  # optional (the dev extra has it): faster to compile and CLIP's own choice
    except ImportError:
        return _emulated_pattern()
    return regex.compile(rf"{_SPECIALS}|{_CONTRACTIONS}|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE)


def pretokenize(text: str) -> list[str]:
    """Split cleaned text into CLIP's pre-tokens (words, single digits, punctuation runs, specials)."""
    return _pretokenize_pattern().findall(text)


def _word_symbols(word: str) -> tuple[str, ...]:
    """A pre-token's byte symbols, the last one carrying the end-of-word marker."""
    table = bytes_to_unicode()
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return tuple(symbols)


def _merge_pair(symbols: Sequence[str], first: str, second: str) -> list[str]:
    """Replace every non-overlapping occurrence of (first, second), scanning left to right."""
    merged, i, n = [], 0, len(symbols)
    while i < n:
        if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line_number == 1 and line.startswith("#version"):
                continue
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{path}:{line_number}: expected a merge rule 'a b', got {line.rstrip()!r}")
            merges.append((parts[0], parts[1]))
    return merges


class TruncationReport:
    """``count_truncated`` / ``warn_truncated`` for a tokenizer with ``encode(text) -> ids``, ``context_length`` and
    ``num_special_tokens`` (the tokens every row carries besides the text)."""

    context_length: int
    num_special_tokens: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def count_truncated(self, texts: Iterable[str], context_length: int | None = None) -> int:
        """How many of ``texts`` are longer than the context (special tokens included) and would be cut."""
        length = self.context_length if context_length is None else int(context_length)
        return sum(len(self.encode(text)) + self.num_special_tokens > length for text in texts)

    def warn_truncated(self, texts: Sequence[str], *, where: str = "", context_length: int | None = None) -> int:
        """Count the captions the tokenizer would cut and, when there are any, log one warning with the count.

        Returns:
            The number of truncated captions.
        """
        length = self.context_length if context_length is None else int(context_length)
        cut = self.count_truncated(texts, length)
        if cut:
            logger.warning("%s%d of %d captions were longer than the %d-token context and were truncated",
                           f"{where}: " if where else "", cut, len(texts), length)  # fmt: skip
        return cut


class CLIPTokenizer(TruncationReport):
    """The OpenAI CLIP byte-level BPE tokenizer (the one the released QLIP checkpoints ship).

    Attributes:
        vocab_size: number of entries in the vocabulary (49408 for the released models).
        sot_token_id: id of ``<|startoftext|>``, read from the vocabulary by name.
        eot_token_id: id of ``<|endoftext|>``; the largest id, which the text model's argmax pooling relies on.
        pad_token_id: 0, the padding value CLIP uses after the end token.
        num_special_tokens: 2, the start and end tokens of every row.
        context_length: default length of the rows returned by ``__call__``.
    """

    pad_token_id: int = 0
    num_special_tokens: int = 2  # the start and end tokens every row carries

    def __init__(
        self,
        vocab_file: str | os.PathLike | Mapping[str, int],
        merges_file: str | os.PathLike | Sequence[tuple[str, str]],
        *,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
    ) -> None:
        """Build the tokenizer from a Hugging Face ``vocab.json`` and ``merges.txt``.

        Args:
            vocab_file: path of ``vocab.json`` (token -> id), or the mapping itself.
            merges_file: path of ``merges.txt`` (optional "#version" line, then "a b" rules by priority),
                or the list of (a, b) pairs itself.
            context_length: length of each row returned by ``__call__`` (77 for CLIP).
        """
        if isinstance(vocab_file, Mapping):
            vocab = dict(vocab_file)
        else:
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
        if isinstance(merges_file, (str, os.PathLike)):
            merges = _read_merges(Path(merges_file))
        else:
            merges = list(merges_file)
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 to hold the start and end tokens, got {context_length}")
        for name in (SOT_TOKEN, EOT_TOKEN):
            if name not in vocab:
                raise ValueError(f"the vocabulary has no {name!r} entry; a CLIP vocab.json must contain both "
                                 f"{SOT_TOKEN!r} and {EOT_TOKEN!r}")
        self.encoder: dict[str, int] = vocab
        self.decoder: dict[int, str] = {i: t for t, i in vocab.items()}
        self.merges: list[tuple[str, str]] = [(a, b) for a, b in merges]
        self.merge_ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(self.merges):
            # CLIP keeps the first rank of a repeated rule; the later copy can never fire.
            self.merge_ranks.setdefault(pair, rank)
        self.vocab_size = len(vocab)
        self.sot_token_id = vocab[SOT_TOKEN]
        self.eot_token_id = vocab[EOT_TOKEN]
        self.context_length = int(context_length)
        self._check_layout()
        self._byte_table = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_table.items()}
        # The specials are matched whole by the pre-tokenizer and map to themselves (no "</w>").
        self._cache: dict[str, list[int]] = {SOT_TOKEN: [self.sot_token_id], EOT_TOKEN: [self.eot_token_id]}

    def _check_layout(self) -> None:
        max_id = max(self.encoder.values())
        if self.eot_token_id != max_id:
            raise ValueError(
                f"{EOT_TOKEN!r} has id {self.eot_token_id} but the largest id is {max_id}: the text model pools at "
                f"the argmax id, so the end token must be the largest id; fix vocab.json (CLIP puts it last)"
            )
        if len(self.decoder) != len(self.encoder):
            raise ValueError("vocab.json maps several tokens to the same id; each id must name one token")
        missing_bytes = [c for c in bytes_to_unicode().values() if c not in self.encoder]
        if missing_bytes:
            raise ValueError(f"the vocabulary lacks {len(missing_bytes)} of the 256 byte symbols (e.g. "
                             f"{missing_bytes[:3]}); this is not a byte-level BPE vocabulary")
        for a, b in self.merges:
            if a + b not in self.encoder:
                raise ValueError(f"merge rule {a!r} {b!r} produces {a + b!r}, which is not in the vocabulary; "
                                 f"vocab.json and merges.txt do not belong together")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> CLIPTokenizer:
        """Load ``vocab.json`` + ``merges.txt`` (and ``model_max_length`` from ``tokenizer_config.json``).

        Args:
            directory: a Hugging Face model directory, e.g. a downloaded QLIP checkpoint.

        Raises:
            FileNotFoundError: naming every required file that is missing.
        """
        directory = Path(directory)
        missing = [name for name in (VOCAB_FILE, MERGES_FILE) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"cannot load a CLIP tokenizer from {str(directory)!r}: missing {', '.join(missing)}; the directory "
                f"must hold the Hugging Face CLIPTokenizer files {VOCAB_FILE} and {MERGES_FILE}"
            )
        context_length = DEFAULT_CONTEXT_LENGTH
        config_path = directory / TOKENIZER_CONFIG_FILE
        if config_path.is_file():
            with open(config_path, encoding="utf-8") as f:
                max_length = json.load(f).get("model_max_length")
            # HF writes a huge sentinel (int(1e30)) when the length is unknown; keep CLIP's 77 then.
            if isinstance(max_length, int) and 2 <= max_length <= 100_000:
                context_length = max_length
        return cls(directory / VOCAB_FILE, directory / MERGES_FILE, context_length=context_length)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the Hugging Face CLIPTokenizer files: vocab, merges, tokenizer config, special tokens map.

        ``pad_token`` is written as the id-0 token, so that Hugging Face pads like we do (CLIP pads with 0).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / VOCAB_FILE, "w", encoding="utf-8") as f:
            json.dump(self.encoder, f, ensure_ascii=False, indent=2)
        with open(directory / MERGES_FILE, "w", encoding="utf-8") as f:
            f.write(MERGES_HEADER + "\n")
            f.writelines(f"{a} {b}\n" for a, b in self.merges)
        pad_token = self.decoder.get(self.pad_token_id, EOT_TOKEN)
        special = {"bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": pad_token}
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.context_length,
            "do_lower_case": True,
            "errors": "replace",
            **special,
        }
        with open(directory / TOKENIZER_CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
        with open(directory / SPECIAL_TOKENS_MAP_FILE, "w", encoding="utf-8") as f:
            json.dump(special, f, ensure_ascii=False, indent=2)

    def get_vocab(self) -> dict[str, int]:
        """A copy of the token -> id mapping."""
        return dict(self.encoder)

    def bpe(self, word: str) -> list[str]:
        """The BPE tokens of one pre-token: repeatedly merge the adjacent pair of lowest merge rank."""
        symbols = list(_word_symbols(word))
        ranks = self.merge_ranks
        while len(symbols) > 1:
            pairs = {(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)}
            best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
            if best not in ranks:
                break
            symbols = _merge_pair(symbols, *best)
        return symbols

    def _word_ids(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids = [self.encoder[token] for token in self.bpe(word)]
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache = {SOT_TOKEN: [self.sot_token_id], EOT_TOKEN: [self.eot_token_id]}
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens and without padding."""
        ids: list[int] = []
        for word in pretokenize(clean_text(text)):
            ids.extend(self._word_ids(word))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenize a text or a batch into a LongTensor of shape (B, context_length).

        Each row is ``[sot] + ids + [eot]`` padded with 0; a text too long for the context keeps its first
        ``context_length - 1`` tokens (start token included) and ends with ``eot``.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else int(context_length)
        if length < 2:
            raise ValueError(f"context_length must be >= 2 to hold the start and end tokens, got {length}")
        out = torch.zeros(len(texts), length, dtype=torch.long)  # (B, L), 0 = padding
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of a sequence of ids; special tokens and the padding after the end token are dropped.

        Args:
            ids: a list of ids or a 1-D tensor, e.g. one row of ``__call__``'s output or ``encode``'s result.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence (a 1-D tensor), got shape {tuple(ids.shape)}; "
                                 f"decode each row separately")
            ids = ids.tolist()
        tokens = []
        for i in ids:
            i = int(i)
            if i == self.eot_token_id:
                break  # everything after the end token is padding
            if i == self.sot_token_id:
                continue
            if i not in self.decoder:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            tokens.append(self.decoder[i])
        text = "".join(tokens)
        # "</w>" is made of printable ASCII, which the byte table maps to itself, so it survives byte decoding.
        data = bytearray(self._byte_decoder[c] for c in text)
        # A truncated row may end inside a multi-byte character: replace it rather than fail.
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()


def get_tokenizer_from_dir(directory: str | os.PathLike) -> CLIPTokenizer:
    """The tokenizer stored in a model directory (``vocab.json`` + ``merges.txt``); used by the factory."""
    return CLIPTokenizer.from_pretrained(directory)


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 1) -> CLIPTokenizer:
    """Learn a small CLIP-style BPE vocabulary from captions, for text encoders trained from scratch.

    Same cleaning, pre-tokenization, byte table and "</w>" convention as CLIP; same vocabulary layout: the 256
    byte symbols, the 256 byte symbols + "</w>", the merged tokens in merge order, then ``<|startoftext|>``
    and ``<|endoftext|>`` (the largest id). Each step merges the most frequent adjacent pair (counted over
    word frequencies); ties go to the lexicographically smallest pair, so training is deterministic.

    Args:
        texts: training captions.
        vocab_size: wanted vocabulary size, at least 514 (the byte symbols and the two specials). Training
            stops earlier when no pair is left or none occurs ``min_frequency`` times; the result is then smaller.
        min_frequency: a pair must occur at least this many times to be merged.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 byte symbols, 256 with '</w>', and the two "
                         f"special tokens), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    word_counts: Counter[str] = Counter()
    for text in texts:
        word_counts.update(w for w in pretokenize(clean_text(text)) if w not in (SOT_TOKEN, EOT_TOKEN))
    words = [list(_word_symbols(w)) for w in word_counts]
    freqs = list(word_counts.values())

    byte_symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*byte_symbols, *(s + END_OF_WORD for s in byte_symbols)]:
        vocab[token] = len(vocab)

    # Incremental pair counts: a merge only changes the words that hold the merged pair.
    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: dict[tuple[str, str], set[int]] = {}
    for index, (symbols, freq) in enumerate(zip(words, freqs)):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freq
            pair_words.setdefault(pair, set()).add(index)
    # Max-heap by count, then smallest pair; stale entries are skipped when their count has changed.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    n_merges = vocab_size - MIN_VOCAB_SIZE
    while len(merges) < n_merges and heap:
        neg_count, best = heapq.heappop(heap)
        if -neg_count != pair_counts.get(best, 0):
            continue
        if -neg_count < min_frequency:
            break
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        changed = set()
        for index in sorted(pair_words.pop(best, ())):
            symbols, freq = words[index], freqs[index]
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] -= freq
                changed.add(pair)
            symbols = words[index] = _merge_pair(symbols, *best)
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += freq
                pair_words.setdefault(pair, set()).add(index)
                changed.add(pair)
        for pair in changed:
            count = pair_counts[pair]
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            else:
                del pair_counts[pair]
    if len(merges) < n_merges:
        logger.info("train_bpe: stopped after %d merges (asked for %d): no pair left with frequency >= %d",
                    len(merges), n_merges, min_frequency)
    vocab[SOT_TOKEN] = len(vocab)
    vocab[EOT_TOKEN] = len(vocab)
    return CLIPTokenizer(vocab, merges)
