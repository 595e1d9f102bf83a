"""Image-token codecs: how a d-bit BSQ token becomes what an autoregressive model predicts.

A d-bit token (20 bits for qlip-shapes-s, 28 for the released models) is too large for one softmax, so a codec
turns the (B, N) token grid (raster order, int64, MSB first) into an AR *sequence* and back, and owns the input
embeddings and output heads of that sequence. Three codecs share one interface:

* :class:`SubTokenCodec` (default, ``kind="subtoken"``): each position becomes ``parts`` sub-tokens of
  d/parts bits in raster order (2 x 10 bits = 1024-way softmaxes for 20 bits). N * parts AR steps.
* :class:`DepthHeadCodec` (``kind="depth"``): one AR step per position; a small depth transformer (the package's
  AR core) predicts the position's ``parts`` sub-codes in turn from its hidden state. The input embedding of a
  position is the sum of its sub-codes' embeddings.
* :class:`BitCodec` (``kind="bits"``): one AR step per position with d binary logits; the input of a position
  is a linear map of its +-1 bits, optionally with random bit flips of the teacher-forced input in training.

The interface (``seq`` is (B, T, *value_shape) int64 with T = N * steps_per_position)::

    seq = codec.to_sequence(tokens)               # (B, N) -> (B, T, ...)
    tokens = codec.from_sequence(seq)             # exact inverse
    x = codec.embed(seq, start=0)                 # (B, T', ...) -> (B, T', W): inputs of steps start..start+T'-1
    loss, metrics = codec.loss(hidden, seq)       # hidden[:, t] (B, T, W) predicts seq[:, t]
    value = codec.sample_step(hidden, step, choose)  # hidden (copies*B, W) of the state before step -> (B, ...)

``choose`` is a :class:`qlip.ar.sampling.Chooser` (CFG over a doubled batch + temperature/top-k/top-p): a codec
calls it once per categorical choice, so guidance and seeds behave the same for every codec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ar.model import ARConfig, ARTransformer
from ..ar.sampling import Chooser
from ..config import dataclass_from_dict
from ..quantizers.bsq import bits_to_indices, group_indices_to_indices, indices_to_bits, indices_to_group_indices

CODEC_KINDS = ("subtoken", "depth", "bits")
MAX_SUBTOKEN_BITS = 20  # a softmax over more than 2**20 classes is not what this codec is for


class CodecConfigError(ValueError):
    """A codec configuration that cannot work for the token's bits."""


@dataclass
class CodecConfig:
    """Which codec and its options. ``parts``: sub-tokens per position (subtoken, depth); ``depth_layers`` /
    ``depth_heads``: the depth transformer (depth); ``bit_flip``: probability of flipping each teacher-forced input
    bit in training (bits)."""

    kind: str = "subtoken"
    parts: int = 2
    depth_layers: int = 1
    depth_heads: int = 1
    bit_flip: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodecConfig:
        return dataclass_from_dict(cls, d, where="codec", error=CodecConfigError)


def check_split(bits: int, parts: int) -> int:
    """Bits per part of a valid split of ``bits`` into ``parts`` (raises :class:`CodecConfigError` otherwise)."""
    if not isinstance(parts, int) or parts < 1 or bits % parts:
        divisors = [p for p in range(1, bits + 1) if bits % p == 0]
        raise CodecConfigError(f"{bits}-bit tokens cannot split into {parts!r} equal parts; choose one of {divisors}")
    return bits // parts


def split_tokens(tokens: Tensor, bits: int, parts: int) -> Tensor:
    """(...) d-bit indices -> (..., parts) sub-codes of d/parts bits, most significant part first (exact)."""
    return indices_to_group_indices(tokens, bits, check_split(bits, parts))


def join_tokens(sub: Tensor, bits: int, parts: int) -> Tensor:
    """(..., parts) sub-codes -> (...) d-bit indices; inverse of :func:`split_tokens`."""
    return group_indices_to_indices(sub, check_split(bits, parts))


class ImageCodec(nn.Module):
    """Base class; see the module docstring for the interface."""

    kind: str
    steps_per_position: int
    value_shape: tuple[int, ...]

    def __init__(self, bits: int, width: int):
        super().__init__()
        self.bits, self.width = bits, width

    def to_sequence(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def from_sequence(self, seq: Tensor) -> Tensor:
        raise NotImplementedError

    def embed(self, seq: Tensor, start: int = 0) -> Tensor:
        raise NotImplementedError

    def loss(self, hidden: Tensor, seq: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def sample_step(self, hidden: Tensor, step: int, choose: Chooser) -> Tensor:
        raise NotImplementedError

    def seq_len(self, positions: int) -> int:
        return positions * self.steps_per_position


class _PartTables(nn.Module):
    """Per-part input embeddings and output heads for ``parts`` sub-codes of ``part_bits`` bits."""

    def __init__(self, parts: int, part_bits: int, width: int):
        super().__init__()
        if part_bits > MAX_SUBTOKEN_BITS:
            raise CodecConfigError(f"sub-tokens of {part_bits} bits need a {1 << part_bits}-way softmax; use more "
                                   f"parts (at most {MAX_SUBTOKEN_BITS} bits each)")  # fmt: skip
        self.parts, self.vocab = parts, 1 << part_bits
        self.embedding = nn.Embedding(parts * self.vocab, width)  # part p's code c is row p * vocab + c
        self.head_weight = nn.Parameter(torch.randn(parts, self.vocab, width) * 0.02)
        self.head_bias = nn.Parameter(torch.zeros(parts, self.vocab))
        nn.init.normal_(self.embedding.weight, std=0.02)

    def embed(self, codes: Tensor, part: Tensor) -> Tensor:
        return self.embedding(codes + part * self.vocab)

    def logits(self, hidden: Tensor, part: int) -> Tensor:
        """hidden (..., W) -> logits (..., vocab) of one part."""
        return hidden @ self.head_weight[part].t() + self.head_bias[part]

    def all_logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., parts, W) -> logits (..., parts, vocab), part p by head p."""
        return torch.einsum("...pw,pvw->...pv", hidden, self.head_weight) + self.head_bias


def _part_metrics(logits: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """logits (..., parts, V), target (..., parts) -> mean CE and per-part loss / accuracy."""
    ce = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), reduction="none").view(target.shape)
    per_part = ce.flatten(0, -2).mean(0)  # (parts,)
    acc = (logits.argmax(-1) == target).float().flatten(0, -2).mean(0)
    metrics = {}
    for p in range(target.shape[-1]):
        metrics[f"loss_part{p}"] = per_part[p].detach()
        metrics[f"acc_part{p}"] = acc[p].detach()
    return ce.mean(), metrics


class SubTokenCodec(ImageCodec):
    """Each position -> ``parts`` sub-tokens in raster order (MSB part first); one AR step per sub-token."""

    kind = "subtoken"
    value_shape = ()

    def __init__(self, bits: int, width: int, parts: int = 2):
        super().__init__(bits, width)
        self.parts = parts
        self.steps_per_position = parts
        self.tables = _PartTables(parts, check_split(bits, parts), width)

    def to_sequence(self, tokens: Tensor) -> Tensor:
        return split_tokens(tokens, self.bits, self.parts).flatten(-2)  # (B, N * parts)

    def from_sequence(self, seq: Tensor) -> Tensor:
        return join_tokens(seq.unflatten(-1, (-1, self.parts)), self.bits, self.parts)

    def embed(self, seq: Tensor, start: int = 0) -> Tensor:
        part = (torch.arange(start, start + seq.shape[1], device=seq.device) % self.parts)[None]  # (1, T)
        return self.tables.embed(seq, part)

    def loss(self, hidden: Tensor, seq: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.tables.all_logits(hidden.unflatten(1, (-1, self.parts)))  # (B, N, parts, V)
        return _part_metrics(logits, seq.unflatten(1, (-1, self.parts)))

    def sample_step(self, hidden: Tensor, step: int, choose: Chooser) -> Tensor:
        return choose(self.tables.logits(hidden, step % self.parts))  # (B,)


class DepthHeadCodec(ImageCodec):
    """One AR step per position; a depth transformer predicts the ``parts`` sub-codes of the position in turn."""

    kind = "depth"
    steps_per_position = 1

    def __init__(self, bits: int, width: int, parts: int = 2, depth_layers: int = 1, depth_heads: int = 1):
        super().__init__(bits, width)
        self.parts = parts
        self.value_shape = (parts,)
        self.tables = _PartTables(parts, check_split(bits, parts), width)
        self.depth = ARTransformer(ARConfig(vocab_size=0, width=width, depth=depth_layers, heads=depth_heads,
                                            max_seq_len=parts))  # fmt: skip

    def to_sequence(self, tokens: Tensor) -> Tensor:
        return split_tokens(tokens, self.bits, self.parts)  # (B, N, parts)

    def from_sequence(self, seq: Tensor) -> Tensor:
        return join_tokens(seq, self.bits, self.parts)

    def _part_index(self, device: torch.device) -> Tensor:
        return torch.arange(self.parts, device=device)

    def embed(self, seq: Tensor, start: int = 0) -> Tensor:
        return self.tables.embed(seq, self._part_index(seq.device)).sum(-2)  # (B, T, W)

    def _depth_inputs(self, hidden: Tensor, sub: Tensor) -> Tensor:
        """hidden (M, W), sub (M, k) codes chosen so far -> depth inputs (M, 1 + k, W)."""
        parts = self._part_index(sub.device)[: sub.shape[1]]
        return torch.cat([hidden[:, None], self.tables.embed(sub, parts)], dim=1)

    def loss(self, hidden: Tensor, seq: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        b, n = seq.shape[:2]
        x = self._depth_inputs(hidden.flatten(0, 1), seq.flatten(0, 1)[:, :-1])  # (B*N, parts, W)
        logits = self.tables.all_logits(self.depth.forward_embeds(x)).unflatten(0, (b, n))  # (B, N, parts, V)
        return _part_metrics(logits, seq)

    def sample_step(self, hidden: Tensor, step: int, choose: Chooser) -> Tensor:
        chosen = hidden.new_zeros(hidden.shape[0] // choose.copies, 0, dtype=torch.long)  # (B, 0)
        for p in range(self.parts):
            sub = chosen.repeat(choose.copies, 1)  # the same choices for the guided and unguided rows
            h = self.depth.forward_embeds(self._depth_inputs(hidden, sub))[:, -1]  # (copies*B, W)
            chosen = torch.cat([chosen, choose(self.tables.logits(h, p))[:, None]], dim=1)
        return chosen  # (B, parts)


class BitCodec(ImageCodec):
    """One AR step per position, d independent binary predictions; input = Linear(+-1 bits)."""

    kind = "bits"
    steps_per_position = 1

    def __init__(self, bits: int, width: int, bit_flip: float = 0.0):
        super().__init__(bits, width)
        if not 0.0 <= bit_flip < 0.5:
            raise CodecConfigError(f"bit_flip must lie in [0, 0.5), got {bit_flip}")
        self.bit_flip = bit_flip
        self.value_shape = (bits,)
        self.input = nn.Linear(bits, width)
        self.output = nn.Linear(width, bits)

    def to_sequence(self, tokens: Tensor) -> Tensor:
        return indices_to_bits(tokens, self.bits).long()  # (B, N, d)

    def from_sequence(self, seq: Tensor) -> Tensor:
        return bits_to_indices(seq.bool())

    def embed(self, seq: Tensor, start: int = 0) -> Tensor:
        bits = seq.bool()
        if self.training and self.bit_flip > 0:
            bits = bits ^ (torch.rand(bits.shape, device=bits.device) < self.bit_flip)
        return self.input(bits.to(self.input.weight.dtype) * 2 - 1)

    def loss(self, hidden: Tensor, seq: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.output(hidden).float()  # (B, N, d)
        loss = F.binary_cross_entropy_with_logits(logits, seq.float())
        acc = ((logits > 0) == seq.bool()).float()
        return loss, {"bit_acc": acc.mean().detach(), "token_acc": acc.all(-1).float().mean().detach()}

    def sample_step(self, hidden: Tensor, step: int, choose: Chooser) -> Tensor:
        logit = self.output(hidden).float()  # (copies*B, d): log-odds of bit 1
        return choose(torch.stack([torch.zeros_like(logit), logit], dim=-1))  # (B, d)


def make_codec(cfg: CodecConfig, bits: int, width: int) -> ImageCodec:
    """The codec ``cfg`` describes, for ``bits``-bit tokens and a model of ``width``."""
    if cfg.kind == "subtoken":
        return SubTokenCodec(bits, width, parts=cfg.parts)
    if cfg.kind == "depth":
        return DepthHeadCodec(bits, width, parts=cfg.parts, depth_layers=cfg.depth_layers, depth_heads=cfg.depth_heads)
    if cfg.kind == "bits":
        return BitCodec(bits, width, bit_flip=cfg.bit_flip)
    raise CodecConfigError(f"unknown codec kind {cfg.kind!r}; choose one of {CODEC_KINDS}")
