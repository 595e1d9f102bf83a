"""Exponential moving average of the weights (issue 4, part 6).

The EMA copy is kept in float32 beside the model and updated after every optimizer step with one fused
``lerp`` over all tensors; only trainable parameters move, buffers are copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ModelEMA:
    """shadow <- decay * shadow + (1 - decay) * param, with a warm-up that lowers the decay early in training.

    The effective decay at update n is ``min(decay, (1 + n) / (10 + n))`` so that an EMA started from random
    weights is not dominated by them for thousands of steps.

    Args:
        model: the unwrapped model whose trainable parameters are averaged.
        decay: the target decay, in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().float().clone() for n in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = dict(model.named_parameters())
        current = [params[n].detach().float() for n in self.names]
        torch._foreach_lerp_(list(self.shadow.values()), current, 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (e.g. a copy used for export or evaluation)."""
        params = dict(model.named_parameters())
        for n in self.names:
            params[n].copy_(self.shadow[n].to(params[n].dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        for n in self.names:
            self.shadow[n].copy_(state["shadow"][n])
