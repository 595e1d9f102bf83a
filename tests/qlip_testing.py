"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

CAPTIONS = [
    "a photo of a dog", "a photo of a cat", "an astronaut in a white suit", "a diagram of a cat",
    "a large red star in the top left corner", "a small blue circle at the bottom", "a green square in the center",
] * 5

# config.json fields of a released repo, with the sizes shrunk (absent fields take the documented defaults)
TINY_RELEASED_CONFIG = {
    "architectures": ["QLIPModel"], "model_type": "clip", "projection_dim": 16,
    "logit_scale_init_value": 2.6592, "text_projection_bias": False, "vision_projection_bias": True,
    "text_config": {"bos_token_id": 0, "eos_token_id": 2, "vocab_size": 600, "hidden_size": 32,
                    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "intermediate_size": 64, "k_bias": False, "layer_norm_eps": 1e-6,
                      "rope": True, "subln": True, "swiglu": True, "use_rms_norm": False, "quantizer": "bsq",
                      "quantizer_embed_type": "mlp", "quantizer_l2_norm": True,
                      "quantizer_cfg": {"embed_dim": 8, "group_size": 1, "input_format": "blc",
                                        "inv_temperature": 1.0, "l2_norm": True}},
    "decoder_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "intermediate_size": 64, "k_bias": False, "layer_norm_eps": 1e-6,
                       "rope": True, "subln": True, "swiglu": True},
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights around 1), so that a misplaced tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
    return model
