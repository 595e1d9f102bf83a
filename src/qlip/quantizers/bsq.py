"""Binary Spherical Quantization (BSQ), standing alone (the QLIP bottleneck; BSQ paper, Zhao et al. 2024).

A d-dimensional latent ``u`` is l2-normalised onto the unit sphere and quantized per channel to
``q = sign(u) / sqrt(d)`` with ``sign(0) = -1``, so every code is also on the unit sphere. A straight-through
estimator passes the gradient of the identity back to ``u``. Each code is one token whose index reads the bits
``b_k = (q_k > 0)`` most significant bit first: ``index = sum_k b_k * 2**(d - 1 - k)``.

Conventions used throughout this module:

* Indices are int64 and computed with integer arithmetic only (constant powers of two, masks, integer sums). A
  float32 sum rounds every index >= 2**24 and a float64 sum every index >= 2**53, so decode-from-indices would then
  disagree with the forward pass. ``dim`` is therefore limited to 62 bits (the sum of 62 int64 powers of two
  cannot overflow).
* Group indices split the d bits into ``d // group_size`` runs of consecutive bits, each read MSB first.
* Nothing of size ``2**d`` is ever allocated: the soft assignment used by the entropy regulariser lives per group
  (``2**group_size`` entries), and usage statistics use ``torch.unique`` over the observed indices.
* Entropies in the loss (``per_sample_entropy``, ``codebook_entropy``) are in nats; entropies in ``stats`` are in
  bits (easier to read against the d-bit capacity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = [
    "MAX_DIM",
    "MAX_GROUP_SIZE_FOR_GROUP_ENTROPY",
    "BSQOutput",
    "BSQuantizer",
    "bits_to_codes",
    "bits_to_indices",
    "codes_to_bits",
    "group_indices_to_indices",
    "indices_to_bits",
    "indices_to_group_indices",
    "usage_stats",
]

# 62 bits: the int64 sum of 62 powers of two stays below 2**62, far from overflow, and int64 is what torch indexes with.
MAX_DIM = 62
# The "group" entropy materialises 2**group_size codewords per group; above 2**16 that is no longer cheap.
MAX_GROUP_SIZE_FOR_GROUP_ENTROPY = 16
# Keeps log() finite for probabilities that underflow to zero (their contribution p * log p is then zero anyway).
_LOG_CLAMP = 1e-30


# ----------------------------------------------------------------------------------------------------------------
# Argument checks (shared by the module and the pure functions)
# ----------------------------------------------------------------------------------------------------------------


def _check_dim(dim: int) -> None:
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1 or dim > MAX_DIM:
        raise ValueError(
            f"BSQ dim must be an integer in [1, {MAX_DIM}] (indices are exact int64), got {dim!r}; "
            f"use fewer bits per token or split the token into several codes."
        )


def _resolve_group_size(dim: int, group_size: int | None) -> int:
    if group_size is None:
        return dim
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1 or dim % group_size != 0:
        divisors = [g for g in range(1, dim + 1) if dim % g == 0]
        raise ValueError(
            f"group_size must be a positive divisor of dim={dim}, got {group_size!r}; pick one of {divisors}."
        )
    return group_size


def _check_last_dim(x: Tensor, dim: int, what: str) -> None:
    if x.ndim == 0 or x.shape[-1] != dim:
        raise ValueError(f"{what} must have last dimension {dim} (the number of BSQ bits), got shape {tuple(x.shape)}.")


def _as_int64_indices(indices: Tensor, num_bits: int, what: str) -> Tensor:
    """Validates integer dtype and range [0, 2**num_bits); returns an int64 tensor."""
    if not isinstance(indices, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor of integers, got {type(indices).__name__}.")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(
            f"{what} must be an integer tensor (int64), got dtype {indices.dtype}; float indices silently lose bits "
            f"above 2**24 (float32) or 2**53 (float64), so keep token indices as int64 end to end."
        )
    indices = indices.to(torch.int64)
    if indices.numel() > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= (1 << num_bits):
            raise ValueError(
                f"{what} must lie in [0, 2**{num_bits}) = [0, {1 << num_bits}), got values in [{lo}, {hi}]; "
                f"check that dim/group_size match the ones the indices were made with."
            )
    return indices


def _msb_first_shifts(num_bits: int, device: torch.device | None = None) -> Tensor:
    """Shift amounts (num_bits - 1, ..., 1, 0): bit k carries weight 2**(num_bits - 1 - k), MSB first."""
    return torch.arange(num_bits - 1, -1, -1, dtype=torch.int64, device=device)


def _msb_first_powers(num_bits: int, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """The bit weights (2**(num_bits - 1), ..., 2, 1) as a constant tensor, MSB first.

    Built from Python integers rather than with tensor shifts: graph exporters (ONNX, ``torch.export``) then see a
    constant, and ONNX has no shift operator for signed integers.
    """
    return torch.tensor([1 << s for s in range(num_bits - 1, -1, -1)], dtype=dtype, device=device)


def _pack_bits(bits: Tensor) -> Tensor:
    """(..., n) bool bits, MSB first -> (...) int64 integers, exact: the one place bits become indices.

    The bits are weighted by powers of two built with shifts (no float ever rounds them) and summed in integers.
    For n <= 31 the weights and the sum are int32, which halves the largest intermediate (the size of the codes);
    distinct powers of two sum without carries, so the int32 sum is exact.
    """
    n = bits.shape[-1]
    dtype = torch.int32 if n <= 31 else torch.int64
    return (bits.to(dtype) * _msb_first_powers(n, dtype, bits.device)).sum(dim=-1, dtype=dtype).to(torch.int64)


def _unpack_bits(indices: Tensor, num_bits: int) -> Tensor:
    """(...) int64 integers -> (..., num_bits) bool bits, MSB first; the inverse of :func:`_pack_bits`, unchecked."""
    return (indices.unsqueeze(-1) & _msb_first_powers(num_bits, torch.int64, indices.device)) != 0


# ----------------------------------------------------------------------------------------------------------------
# Pure conversions between codes, bits, indices and group indices
# ----------------------------------------------------------------------------------------------------------------


def codes_to_bits(codes: Tensor) -> Tensor:
    """Bits of BSQ codes: True where the code is positive (so sign(0) reads as bit 0, the -1 side).

    Args:
        codes: (..., d) codes, scaled or not.

    Returns:
        (..., d) bool tensor.
    """
    return codes > 0


def bits_to_codes(bits: Tensor, scale: bool = True) -> Tensor:
    """Codes in {-1, +1} (times 1/sqrt(d) when ``scale``) from bits; inverse of :func:`codes_to_bits`.

    Args:
        bits: (..., d) bool or 0/1 integer tensor.
        scale: divide by sqrt(d) so the code lies on the unit sphere (what the quantizer outputs).

    Returns:
        (..., d) float32 codes.
    """
    if bits.ndim == 0:
        raise ValueError("bits must have at least one dimension (the last one holds the d bits), got a scalar.")
    magnitude = 1.0 / math.sqrt(bits.shape[-1]) if scale else 1.0
    positive = bits.to(torch.bool)
    return torch.where(positive, magnitude, -magnitude).to(torch.float32)


def bits_to_indices(bits: Tensor, group_size: int | None = None) -> Tensor:
    """Token indices from bits, MSB first, in exact int64 arithmetic.

    Args:
        bits: (..., d) bool or 0/1 integer tensor, d <= 62.
        group_size: None or d: one index per token; otherwise g dividing d: one index per group of g bits.

    Returns:
        (...) int64 indices in [0, 2**d) when group_size is None or d, else (..., d // g) in [0, 2**g).
    """
    if bits.ndim == 0:
        raise ValueError("bits must have at least one dimension (the last one holds the d bits), got a scalar.")
    dim = bits.shape[-1]
    _check_dim(dim)
    g = _resolve_group_size(dim, group_size)
    indices = _pack_bits(rearrange(bits.to(torch.bool), "... (n g) -> ... n g", g=g))  # (..., n)
    return indices.squeeze(-1) if g == dim else indices


def indices_to_bits(indices: Tensor, dim: int, group_size: int | None = None, *, check_range: bool = True) -> Tensor:
    """Bits from token indices; inverse of :func:`bits_to_indices` called with the same ``group_size``.

    Args:
        indices: (...) int64 in [0, 2**dim) when group_size is None or dim, else (..., dim // g) in [0, 2**g).
        dim: number of bits d per token.
        group_size: see :func:`bits_to_indices`.
        check_range: check dtype and range (reads the min and max back to the host, a GPU sync); False for int64
            indices already known to be valid, e.g. tokens this package wrote.

    Returns:
        (..., dim) bool tensor.
    """
    _check_dim(dim)
    g = _resolve_group_size(dim, group_size)
    if check_range:
        indices = _as_int64_indices(indices, g, "indices")
    if g == dim:
        indices = indices.unsqueeze(-1)  # (..., 1): a single group
    else:
        _check_last_dim(indices, dim // g, f"group indices (group_size={g})")
    return rearrange(_unpack_bits(indices, g), "... n g -> ... (n g)")  # (..., n, g) -> (..., d)


def indices_to_group_indices(indices: Tensor, dim: int, group_size: int) -> Tensor:
    """Splits d-bit token indices into ``dim // group_size`` group indices of ``group_size`` bits each, MSB first.

    Args:
        indices: (...) int64 in [0, 2**dim).
        dim: number of bits d per token.
        group_size: g dividing d.

    Returns:
        (..., dim // g) int64 in [0, 2**g) (the last dimension is kept even when g == d).
    """
    _check_dim(dim)
    g = _resolve_group_size(dim, group_size)
    indices = _as_int64_indices(indices, dim, "indices")
    shifts = _msb_first_shifts(dim // g, indices.device) * g  # the first group holds the most significant bits
    return (indices.unsqueeze(-1) >> shifts) & ((1 << g) - 1)


def group_indices_to_indices(group_indices: Tensor, group_size: int) -> Tensor:
    """Joins group indices (MSB group first) into one token index; inverse of :func:`indices_to_group_indices`.

    Args:
        group_indices: (..., n) int64 in [0, 2**group_size); n * group_size must be <= 62.
        group_size: bits per group g.

    Returns:
        (...) int64 in [0, 2**(n * g)).
    """
    if group_indices.ndim == 0:
        raise ValueError("group_indices must have a last dimension holding the groups, got a scalar.")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}.")
    _check_dim(group_indices.shape[-1] * group_size)
    group_indices = _as_int64_indices(group_indices, group_size, "group_indices")
    shifts = _msb_first_shifts(group_indices.shape[-1], group_indices.device) * group_size
    return (group_indices << shifts).sum(dim=-1, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------------
# Codebook usage statistics (for logs and eval)
# ----------------------------------------------------------------------------------------------------------------


def _binary_entropy_bits(p: Tensor) -> Tensor:
    q = 1.0 - p
    return -(p * torch.log2(p.clamp_min(_LOG_CLAMP)) + q * torch.log2(q.clamp_min(_LOG_CLAMP)))


@torch.no_grad()
def usage_stats(indices: Tensor, dim: int, bits: Tensor | None = None) -> dict[str, Tensor]:
    """Codebook usage of a batch of tokens, without any 2**d tensor (the quantizer's usage statistics).

    Per-bit numbers alone can mislead: every bit may be balanced (~1 bit of entropy) while the batch uses only a
    handful of distinct codes, so the code-level entropy and perplexity of the empirical index distribution are
    reported too. All entropies are in bits.

    Args:
        indices: (...) int64 token indices in [0, 2**dim), any shape (flattened).
        dim: bits per token d.
        bits: optional (..., dim) bits of the same tokens, to skip recomputing them from ``indices``.

    Returns:
        Detached float32/int64 scalars and (d,) vectors:
        ``bit_mean`` (d,) fraction of tokens with bit k set; ``bit_entropy`` (d,) binary entropy of each bit;
        ``mean_bit_entropy``; ``distinct_codes`` number of distinct indices; ``code_entropy`` entropy of the
        empirical index distribution; ``code_perplexity`` = 2**code_entropy (effective number of codes used);
        ``num_tokens``.
    """
    _check_dim(dim)
    indices = _as_int64_indices(indices, dim, "indices").reshape(-1)
    if indices.numel() == 0:
        raise ValueError("usage_stats needs at least one token, got an empty indices tensor.")
    if bits is None:
        bits = indices_to_bits(indices, dim)
    else:
        _check_last_dim(bits, dim, "bits")
        bits = bits.reshape(-1, dim)
        if bits.shape[0] != indices.shape[0]:
            raise ValueError(
                f"bits describe {bits.shape[0]} tokens but indices {indices.shape[0]}; pass bits of the same batch."
            )
    bit_mean = bits.to(torch.float32).mean(dim=0)  # (d,)
    bit_entropy = _binary_entropy_bits(bit_mean)  # (d,)
    _, counts = torch.unique(indices, return_counts=True)
    probs = counts.to(torch.float64) / indices.numel()  # float64: exact enough for large batches of rare codes
    code_entropy = -(probs * torch.log2(probs)).sum()
    return {
        "bit_mean": bit_mean,
        "bit_entropy": bit_entropy,
        "mean_bit_entropy": bit_entropy.mean(),
        "distinct_codes": torch.tensor(counts.numel(), dtype=torch.int64, device=indices.device),
        "code_entropy": code_entropy.to(torch.float32),
        "code_perplexity": torch.exp2(code_entropy).to(torch.float32),
        "num_tokens": torch.tensor(indices.numel(), dtype=torch.int64, device=indices.device),
    }


# ----------------------------------------------------------------------------------------------------------------
# The quantizer module
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BSQOutput:
    """Everything :meth:`BSQuantizer.forward` computes. Entropies in nats, ``stats`` entropies in bits."""

    codes: Tensor  # (..., d) float32 in {-1/sqrt(d), +1/sqrt(d)}, straight-through gradient to the normalised input
    indices: Tensor  # (...) int64 in [0, 2**d), MSB first
    loss: Tensor  # scalar: beta * commit_loss + (gamma0 * per_sample_entropy - gamma1 * codebook_entropy) / inv_temp
    commit_loss: Tensor  # scalar: mean over tokens of ||sg(codes) - u||^2
    per_sample_entropy: Tensor  # scalar: mean over tokens of H(p(c|u)), summed over groups (nats)
    codebook_entropy: Tensor  # scalar: H(mean over tokens of p(c|u)), per group, summed (nats)
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached usage statistics, see usage_stats()


class BSQuantizer(nn.Module):
    """Binary Spherical Quantizer with the BSQ entropy regulariser (BSQ paper, section 3).

    Args:
        dim: bits per token d (1..62); the released QLIP models use 28.
    """

    def __init__(
        self,
        dim: int,
        *,
        group_size: int = 1,  # bits per entropy group g (divides dim); the soft assignment has 2**g entries per group
        inv_temperature: float = 1.0,  # tau_inv: sharpness of the soft assignment; the entropy terms are divided by it
        l2_norm: bool = True,  # project the input onto the unit sphere before quantizing (QLIP: on)
        beta: float = 0.0,  # weight of the commitment loss ||sg(codes) - u||^2
        gamma0: float = 1.0,  # weight of the per-sample entropy (low: each token commits to one code)
        gamma1: float = 1.0,  # weight of the codebook entropy (high: the batch spreads over many codes)
        entropy: str = "group",  # "group": softmax over the 2**g codewords of each group; "analytical": per-bit sigmoid
        compute_entropy: bool = True,  # False skips the entropy terms (inference); they are returned as zeros
    ) -> None:
        super().__init__()
        _check_dim(dim)
        group_size = _resolve_group_size(dim, group_size)
        if entropy not in ("group", "analytical"):
            raise ValueError(f"entropy must be 'group' or 'analytical', got {entropy!r}.")
        if entropy == "group" and group_size > MAX_GROUP_SIZE_FOR_GROUP_ENTROPY:
            raise ValueError(
                f"entropy='group' with group_size={group_size} would build 2**{group_size} codewords per group; "
                f"use group_size <= {MAX_GROUP_SIZE_FOR_GROUP_ENTROPY} or entropy='analytical' (per-bit, no codebook)."
            )
        if not inv_temperature > 0:
            raise ValueError(f"inv_temperature must be > 0 (it divides the entropy terms), got {inv_temperature!r}.")
        self.dim = dim
        self.group_size = group_size
        self.inv_temperature = float(inv_temperature)
        self.l2_norm = l2_norm
        self.beta = float(beta)
        self.gamma0 = float(gamma0)
        self.gamma1 = float(gamma1)
        self.entropy = entropy
        self.compute_entropy = compute_entropy
        self.scale = 1.0 / math.sqrt(dim)  # puts every code on the unit sphere
        if entropy == "group":
            # (2**g, g) codewords in {-1, +1}; row j is group index j read MSB first, so softmax slot == group index.
            signs = _unpack_bits(torch.arange(1 << group_size), group_size)
            self.register_buffer("group_codewords", signs.to(torch.float32) * 2 - 1, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, group_size={self.group_size}, inv_temperature={self.inv_temperature}, "
            f"l2_norm={self.l2_norm}, beta={self.beta}, gamma0={self.gamma0}, gamma1={self.gamma1}, "
            f"entropy={self.entropy!r}, compute_entropy={self.compute_entropy}"
        )

    # -- conversions bound to this quantizer's d ----------------------------------------------------------------

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """(..., d) codes -> (...) int64 indices in [0, 2**d), MSB first, exact."""
        _check_last_dim(codes, self.dim, "codes")
        return _pack_bits(codes_to_bits(codes))

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(...) int64 indices in [0, 2**d) -> (..., d) float32 codes scaled by 1/sqrt(d)."""
        return bits_to_codes(indices_to_bits(indices, self.dim))

    # -- inference path -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def quantize(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Fast inference path: codes and indices only, no entropy, no stats, no gradient.

        The l2 normalisation is skipped on purpose: dividing by a positive norm never changes a sign (and an
        all-zero vector maps to all -1 either way), so the result equals :meth:`forward`'s codes and indices.

        Args:
            u: (..., d) latents, any float dtype.

        Returns:
            (codes, indices): (..., d) float32 codes scaled by 1/sqrt(d), and (...) int64 indices.
        """
        _check_last_dim(u, self.dim, "input")
        positive = codes_to_bits(u)  # (..., d) bool: sign(0) = -1
        return bits_to_codes(positive), _pack_bits(positive)

    # -- training path -----------------------------------------------------------------------------------------

    def forward(self, u: Tensor) -> BSQOutput:
        """Quantizes ``u`` with a straight-through estimator and computes the BSQ loss terms, all in float32.

        Args:
            u: (..., d) latents, any float dtype; autocast is disabled inside so quantization and entropies are fp32.

        Returns:
            A :class:`BSQOutput`.
        """
        _check_last_dim(u, self.dim, "input")
        if not u.dtype.is_floating_point:
            raise ValueError(f"input must be a floating-point tensor, got dtype {u.dtype}.")
        if u.numel() == 0:
            raise ValueError(f"input holds no tokens (shape {tuple(u.shape)}); entropy and stats need at least one.")
        with torch.autocast(device_type=u.device.type, enabled=False):
            u = u.float()
            if self.l2_norm:
                u = F.normalize(u, dim=-1)
            positive = codes_to_bits(u)  # sign(0) = -1
            hard = bits_to_codes(positive)
            # Straight-through: value exactly `hard` (u - sg(u) is exactly 0), gradient of the identity w.r.t. u.
            # (The usual u + sg(hard - u) leaves float rounding in the value, so codes would not be exact.)
            codes = hard + (u - u.detach())
            indices = _pack_bits(positive)
            commit_loss = (hard - u).pow(2).sum(dim=-1).mean()

            if self.compute_entropy:
                flat = u.reshape(-1, self.dim)  # (N, d)
                # With g = 1 the group softmax IS the per-bit sigmoid: the closed form is the same math, ~10x cheaper.
                if self.entropy == "group" and self.group_size > 1:
                    per_sample, codebook = self._group_entropies(flat)
                else:
                    per_sample, codebook = self._analytical_entropies(flat)
            else:
                per_sample = codebook = u.new_zeros(())
            loss = self.beta * commit_loss + (self.gamma0 * per_sample - self.gamma1 * codebook) / self.inv_temperature
            stats = usage_stats(indices.detach(), self.dim, bits=positive.detach())
        return BSQOutput(
            codes=codes,
            indices=indices,
            loss=loss,
            commit_loss=commit_loss,
            per_sample_entropy=per_sample,
            codebook_entropy=codebook,
            stats=stats,
        )

    def _group_entropies(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample and codebook entropies (nats) of the per-group softmax over 2**g codewords (BSQ paper eq. 7).

        Memory grows as N * (d / g) * 2**g floats (plus autograd copies): cheap for g <= 8, about 1 GB per tensor
        for 8192 tokens at d = 28, g = 14. Prefer small groups, or entropy="analytical", for large batches.
        """
        u_groups = rearrange(u, "n (k g) -> n k g", g=self.group_size)  # (N, G, g)
        codewords = self.group_codewords.float()  # (2**g, g); float() undoes a module-wide .half()/.bfloat16()
        logits = (2.0 * self.inv_temperature * self.scale) * torch.einsum("nkg,cg->nkc", u_groups, codewords)
        log_p = torch.log_softmax(logits, dim=-1)  # (N, G, 2**g)
        p = log_p.exp()
        per_sample = -(p * log_p).sum(dim=-1).sum(dim=-1).mean()
        avg_p = p.mean(dim=0)  # (G, 2**g)
        codebook = -(avg_p * torch.log(avg_p.clamp_min(_LOG_CLAMP))).sum()
        return per_sample, codebook

    def _analytical_entropies(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Per-bit sigmoid variant (nats): p(bit k = +1 | u) = sigmoid(4 * tau_inv * u_k / sqrt(d)).

        This is the g = 1 softmax written in closed form, so it needs no codebook at any group size.
        """
        logits = (4.0 * self.inv_temperature * self.scale) * u  # (N, d)
        log_p_pos, log_p_neg = F.logsigmoid(logits), F.logsigmoid(-logits)
        p_pos, p_neg = log_p_pos.exp(), log_p_neg.exp()
        per_sample = -(p_pos * log_p_pos + p_neg * log_p_neg).sum(dim=-1).mean()
        avg_pos, avg_neg = p_pos.mean(dim=0), p_neg.mean(dim=0)  # (d,) each
        codebook = -(
            avg_pos * torch.log(avg_pos.clamp_min(_LOG_CLAMP)) + avg_neg * torch.log(avg_neg.clamp_min(_LOG_CLAMP))
        ).sum()
        return per_sample, codebook
