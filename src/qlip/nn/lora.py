"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) for chosen ``nn.Linear`` layers.

A wrapped layer computes ``base(x) + (alpha / r) * B A dropout(x)`` with A (r, in) and B (out, r); B starts at zero,
so a fresh adapter changes nothing. The base weights are frozen; only A and B train, and only they are saved::

    names = add_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16, dropout=0.05)   # freezes everything else
    ... train ...
    save_file(lora_state_dict(model), "adapters.safetensors")
    load_lora_state_dict(model, read_weight_file("adapters.safetensors"))
    merge_lora(model)                                # plain nn.Linear layers again, with B A folded in

A target names a module by its qualified name or by its last parts ("q_proj" matches "model.layers.0.self_attn.
q_proj"; "attn.qkv" matches "blocks.3.attn.qkv").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {dropout}")
        self.base = base.requires_grad_(False)
        self.rank, self.scaling = rank, alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init: A spreads, B = 0 keeps f(x)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.train(base.training)  # a model wrapped in eval mode stays in eval mode

    def delta_weight(self) -> Tensor:
        """The update (out, in) that merging adds to the base weight."""
        return (self.lora_b @ self.lora_a) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        update = self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()  # (..., out), through the rank-r bottleneck
        return self.base(x) + update * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight (still frozen)."""
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model: nn.Module, targets: Iterable[str], *, rank: int = 8, alpha: float = 16.0,
             dropout: float = 0.0) -> list[str]:  # fmt: skip
    """Wrap every ``nn.Linear`` of ``model`` named by ``targets`` in a :class:`LoRALinear` and freeze all other
    parameters. Returns the wrapped modules' names; raises ValueError when a target matches no Linear layer."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    chosen = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    unused = [t for t in targets if not any(_matches(n, [t]) for n in chosen)]
    if unused:
        raise ValueError(f"LoRA targets {unused} match no nn.Linear layer of {type(model).__name__}; name layers by "
                         "their qualified names or last parts (e.g. q_proj)")  # fmt: skip
    model.requires_grad_(False)
    for name in chosen:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(getattr(owner, child), rank=rank, alpha=alpha, dropout=dropout))
    return chosen


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights only ("<layer>.lora_a" / "<layer>.lora_b"), detached on the CPU."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_a"] = layer.lora_a.detach().cpu().contiguous()
        out[f"{name}.lora_b"] = layer.lora_b.detach().cpu().contiguous()
    return out


def load_lora_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load adapters saved by :func:`lora_state_dict` into a model wrapped with the same targets and rank."""
    mine = {k: p for n, layer in lora_layers(model).items() for k, p in
            ((f"{n}.lora_a", layer.lora_a), (f"{n}.lora_b", layer.lora_b))}  # fmt: skip
    missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    bad = sorted(k for k in set(mine) & set(state) if tuple(state[k].shape) != tuple(mine[k].shape))
    if missing or unexpected or bad:
        raise ValueError(f"LoRA weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"misshaped {bad[:3]}; wrap the same layers with the same rank first")  # fmt: skip
    with torch.no_grad():
        for k, p in mine.items():
            p.copy_(state[k])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain ``nn.Linear`` back; returns ``model``."""
    for name, layer in lora_layers(model).items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, layer.merged())
    return model
