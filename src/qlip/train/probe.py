"""``qlip balance``: the paper's post-hoc loss balancing, measured (docs/training.md, "Losses and balancing").

Train each objective alone for ``probe.steps`` steps (align only: the CLIP loss; recon only: pixel loss plus the
BSQ and commitment terms the bottleneck needs), take the mean logged loss over the last ``probe.tail_fraction``
of each run as its converged value, and write the weights ``w_k = L_align / L_k`` (relative to align) as a config
fragment ``run_dir/balance.yaml``::

    qlip train CONFIG runs/x/balance.yaml        # or: loss.balance.mode=posthoc loss.balance.converged=...
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..losses.balance import posthoc_weights
from .build import stage_weights
from .config import ConfigError, TrainConfig
from .logger import read_metrics

log = logging.getLogger(__name__)

# Base weights of each single-objective probe (stage 1 terms).
PROBE_WEIGHTS = {
    "align": {"align": 1.0, "recon": 0.0, "quant": 0.0, "commit": 0.0},
    "recon": {"align": 0.0, "recon": 1.0, "quant": 1.0, "commit": 1.0},
}


@dataclass
class BalanceResult:
    converged: dict[str, float]
    weights: dict[str, float]
    fragment: Path


def converged_loss(run_dir: str | Path, term: str, tail_fraction: float) -> float:
    """Mean of ``loss/<term>`` over the last ``tail_fraction`` of the logged steps of a run."""
    values = [r[f"loss/{term}"] for r in read_metrics(run_dir) if f"loss/{term}" in r]
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        raise ValueError(f"the probe run in {run_dir} logged no finite loss/{term}; raise probe.steps")
    tail = values[-max(1, int(round(len(values) * tail_fraction))) :]
    return sum(tail) / len(tail)


def probe_config(cfg: TrainConfig, objective: str) -> TrainConfig:
    """The single-objective variant of ``cfg``: short, fixed weights, no eval, no export."""
    if objective not in PROBE_WEIGHTS:
        raise ConfigError(f"unknown probe objective {objective!r}; choose from {sorted(PROBE_WEIGHTS)}")
    probe = copy.deepcopy(cfg)
    probe.run_dir = str(Path(cfg.run_dir) / f"probe-{objective}")
    probe.optim.steps = cfg.probe.steps
    probe.optim.warmup_steps = min(cfg.optim.warmup_steps, cfg.probe.steps // 5)
    probe.stop_at = None
    probe.resume = "never"
    probe.loss.balance = {"mode": "fixed", "weights": PROBE_WEIGHTS[objective], "reference_term": objective}
    probe.loss.lpips_weight = probe.loss.gan_weight = 0.0  # one objective alone
    probe.eval.every, probe.eval.at_end = 0, False
    probe.checkpoint.every, probe.checkpoint.export = 0, False
    probe.logging.every = max(1, min(cfg.logging.every, cfg.probe.steps // 20))
    probe.validate()
    return probe


def run_balance_probes(cfg: TrainConfig) -> BalanceResult:
    """Run the probes of ``cfg.probe.objectives`` and write ``run_dir/balance.yaml``."""
    from .loop import train

    if cfg.task != "qlip":
        raise ConfigError(f"qlip balance measures the QLIP tokenizer's objectives and this config trains task "
                          f"{cfg.task!r}; use a QLIP config (task: qlip)")  # fmt: skip
    if cfg.stage != 1:
        raise ConfigError("qlip balance measures the stage-1 objectives; use a stage-1 config (stage=1)")
    if "align" not in cfg.probe.objectives:
        raise ConfigError("probe.objectives must include 'align' (the reference of the posthoc weights)")
    converged = {}
    for objective in cfg.probe.objectives:
        probe = probe_config(cfg, objective)
        for old in Path(probe.run_dir).glob("metrics.jsonl"):
            old.unlink()  # a fresh measurement
        log.info("balance probe %s: %d steps in %s", objective, probe.optim.steps, probe.run_dir)
        train(probe)
        converged[objective] = converged_loss(probe.run_dir, objective, cfg.probe.tail_fraction)
    base = {k: 1.0 for k in converged}
    weights = posthoc_weights(converged, reference="align", base={**stage_weights(cfg), **base})
    fragment = Path(cfg.run_dir) / "balance.yaml"
    fragment.parent.mkdir(parents=True, exist_ok=True)
    body = {"loss": {"balance": {"mode": "posthoc", "converged": converged, "reference_term": "align",
                                 "weights": {**stage_weights(cfg), **base}}}}  # fmt: skip
    header = (f"# written by `qlip balance`: converged single-objective losses after {cfg.probe.steps} steps each\n"
              f"# resulting weights: {weights}\n")  # fmt: skip
    fragment.write_text(header + yaml.safe_dump(body, sort_keys=False))
    return BalanceResult(converged, weights, fragment)
