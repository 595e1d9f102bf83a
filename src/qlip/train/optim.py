"""Optimizers and schedule (the paper's recipe): AdamW and LAMB, per-module learning rates, warm-up + cosine.

Parameter groups: the paper trains the visual encoder at 2e-4, the text encoder at 2e-5 and the decoder at 2e-3
around a peak of 5e-4, so the rate is chosen per module; norms, biases, the position / class / token embeddings
and the logit scale get no weight decay (decaying them pulls scales and offsets towards zero for no benefit).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .config import OptimSection

# Which module a parameter belongs to, by its name's first component.
MODULE_OF_PREFIX = {"visual": "visual", "text": "text", "quant_in": "bottleneck", "quant_out": "bottleneck",
                    "quantizer": "bottleneck", "decoder": "decoder", "logit_scale": "text"}  # fmt: skip
NO_DECAY_NAMES = ("pos_embed", "class_embedding", "token_embed", "logit_scale")


def _module_lr(cfg: OptimSection, module: str) -> float:
    value = getattr(cfg, f"lr_{module}", None)
    return cfg.lr if value is None else value


def wants_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Matrices and conv kernels decay; vectors (norms, biases), embeddings and the logit scale do not."""
    if param.ndim < 2:
        return False
    return not any(part in name for part in NO_DECAY_NAMES)


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict]:
    """Trainable parameters grouped by (module, decay); each group carries its peak ``lr`` and a ``name``.

    Pass the unwrapped model (not DDP / compiled), so names start with the module (``visual.``, ``text.``, ...).
    """
    groups: dict[tuple[str, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = MODULE_OF_PREFIX.get(name.split(".", 1)[0], "other")
        groups.setdefault((module, wants_weight_decay(name, p)), []).append(p)
    out = []
    for (module, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": _module_lr(cfg, module) if module != "other" else cfg.lr,
                    "weight_decay": cfg.weight_decay if decay else 0.0,
                    "name": f"{module}{'' if decay else '_no_decay'}"})  # fmt: skip
    if not out:
        raise ValueError("the model has no trainable parameters; check the stage and the frozen parts")
    return out


class LAMB(torch.optim.Optimizer):
    """LAMB (You et al. 2020): Adam moments, then each parameter's step is rescaled by the trust ratio
    ||w|| / ||update|| so that every layer moves by a similar relative amount at very large batch sizes.

    update = m_hat / (sqrt(v_hat) + eps) + weight_decay * w;  w <- w - lr * trust * update, where
    trust = ||w|| / ||update|| (1 when either norm is 0).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:  # fmt: skip
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"LAMB needs lr >= 0, eps >= 0 and betas in [0, 1); got {lr}, {eps}, {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0  # a Python int: no device sync per parameter
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = exp_avg / (1 - beta1**step)
                v_hat = exp_avg_sq / (1 - beta2**step)
                update = m_hat / (v_hat.sqrt() + group["eps"])
                w = p.float()
                if group["weight_decay"]:
                    update = update.add(w, alpha=group["weight_decay"])
                w_norm, u_norm = w.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_((update * trust * -group["lr"]).to(p.dtype))
        return loss


def build_optimizer(groups: list[dict], cfg: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on GPU when this torch has it) or LAMB over the given parameter groups."""
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "lamb":
        return LAMB(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    kwargs = {}
    if device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **kwargs)


def lr_factor(step: int, *, steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak rate at ``step`` (0-based): linear warm-up to 1, then cosine down to min_lr_ratio."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimSection) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine for every group (each group keeps its own peak rate)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio),
    )
