"""Weights: reading weight files, and placing foreign state dicts into a model.

* :func:`read_weight_file`: the one reader (safetensors; pickles only with ``weights_only``).
* :class:`KeyMap` / :func:`load_into` / :class:`LoadReport`: the one key-mapping engine and its report, with the
  tables for our format (:data:`IDENTITY`), the released QLIP checkpoints (:data:`RELEASED_KEYS`) and the CLIP
  family (:data:`CLIP_KEYS`: OpenCLIP, EVA-CLIP, Hugging Face).
* :func:`check_state_dict`: the exact-match check of networks whose files load unchanged (FID Inception, LPIPS).
"""

from .clip import CLIP_KEYS, load_clip_towers, translate_clip_key
from .files import WeightFileError, WeightsMismatchError, read_weight_file
from .mapping import IDENTITY, KeyMap, KeyRule, LoadReport, check_state_dict, load_into, match_state, rule
from .released import RELEASED_KEYS, qlip_to_released_key, released_to_qlip_key

__all__ = [
    "CLIP_KEYS",
    "IDENTITY",
    "KeyMap",
    "KeyRule",
    "LoadReport",
    "RELEASED_KEYS",
    "WeightFileError",
    "WeightsMismatchError",
    "check_state_dict",
    "load_clip_towers",
    "load_into",
    "match_state",
    "qlip_to_released_key",
    "read_weight_file",
    "released_to_qlip_key",
    "rule",
    "translate_clip_key",
]
