"""configs/t2i-b16-256.yaml, the multi-GPU text-to-image recipe: it parses with this code and its generator builds (on
the meta device: no memory, no weights) at LlamaGen-B size over QLIP-B-16-256 tokens."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from qlip.factory import create_model, get_model_config
from qlip.generation import CodecConfig, T2IConfig, T2IModel
from qlip.tokenfile import TokenSpec
from qlip.train.config import config_from_dict

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "t2i-b16-256.yaml"


def test_the_b16_recipe_parses_and_builds_at_llamagen_b_size():
    raw = yaml.safe_load(RECIPE.read_text())
    assert raw["generator"]["text_encoder"].startswith("hf:")  # FLAN-T5-XL from a local folder
    cfg = config_from_dict(raw)
    opts = cfg.task_options
    assert opts.text_encoder == raw["generator"]["text_encoder"]
    assert (cfg.task, opts.width, opts.depth, opts.heads, opts.qk_norm) == ("generator", 768, 12, 12, True)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == ("adamw", 1e-4, [0.9, 0.95], 0.05)
    assert cfg.data.batch_size * 8 == 256 and cfg.distributed.precision == "bf16"
    arch = get_model_config("QLIP-B-16-256")
    spec = TokenSpec(model=arch.name, grid=arch.vision.image_size // arch.vision.patch_size, bits=arch.quantizer.dim)
    with torch.device("meta"):
        text = create_model("QLIP-B-16-256", parts=("text",)).text  # the QLIP text tower stands in for the T5
        t2i = T2IConfig.for_tokenizer(spec, text=arch.text, width=opts.width, depth=opts.depth, heads=opts.heads,
                                      codec=CodecConfig(kind=opts.codec, parts=opts.parts),
                                      dropout=opts.caption_dropout, qk_norm=opts.qk_norm)  # fmt: skip
        model = T2IModel(t2i, text_encoder=text)
    assert next(model.core.parameters()).is_meta
    core = sum(p.numel() for p in model.core.parameters())
    assert 80e6 < core < 90e6  # LlamaGen-B's 12 x 768-wide blocks
    assert t2i.image_steps == 512 and model.codec.tables.vocab == 16384  # 2 x 14-bit sub-tokens per position
