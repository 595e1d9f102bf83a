"""Building what a stage trains: the model (with its init and frozen parts), the loss modules and the balancer.

Stage 1 (the paper's recipe, docs/training.md) trains every tower; stage 2 builds the model without the text
tower, freezes the visual encoder including its CLS head (``requires_grad`` False, eval mode) and trains
quant_in / quantizer / quant_out / decoder with MSE + BSQ + LPIPS + GAN.
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from ..factory import create_model
from ..losses.adversarial import build_discriminator
from ..losses.balance import BalanceConfig, LossBalancer
from ..models.hf_text import HFTextTower
from ..models.qlip import QLIP
from ..weights import load_clip_towers, read_weight_file
from .config import OWN_WEIGHT_KEYS, STAGE_DEFAULT_WEIGHT, ConfigError, TrainConfig

log = logging.getLogger(__name__)

STAGE2_PARTS = ("vision", "quantizer", "decoder")


def build_model(cfg: TrainConfig) -> QLIP:
    """The model of ``cfg.stage``: random, from ``init`` (any qlip / released directory), and/or CLIP towers."""
    parts = None if cfg.stage == 1 else STAGE2_PARTS
    source = cfg.init or cfg.model.name
    if cfg.init:
        log.info("initializing from %s (its config defines the architecture; model.name is ignored)", cfg.init)
    model = create_model(source, parts=parts)
    if cfg.model.text_tower and cfg.stage == 1:
        _use_pretrained_text_tower(model, cfg)
    if isinstance(model.text, HFTextTower):
        model.text.set_trainable(cfg.model.text_tower_trainable)
    if cfg.model.pretrained_clip:
        towers = [p for p in cfg.model.pretrained_clip_parts if getattr(model, p, None) is not None]
        report = load_clip_towers(model, read_weight_file(cfg.model.pretrained_clip), parts=towers)
        model.init_report = report
    if cfg.stage == 1:
        missing = [p for p in ("visual", "quantizer", "decoder", "text") if getattr(model, p) is None]
        if missing:
            raise ConfigError(f"stage 1 trains every tower but {source} has no {missing}; use a full model config")
    else:
        freeze_for_stage2(model)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    model.set_attention_impl(cfg.model.attention)
    model.set_quantizer_bypass(cfg.model.bypass_quantizer)
    return model


def _use_pretrained_text_tower(model: QLIP, cfg: TrainConfig) -> None:
    """Replace the architecture's text tower with ``model.text_tower`` (stage 1 from scratch only)."""
    from ..hf.errors import HFModelError
    from ..hf.text_tower import pretrained_text_tower, text_tower_source, use_text_tower

    if cfg.init:
        raise ConfigError(f"model.text_tower={cfg.model.text_tower} starts a new text tower, but init={cfg.init} "
                          "brings its own: drop one of the two (the init model's tower keeps training)")
    if cfg.model.pretrained_clip and "text" in cfg.model.pretrained_clip_parts:
        raise ConfigError(f"model.text_tower={cfg.model.text_tower} and model.pretrained_clip both give the text "
                          "tower; set model.pretrained_clip_parts=[visual]")
    context = model.cfg.text.context_length if model.cfg.text is not None else 77
    try:
        tower, _ = pretrained_text_tower(text_tower_source(cfg.model.text_tower), model.cfg.embed_dim,
                                         context_length=context)  # fmt: skip
    except HFModelError as e:
        raise ConfigError(f"model.text_tower={cfg.model.text_tower}: {e}") from None
    use_text_tower(model, tower)


def text_tower_tokenizer(cfg: TrainConfig, model: QLIP):
    """The tokenizer of a pretrained Hugging Face text tower: its source's (a fresh start) or ``init``'s."""
    from ..factory import get_tokenizer
    from ..hf.text_tower import pretrained_text_tokenizer

    if cfg.data.tokenizer is not None:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer}: the pretrained text tower reads only its own "
                          "tokenizer; set data.tokenizer=null")
    try:
        if cfg.init:
            return get_tokenizer(cfg.init)
        return pretrained_text_tokenizer(model.cfg.text)
    except ValueError as e:  # HFModelError among them
        raise ConfigError(f"the text tower's tokenizer: {e}") from None


def freeze_for_stage2(model: QLIP) -> None:
    """Freeze the visual encoder (with post_norm and the CLS projection) and the logit scale."""
    for p in model.visual.parameters():
        p.requires_grad_(False)
    model.logit_scale.requires_grad_(False)


def set_train_mode(model: QLIP, stage: int) -> None:
    """train() everywhere except the frozen visual encoder of stage 2, which stays in eval mode."""
    model.train()
    if stage == 2:
        model.visual.eval()


def term_weight(cfg: TrainConfig, term: str) -> float:
    """The weight of ``lpips`` or ``gan``: ``loss.lpips_weight`` / ``loss.gan_weight``, else the stage's default."""
    value = getattr(cfg.loss, f"{term}_weight")
    return STAGE_DEFAULT_WEIGHT[term][cfg.stage] if value is None else float(value)


def stage_weights(cfg: TrainConfig) -> dict[str, float]:
    """The weights of the stage's terms in ``loss.balance.weights`` (complete: the config checked it), else the
    stage's defaults: stage 1 the paper's 1 : 1000 : 1 : 1, stage 2 MSE + BSQ."""
    if "weights" in cfg.loss.balance:
        return dict(cfg.loss.balance["weights"])
    return dict(BalanceConfig().weights) if cfg.stage == 1 else {"recon": 1.0, "quant": 1.0, "commit": 0.0}


def weights_override(cfg: TrainConfig, **changes: float) -> str:
    """A ``loss.balance.weights=...`` override naming every term of the stage: ``cfg``'s weights with ``changes``."""
    return f"loss.balance.weights={json.dumps({**stage_weights(cfg), **changes})}"


def balance_config(cfg: TrainConfig) -> BalanceConfig:
    """The BalanceConfig of ``loss.balance``, with LPIPS and the GAN weighted by their own keys."""
    values: dict[str, Any] = {}
    if cfg.stage == 2:
        values = {"reference_term": "recon", "balanced_terms": ("recon",)}
    values.update(cfg.loss.balance)
    values["weights"] = {**stage_weights(cfg), **{t: term_weight(cfg, t) for t in OWN_WEIGHT_KEYS}}
    known = [f.name for f in fields(BalanceConfig)]
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ConfigError(f"unknown key(s) {['loss.balance.' + k for k in unknown]}; valid: {', '.join(known)}")
    try:
        return BalanceConfig(**values)
    except ValueError as e:
        raise ConfigError(f"loss.balance: {e}") from e


def build_balancer(cfg: TrainConfig) -> LossBalancer:
    return LossBalancer(balance_config(cfg))


def build_lpips(cfg: TrainConfig, balancer: LossBalancer, device: torch.device) -> nn.Module | None:
    """The LPIPS network when its weight is active (stage 2 by default; stage 1 when loss.lpips_weight > 0, e.g. the
    one-stage recipe), from local files; a clear start-up error when it is wanted but absent."""
    if "lpips" not in balancer.active_terms:
        return None
    if not (cfg.loss.lpips_vgg and cfg.loss.lpips_lin):
        raise ConfigError(
            f"stage {cfg.stage} uses LPIPS (weight > 0) but no weight files are configured: set loss.lpips_vgg=PATH/"
            "vgg16-397923af.pth and loss.lpips_lin=PATH/vgg.pth (nothing is downloaded), or turn it off with "
            "loss.lpips_weight=0"
        )
    from ..losses.lpips import LPIPS

    return LPIPS.from_files(cfg.loss.lpips_vgg, cfg.loss.lpips_lin).to(device).eval()


def build_gan(cfg: TrainConfig, balancer: LossBalancer, image_size: int, device: torch.device) -> nn.Module | None:
    """The discriminator when the GAN weight is active (stage 2 by default, or loss.gan_weight > 0 in stage 1)."""
    if "gan" not in balancer.active_terms:
        return None
    return build_discriminator(cfg.loss.disc, image_size, width=cfg.loss.disc_width,
                               layers=cfg.loss.disc_layers).to(device)  # fmt: skip


@torch.no_grad()
def full_model_for_export(model: QLIP, cfg: TrainConfig) -> QLIP:
    """Stage 2 trains a model without text tower; when ``init`` has one, export the whole model (its text tower,
    and the visual encoder it shares, with the stage-2 bottleneck and decoder) so zero-shot keeps working."""
    if cfg.stage != 2 or not cfg.init:
        return model
    full = create_model(cfg.init)
    if full.text is None:
        return model
    missing, unexpected = full.load_state_dict(model.state_dict(), strict=False)
    bad = [k for k in missing if not k.startswith("text.")] + list(unexpected)
    if bad:
        raise RuntimeError(f"cannot merge the stage-2 weights into {cfg.init}: mismatched keys {bad[:10]}")
    return full
