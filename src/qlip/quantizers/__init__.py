"""Quantizers: binary spherical quantization (BSQ; Zhao et al. 2024)."""

from qlip.quantizers.bsq import (
    MAX_DIM,
    MAX_GROUP_SIZE_FOR_GROUP_ENTROPY,
    BSQOutput,
    BSQuantizer,
    bits_to_codes,
    bits_to_indices,
    codes_to_bits,
    group_indices_to_indices,
    indices_to_bits,
    indices_to_group_indices,
    usage_stats,
)

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
