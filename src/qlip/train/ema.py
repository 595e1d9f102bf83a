"""Exponential moving average of the weights.

The EMA copy is kept in float32 beside the model and updated after every optimizer step with one fused
``lerp`` over all tensors; only trainable parameters move, buffers are copied.

Under FSDP2 each rank averages its own shard (the shadow holds DTensors laid out like the parameters), so the EMA
costs every rank 1 / world_size of a model copy. :meth:`ModelEMA.state_dict` gathers the full tensors (a
collective then: every rank calls it) and :meth:`ModelEMA.load_state_dict` takes full tensors and keeps this
rank's shard, so checkpoints and exports hold the whole average whatever the strategy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def _is_sharded(t: torch.Tensor) -> bool:
    """Is ``t`` a DTensor (an FSDP2 shard)? False where torch is built without its distributed package."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class ModelEMA:
    """shadow <- decay * shadow + (1 - decay) * param, with a warm-up that lowers the decay early in training.

    The effective decay at update n is ``min(decay, (1 + n) / (10 + n))`` so that an EMA started from random
    weights is not dominated by them for thousands of steps.

    Args:
        model: the unwrapped (or FSDP2-sharded) model whose trainable parameters are averaged.
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
    def copy_to(self, model: nn.Module, shadow: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the averaged weights into ``model`` (e.g. a copy used for export or evaluation).

        Args:
            model: an unsharded model.
            shadow: full tensors from :meth:`state_dict` (needed when this EMA holds FSDP shards); default: its own.
        """
        shadow = self.shadow if shadow is None else shadow
        params = dict(model.named_parameters())
        for n in self.names:
            params[n].copy_(shadow[n].to(params[n].dtype))

    def state_dict(self) -> dict[str, Any]:
        """Decay, update count and the full averaged tensors on CPU (a collective under FSDP2)."""
        shadow = {n: (t.full_tensor() if _is_sharded(t) else t).cpu() for n, t in self.shadow.items()}
        return {"decay": self.decay, "updates": self.updates, "shadow": shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s full tensors; a sharded shadow keeps this rank's part of each."""
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        for n in self.names:
            mine, full = self.shadow[n], state["shadow"][n]
            if _is_sharded(mine):  # every rank holds the full tensor: cut the local shard, no communication
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full.to(mine.device, mine.dtype), mine.device_mesh, mine.placements,
                                         src_data_rank=None)  # fmt: skip
            mine.copy_(full)
