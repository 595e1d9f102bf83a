"""Loss balancing for stage 1: one mechanism, four modes, the weights always returned for logging (the paper's stage 1).

The alignment and reconstruction gradients at the last shared layer (the last MLP linear of the visual encoder)
differ by orders of magnitude, so the weights matter (the paper's ablation: zero-shot / rFID swing from 75.7 / 367.8
at a_a:a_r = 1:0 to 35.4 / 35.6 at 1:10^4). :class:`LossBalancer` combines named scalar losses into the total
``sum_k w_k L_k`` with weights chosen by ``BalanceConfig.mode``:

* ``fixed``: ``w_k = weights[k]``. The default is the paper's ``a_a : a_r = 1 : 1000, a_q = a_z = 1``.
* ``posthoc``: the paper's rule. Each objective is first trained alone to convergence (``qlip balance``); then each
  weight is inversely proportional to its converged loss, normalized so the reference term keeps its base weight::

      w_k = weights[k] * L_ref(converged) / L_k(converged)      for k in ``converged``

  i.e. ``a_r / a_a = L_align(conv) / L_mse(conv)``. Terms absent from ``converged`` keep ``weights[k]``.
* ``inverse-loss``: online and free (no extra backward). Each balanced term is divided by a bias-corrected EMA of
  its own detached value, normalized to the reference term: ``w_k = weights[k] * EMA(L_ref) / EMA(L_k)``, so every
  weighted balanced term sits at ``weights[k] / weights[ref]`` times the reference term. During the first
  ``warmup_steps`` the base weights are held (the EMA still updates). Weights are clamped to
  ``[min_weight, max_weight]``.
* ``grad-norm``: online, from gradients. Every ``grad_norm_every`` steps, ``||dL_k / d shared_param||`` is measured
  for each balanced term with ``torch.autograd.grad(..., retain_graph=True)``; weights are set so each weighted norm
  equals the reference term's, ``w_k = weights[k] * EMA(||g_ref||) / EMA(||g_k||)`` (EMA-smoothed, clamped, base
  weights during warm-up); between updates the last weights are reused. Cost: one extra partial backward per
  balanced term on update steps, from the loss down to ``shared_param`` (for the last visual MLP layer: the
  reconstruction term back through the whole decoder and bottleneck, the alignment term through the visual head
  only), and the graph is retained meanwhile. Measured on a 3.0M-parameter 64 px QLIP (ViT width 128, 4+4 layers,
  batch 16, 2 CPU threads, medians of 8 interleaved steps): an update step took 1.50x a fixed-weight step (720 vs.
  479 ms), i.e. ~5% on average with ``grad_norm_every=10``.

Only the terms in ``balanced_terms`` (default ``align`` and ``recon``) are rescaled by the online modes; the others
keep their base weights. This is deliberate: the BSQ quantizer loss is ``per_sample_entropy - codebook_entropy`` and
is often negative or near zero, so dividing by its running value is meaningless. A measured failure
(a probe on the shapes demo): weighting EVERY loss by the inverse of its running mean, without clamps or
warm-up, left the contrastive weight at ~0.3% of the reconstruction weight and collapsed the codebook to 22 distinct
codes (while per-bit entropy still looked fine). Hence the clamps, the warm-up and the restricted term set.

In the adaptive modes the base weights are multipliers on top of the balancing: with the default (fixed-mode)
``recon: 1000`` the posthoc/online modes would put another factor 1000 on reconstruction. A warning is logged in
that case; set the balanced terms' base weights to 1 to use the measured ratio alone.

Terms whose base weight is 0 are inactive: :meth:`LossBalancer.is_active` tells the trainer not to compute them,
and :meth:`LossBalancer.combine` ignores them if given. Unknown names raise.

Synchronization: ``combine`` returns python floats for logging. In ``fixed``/``posthoc`` they are constants (free).
In the online modes the weights are device tensors; converting them costs one small device-to-host copy per call.
Pass ``return_tensors=True`` to get detached 0-dim tensors instead and convert only on logging steps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

BALANCE_MODES = ("fixed", "posthoc", "inverse-loss", "grad-norm")


def _default_weights() -> dict[str, float]:
    # The paper's stage-1 default: a_a : a_r = 1 : 1000, a_q = a_z = 1 (the paper's training recipe).
    return {"align": 1.0, "recon": 1000.0, "quant": 1.0, "commit": 1.0}


@dataclass
class BalanceConfig:
    """How the stage-1 losses are weighted (see the module docstring)."""

    mode: str = "fixed"  # fixed | posthoc | inverse-loss | grad-norm
    weights: dict[str, float] = field(default_factory=_default_weights)  # base weight per term; 0 = term off
    converged: dict[str, float] | None = None  # posthoc: converged loss of each objective trained alone
    ema_decay: float = 0.99  # online modes: EMA decay of loss values / gradient norms
    warmup_steps: int = 100  # online modes: hold the base weights for this many steps
    min_weight: float = 1e-4  # online modes: clamp of each balanced weight
    max_weight: float = 1e4
    grad_norm_every: int = 10  # grad-norm: measure every N steps (each measurement is an extra backward)
    reference_term: str = "align"  # keeps its base weight; the others are scaled relative to it
    balanced_terms: tuple[str, ...] = ("align", "recon")  # online modes: the terms that are rescaled

    def __post_init__(self) -> None:
        if self.mode not in BALANCE_MODES:
            raise ValueError(f"unknown balance mode {self.mode!r}; choose one of {BALANCE_MODES}")
        for name, w in self.weights.items():
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {w}")
        if self.reference_term not in self.weights:
            raise ValueError(
                f"reference_term {self.reference_term!r} is not among the weighted terms {sorted(self.weights)}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 < self.min_weight <= self.max_weight:
            raise ValueError(f"need 0 < min_weight <= max_weight, got {self.min_weight} and {self.max_weight}")
        if self.warmup_steps < 0 or self.grad_norm_every < 1:
            raise ValueError(
                f"need warmup_steps >= 0 and grad_norm_every >= 1, got {self.warmup_steps} and {self.grad_norm_every}"
            )
        self.balanced_terms = tuple(self.balanced_terms)
        unknown = [t for t in self.balanced_terms if t not in self.weights]
        if unknown:
            raise ValueError(f"balanced_terms {unknown} have no base weight; known terms: {sorted(self.weights)}")
        if self.mode in ("inverse-loss", "grad-norm") and self.reference_term not in self.balanced_terms:
            raise ValueError(f"reference_term {self.reference_term!r} must be one of balanced_terms")
        if self.mode == "posthoc":
            if not self.converged:
                raise ValueError(
                    "posthoc balancing needs `converged` (the converged loss of each objective trained alone); "
                    "measure it with `qlip balance CONFIG` or use mode=fixed"
                )
            posthoc_weights(self.converged, self.reference_term, self.weights)  # validates the values


def posthoc_weights(
    converged: dict[str, float], reference: str = "align", base: dict[str, float] | None = None
) -> dict[str, float]:
    """The paper's post-hoc rule: weights inversely proportional to each objective's converged loss.

    ``w_k = base[k] * converged[reference] / converged[k]`` for each term in ``converged`` (so the reference keeps
    its base weight and ``w_r / w_a = L_align / L_mse`` with unit bases); terms only in ``base`` keep ``base[k]``.

    Args:
        converged: converged loss of each objective trained alone, all finite and > 0.
        reference: the term whose weight is held at its base value.
        base: base weights (multipliers); missing entries count as 1.

    Returns:
        Weight per term (union of ``base`` and ``converged``).
    """
    if reference not in converged:
        raise ValueError(f"the reference term {reference!r} needs a converged loss; got terms {sorted(converged)}")
    for name, value in converged.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"converged loss of {name!r} must be finite and > 0 to invert it, got {value}; re-run the probe "
                "longer or leave the term out of `converged` (it then keeps its base weight)"
            )
    base = dict(base or {})
    weights = dict(base)
    for name, value in converged.items():
        weights[name] = base.get(name, 1.0) * converged[reference] / value
    return weights


class LossBalancer:
    """Combines named scalar losses into one with the configured weighting; see the module docstring."""

    def __init__(self, cfg: BalanceConfig):
        self.cfg = cfg
        self.base = dict(cfg.weights)
        if cfg.mode == "posthoc":
            self.base = posthoc_weights(cfg.converged or {}, cfg.reference_term, cfg.weights)
        adaptive = list(cfg.converged or {}) if cfg.mode == "posthoc" else []
        if cfg.mode in ("inverse-loss", "grad-norm"):
            adaptive = list(cfg.balanced_terms)
        odd = {k: cfg.weights[k] for k in adaptive if k in cfg.weights and cfg.weights[k] not in (0.0, 1.0)}
        if odd:
            logger.warning(
                "balance mode %s multiplies the base weights %s by the balanced ratio; set them to 1 to use the "
                "ratio alone (the defaults are the fixed mode's 1:1000)",
                cfg.mode,
                odd,
            )
        # Online state: bias-corrected EMAs as detached fp32 tensors (no host sync in the hot path).
        self._ema: dict[str, Tensor] = {}
        self._ema_count = 0
        self._weights: dict[str, Tensor] = {}  # grad-norm: the weights of the last update

    def is_active(self, name: str) -> bool:
        """Whether term ``name`` contributes (base weight > 0); the trainer should not compute inactive terms."""
        self._check_known([name])
        return self.base.get(name, 0.0) > 0.0

    @property
    def active_terms(self) -> list[str]:
        return [k for k, w in self.base.items() if w > 0.0]

    def _check_known(self, names) -> None:
        unknown = [n for n in names if n not in self.base]
        if unknown:
            raise ValueError(
                f"unknown loss term(s) {unknown}; the balancer knows {sorted(self.base)} - add them to "
                "loss.balance.weights (weight 0 turns a term off)"
            )

    def _ema_update(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Updates the EMAs with detached fp32 values; returns the bias-corrected estimates."""
        d = self.cfg.ema_decay
        self._ema_count += 1
        for name, value in values.items():
            value = value.detach().float()
            previous = self._ema.get(name)
            previous = torch.zeros_like(value) if previous is None else previous.to(value.device)
            self._ema[name] = d * previous + (1.0 - d) * value
        correction = 1.0 - d**self._ema_count
        return {name: self._ema[name] / correction for name in values}

    def _ratio_weights(self, estimates: dict[str, Tensor]) -> dict[str, Tensor]:
        ref = estimates[self.cfg.reference_term]
        weights = {}
        for name, est in estimates.items():
            if name == self.cfg.reference_term:
                weights[name] = ref.new_tensor(self.base[name])
                continue
            # A zero/negative estimate (term not reaching shared_param, or a negative loss) cannot be inverted:
            # it is floored at a tiny value and the clamp then caps the weight at max_weight.
            w = self.base[name] * ref / est.clamp_min(1e-12)
            weights[name] = w.clamp(self.cfg.min_weight, self.cfg.max_weight)
        return weights

    def _grad_norms(self, losses: dict[str, Tensor], shared_param: Tensor) -> dict[str, Tensor]:
        norms = {}
        for name, loss in losses.items():
            (grad,) = torch.autograd.grad(loss, shared_param, retain_graph=True, allow_unused=True)
            if grad is None:
                raise ValueError(
                    f"grad-norm balancing: loss term {name!r} does not depend on shared_param; pass the last layer "
                    "shared by all balanced terms (model.visual.transformer.blocks[-1].mlp.w3.weight) or remove "
                    f"{name!r} from balanced_terms"
                )
            norms[name] = grad.detach().float().norm()
        return norms

    def combine(
        self,
        losses: dict[str, Tensor],
        *,
        step: int,
        shared_param: Tensor | None = None,
        return_tensors: bool = False,
    ) -> tuple[Tensor, dict[str, float]]:
        """Weighted sum of the active losses.

        Args:
            losses: scalar loss per term name (with their graphs). Inactive terms are ignored; absent active terms
                (e.g. the GAN term before its start step) simply do not contribute.
            step: the global optimizer step (drives warm-up and the grad-norm schedule).
            shared_param: grad-norm mode only: the last shared layer's weight.
            return_tensors: return detached 0-dim tensors instead of floats (no host sync; convert when logging).

        Returns:
            ``(total, weights)``: the fp32 scalar total and the weight used for each contributing term.
        """
        self._check_known(losses)
        present = {k: v for k, v in losses.items() if self.base[k] > 0.0}
        if not present:
            raise ValueError(f"no active loss term among {sorted(losses)}; active terms are {self.active_terms}")
        weights: dict[str, Tensor | float] = {k: self.base[k] for k in present}
        mode = self.cfg.mode
        balanced = {k: v for k, v in present.items() if k in self.cfg.balanced_terms}
        if mode in ("inverse-loss", "grad-norm") and self.cfg.reference_term not in balanced:
            raise ValueError(
                f"{mode} balancing needs the reference term {self.cfg.reference_term!r} in the losses every step, "
                f"got {sorted(losses)}"
            )
        if mode == "inverse-loss":
            estimates = self._ema_update(balanced)
            if step >= self.cfg.warmup_steps:
                weights.update(self._ratio_weights(estimates))
        elif mode == "grad-norm":
            if step % self.cfg.grad_norm_every == 0:
                if shared_param is None:
                    raise ValueError(
                        "grad-norm balancing needs shared_param= (the last shared layer's weight, e.g. "
                        "model.visual.transformer.blocks[-1].mlp.w3.weight)"
                    )
                estimates = self._ema_update(self._grad_norms(balanced, shared_param))
                self._weights = {k: w.detach() for k, w in self._ratio_weights(estimates).items()}
            if step >= self.cfg.warmup_steps and self._weights:
                weights.update({k: w.to(balanced[k].device) for k, w in self._weights.items() if k in balanced})
        total = sum(w * present[k].float() for k, w in weights.items())
        if return_tensors:
            return total, {k: torch.as_tensor(w, dtype=torch.float32).detach() for k, w in weights.items()}
        return total, self._to_floats(weights)

    @staticmethod
    def _to_floats(weights: dict[str, Tensor | float]) -> dict[str, float]:
        names = [k for k, w in weights.items() if isinstance(w, Tensor)]
        out = {k: float(w) for k, w in weights.items() if not isinstance(w, Tensor)}
        if names:
            # One host copy for all tensor weights instead of one .item() each.
            values = torch.stack([weights[k].detach().float() for k in names]).tolist()
            out.update(zip(names, values))
        return {k: out[k] for k in weights}

    def state_dict(self) -> dict:
        """Online state (EMAs, update count, last grad-norm weights) on CPU, for an exact resume."""
        return {
            "mode": self.cfg.mode,
            "ema": {k: v.detach().cpu().clone() for k, v in self._ema.items()},
            "ema_count": self._ema_count,
            "weights": {k: v.detach().cpu().clone() for k, v in self._weights.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`; tensors move to the losses' device on the next ``combine``."""
        if state.get("mode") != self.cfg.mode:
            logger.warning(
                "balancer state saved in mode %r is loaded into mode %r; its running estimates are reused",
                state.get("mode"),
                self.cfg.mode,
            )
        self._ema = {k: v.clone() for k, v in state["ema"].items()}
        self._ema_count = int(state["ema_count"])
        self._weights = {k: v.clone() for k, v in state["weights"].items()}
