"""Code usage over a whole evaluation set, and the compression ratio (docs/evaluation.md).

The quantizer's :func:`qlip.quantizers.bsq.usage_stats` describes one batch; evaluation needs the usage of the
whole set, which is not an average of per-batch numbers (a code seen once in each of 100 batches is one code, not
100). :class:`CodeUsageAccumulator` therefore keeps exact counts: per-bit set counts (d,) and a sorted table of
(distinct index, count) merged batch by batch; nothing of size 2^d is ever built.

Reported (entropies in bits):

* ``distinct_codes``: number of distinct token indices seen; ``codebook_size`` = 2^d;
* ``code_entropy`` / ``code_perplexity``: entropy of the empirical index distribution and 2^entropy (the effective
  number of codes in use; at most min(2^d, tokens seen));
* ``bit_mean`` / ``bit_entropy`` (d,) and ``mean_bit_entropy``: per-bit usage. Balanced bits do not imply many
  codes (see docs/evaluation.md), which is why the code-level numbers are reported too;
* ``compression_ratio`` = 24 p^2 / d: bits of an RGB patch over the bits of its token.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..config import compression_ratio
from ..quantizers.bsq import indices_to_bits

__all__ = ["CodeUsageAccumulator", "compression_ratio"]


class CodeUsageAccumulator:
    """Exact code usage over many batches of token indices.

    Args:
        num_bits: bits per token d.
    """

    def __init__(self, num_bits: int) -> None:
        if not 1 <= num_bits <= 62:
            raise ValueError(f"num_bits must be in 1..62 (int64 indices), got {num_bits}")
        self.num_bits = num_bits
        self.bit_counts = torch.zeros(num_bits, dtype=torch.int64)
        self.num_tokens = 0
        self._codes = torch.zeros(0, dtype=torch.int64)  # sorted distinct indices
        self._counts = torch.zeros(0, dtype=torch.int64)  # how often each was seen

    def update(self, indices: Tensor) -> None:
        """Add a batch of token indices (any shape, int64 in [0, 2^d))."""
        flat = indices.detach().reshape(-1).to("cpu", torch.int64)
        if flat.numel() == 0:
            return
        if int(flat.min()) < 0 or int(flat.max()) >= 2**self.num_bits:
            raise ValueError(
                f"token indices must lie in [0, 2^{self.num_bits}), got [{int(flat.min())}, {int(flat.max())}]; "
                "was the accumulator made with the model's number of bits?"
            )
        self.bit_counts += indices_to_bits(flat, self.num_bits).sum(dim=0)
        self.num_tokens += flat.numel()
        codes, counts = torch.unique(flat, return_counts=True)
        merged, inverse = torch.unique(torch.cat([self._codes, codes]), return_inverse=True)
        total = torch.zeros(merged.numel(), dtype=torch.int64)
        total.index_add_(0, inverse, torch.cat([self._counts, counts]))
        self._codes, self._counts = merged, total

    def compute(self) -> dict[str, Any]:
        """The usage block of the report (plain Python numbers and lists, JSON-ready)."""
        if self.num_tokens == 0:
            raise ValueError("no tokens were seen; call update() with the indices of at least one image")
        bit_mean = self.bit_counts.double() / self.num_tokens
        p, q = bit_mean.clamp(1e-12, 1.0), (1.0 - bit_mean).clamp(1e-12, 1.0)
        bit_entropy = -(bit_mean * torch.log2(p) + (1.0 - bit_mean) * torch.log2(q))
        probs = self._counts.double() / self.num_tokens
        code_entropy = float(-(probs * torch.log2(probs)).sum())
        return {
            "num_tokens": self.num_tokens,
            "num_bits": self.num_bits,
            "codebook_size": 2**self.num_bits,
            "distinct_codes": int(self._codes.numel()),
            "code_entropy": code_entropy,
            "code_perplexity": float(2.0**code_entropy),
            "max_code_entropy": math.log2(min(2**self.num_bits, self.num_tokens)),
            "bit_mean": [float(v) for v in bit_mean],
            "bit_entropy": [float(v) for v in bit_entropy],
            "mean_bit_entropy": float(bit_entropy.mean()),
        }
