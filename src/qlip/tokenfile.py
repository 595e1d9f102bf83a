"""The one token-file format: what ``qlip encode`` and ``qlip tokenize`` write and what every token reader reads.

A token file is a safetensors file::

    "indices"  (n, h, w) int32 (d <= 31 bits) or int64     or "bits" (n, h, w, d) uint8 / "group_indices" (n, h, w, G)
    "label"    (n,) int64, -1 where unknown                  (optional)
    metadata   format     "qlip-tokens-v2"
               kind       indices | bits | group_indices
               model, grid, bits, group_size, image_size     the tokenizer that made the tokens
               quantizer  the quantizer config (JSON); fingerprint: its sha256, so a reader refuses another one
               keys       JSON list: one name per sample (the input's relative path, or the dataset key)
               captions   JSON list: the caption of each sample, or null

``qlip tokenize`` writes a folder of such files (``tokens-r000-000000.safetensors`` ...) with a manifest per rank;
:func:`iter_token_files` reads a file or such a folder. Files written by qlip 0.1 (``qlip-tokens-v1`` from
``qlip encode``, ``qlip-token-shards-v1`` shards) are still read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "qlip-tokens-v2"
LEGACY_FORMATS = ("qlip-tokens-v1", "qlip-token-shards-v1")
KINDS = ("indices", "bits", "group_indices")
MANIFEST_GLOB = "manifest-r*.json"


class TokenFileError(ValueError):
    """A token file that cannot be read, or tokens that do not fit the model they are given to."""


def quantizer_fingerprint(quantizer_cfg: Any) -> str:
    """sha256 (16 hex digits) of a quantizer config, as stored in token files."""
    blob = json.dumps(dataclasses.asdict(quantizer_cfg), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TokenSpec:
    """What a token reader needs to know about the tokenizer that made the tokens."""

    model: str
    grid: int
    bits: int
    group_size: int = 1
    image_size: int | None = None
    quantizer: dict[str, Any] | None = None  # the quantizer config; None in files older than the v2 format

    @classmethod
    def of(cls, model: Any) -> TokenSpec:
        """The spec of a QLIP model (or anything with ``cfg``, ``grid_size``, ``num_bits``, ``image_size``)."""
        q = model.cfg.quantizer
        return cls(model=model.cfg.name, grid=int(model.grid_size), bits=int(model.num_bits),
                   group_size=int(q.group_size), image_size=int(model.image_size),
                   quantizer=dataclasses.asdict(q))  # fmt: skip

    @property
    def fingerprint(self) -> str | None:
        if self.quantizer is None:
            return None
        return hashlib.sha256(json.dumps(self.quantizer, sort_keys=True).encode()).hexdigest()[:16]

    def to_metadata(self) -> dict[str, str]:
        meta = {"model": self.model, "grid": str(self.grid), "bits": str(self.bits),
                "group_size": str(self.group_size)}  # fmt: skip
        if self.image_size is not None:
            meta["image_size"] = str(self.image_size)
        if self.quantizer is not None:
            meta["quantizer"] = json.dumps(self.quantizer, sort_keys=True)
            meta["fingerprint"] = self.fingerprint or ""
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "token file") -> TokenSpec:
        try:
            quantizer = json.loads(meta["quantizer"]) if "quantizer" in meta else None
            return cls(model=meta.get("model", "?"), grid=int(meta["grid"]), bits=int(meta["bits"]),
                       group_size=int(meta.get("group_size", 1)),
                       image_size=int(meta["image_size"]) if "image_size" in meta else None,
                       quantizer=quantizer)  # fmt: skip
        except (KeyError, ValueError, TypeError) as e:
            raise TokenFileError(f"{source}: its metadata does not parse ({type(e).__name__}: {e}); "
                                 "write it again with `qlip encode` or `qlip tokenize`") from e  # fmt: skip

    def check(self, model: Any, source: str = "tokens") -> None:
        """Raise :class:`TokenFileError` when ``model`` cannot read these tokens (grid, bits or quantizer differ)."""
        theirs = TokenSpec.of(model)
        if (self.grid, self.bits) != (theirs.grid, theirs.bits):
            raise TokenFileError(
                f"{source} holds {self.grid}x{self.grid} tokens of {self.bits} bits (made by {self.model}), but "
                f"{theirs.model} reads {theirs.grid}x{theirs.grid} tokens of {theirs.bits} bits; use the model "
                "that made them"
            )
        if self.quantizer is not None and self.fingerprint != theirs.fingerprint:
            differ = sorted(k for k in {**self.quantizer, **(theirs.quantizer or {})}
                            if self.quantizer.get(k) != (theirs.quantizer or {}).get(k))  # fmt: skip
            raise TokenFileError(
                f"{source} was made by a quantizer configured differently from {theirs.model}'s "
                f"(differs in {differ}); use the model that made them ({self.model})"
            )


@dataclass
class TokenFile:
    """One token file read back. ``tokens`` are int64 indices, bool bits or int64 group indices (see ``kind``)."""

    tokens: torch.Tensor
    kind: str
    spec: TokenSpec
    keys: list[str]
    captions: list[str | None]
    labels: torch.Tensor
    path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def indices(self) -> torch.Tensor:
        """The tokens as int64 indices (n, h, w), whatever kind was stored."""
        if self.kind == "indices":
            return self.tokens
        from .quantizers.bsq import bits_to_indices, group_indices_to_indices

        if self.kind == "bits":
            return bits_to_indices(self.tokens)
        return group_indices_to_indices(self.tokens, self.spec.group_size)


def _storage(tokens: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    if kind == "bits":
        return tokens.to(torch.uint8)
    if kind == "indices" and bits <= 31:
        return tokens.to(torch.int32)
    return tokens.to(torch.int64)


def write_token_file(
    path: str | Path,
    tokens: torch.Tensor,
    spec: TokenSpec,
    *,
    kind: str = "indices",
    keys: Sequence[str] | None = None,
    captions: Sequence[str | None] | None = None,
    labels: torch.Tensor | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write one token file atomically (temporary name, then rename; permissions follow the umask)."""
    from safetensors.torch import save_file

    from .fileio import atomic_write

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    n = int(tokens.shape[0])
    keys = list(keys) if keys is not None else [f"{i:06d}" for i in range(n)]
    captions = list(captions) if captions is not None else [None] * n
    if len(keys) != n or len(captions) != n:
        raise ValueError(f"{n} samples but {len(keys)} keys and {len(captions)} captions")
    if labels is None:
        labels = torch.full((n,), -1, dtype=torch.int64)
    meta = {**(extra or {}), "format": FORMAT, "kind": kind, **spec.to_metadata(),
            "keys": json.dumps(keys), "captions": json.dumps(captions)}  # fmt: skip
    tensors = {kind: _storage(tokens, kind, spec.bits).contiguous(), "label": labels.to(torch.int64).contiguous()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_token_file(path: str | Path) -> TokenFile:
    """Read a token file (any qlip version); raises :class:`TokenFileError` with a one-line reason."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TokenFileError(f"{path}: no such token file (write one with `qlip encode` or `qlip tokenize`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            fmt = meta.get("format")
            if fmt != FORMAT and fmt not in LEGACY_FORMATS:
                raise TokenFileError(f"{path} is not a qlip token file (write one with `qlip encode`)")
            kind = meta.get("kind", "indices")
            if kind not in f.keys() or kind not in KINDS:
                raise TokenFileError(f"{path}: metadata names {kind!r} tokens, which the file does not hold")
            tokens = f.get_tensor(kind)
            labels = f.get_tensor("label") if "label" in f.keys() else None
    except TokenFileError:
        raise
    except Exception as e:  # safetensors raises several types for a damaged file
        raise TokenFileError(f"{path} is not a readable safetensors token file ({type(e).__name__}: {e})") from e
    spec = TokenSpec.from_metadata(meta, str(path))
    n = int(tokens.shape[0])
    try:
        keys = json.loads(meta.pop("keys", None) or meta.pop("files", "[]"))
        captions = json.loads(meta.pop("captions", "null")) or [None] * n
    except json.JSONDecodeError as e:
        raise TokenFileError(f"{path}: its keys or captions metadata is not JSON ({e})") from e
    if len(keys) != n:
        keys = [f"{i:06d}" for i in range(n)]
    if len(captions) != n:
        raise TokenFileError(f"{path} holds {n} samples but {len(captions)} captions")
    tokens = tokens.bool() if kind == "bits" else tokens.to(torch.int64)
    if labels is None or labels.shape != (n,):
        labels = torch.full((n,), -1, dtype=torch.int64)
    return TokenFile(tokens, kind, spec, [str(k) for k in keys], captions, labels.to(torch.int64), path, meta)


def token_file_paths(path: str | Path) -> list[Path]:
    """The token files a path names: the file itself, or the finished shards of a ``qlip tokenize`` folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise TokenFileError(f"{path}: no such token file or folder")
    manifests = sorted(path.glob(MANIFEST_GLOB))
    if not manifests:
        raise TokenFileError(f"{path} holds no token manifest ({MANIFEST_GLOB}); write one with `qlip tokenize`")
    files = []
    for m in manifests:
        try:
            entries = json.loads(m.read_text())["shards"]
            files.extend(path / e["file"] for e in entries)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TokenFileError(f"{m} is not a readable token manifest ({type(e).__name__}: {e})") from e
    return files


def iter_token_files(path: str | Path) -> Iterator[TokenFile]:
    """Read a token file, or every finished shard of a ``qlip tokenize`` folder, in order."""
    for p in token_file_paths(path):
        yield read_token_file(p)
