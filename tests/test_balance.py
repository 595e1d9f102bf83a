"""Loss balancing: fixed, posthoc, inverse-loss and grad-norm weights, clamps, warm-up, resume."""

from __future__ import annotations

import math

import pytest
import torch

from qlip.losses.balance import BalanceConfig, LossBalancer, posthoc_weights

torch.set_num_threads(1)

UNIT = {"align": 1.0, "recon": 1.0, "quant": 1.0, "commit": 1.0}


def _toy_losses(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Four terms depending on one shared parameter, at very different scales (like align vs. MSE)."""
    return {
        "align": (p[0] - 1.0) ** 2 + 3.0,
        "recon": 1e-3 * ((p[1] + 2.0) ** 2 + 0.01),
        "quant": -0.1 * p.pow(2).sum(),  # negative, like the BSQ entropy loss
        "commit": 0.5 * p.pow(2).mean(),
    }


@pytest.mark.parametrize("mode", ["fixed", "posthoc", "inverse-loss", "grad-norm"])
def test_every_mode_returns_finite_weights_and_a_matching_total(mode):
    cfg = BalanceConfig(
        mode=mode,
        weights=dict(UNIT) if mode != "fixed" else BalanceConfig().weights,
        converged={"align": 3.0, "recon": 1e-5} if mode == "posthoc" else None,
        warmup_steps=2,
        grad_norm_every=2,
    )
    balancer = LossBalancer(cfg)
    p = torch.tensor([0.3, -0.4, 0.2], requires_grad=True)
    for step in range(5):
        losses = _toy_losses(p)
        total, weights = balancer.combine(losses, step=step, shared_param=p)
        assert set(weights) == set(losses)
        assert all(isinstance(w, float) and math.isfinite(w) and w > 0 for w in weights.values())
        want = sum(weights[k] * losses[k].item() for k in losses)
        assert total.item() == pytest.approx(want, rel=1e-5)
        total.backward()
        p.grad = None
    if mode == "fixed":
        assert weights == {"align": 1.0, "recon": 1000.0, "quant": 1.0, "commit": 1.0}  # the paper's 1:1000


def test_posthoc_recovers_the_known_ratio_from_single_objective_runs():
    # Two objectives of known scale: each trained alone converges to its floor, 0.5 and 0.0005.
    objectives = {
        "align": lambda x: (x - 1.0) ** 2 + 0.5,
        "recon": lambda x: 1e-3 * ((x + 2.0) ** 2 + 0.5),
    }
    converged = {}
    for name, fn in objectives.items():  # the short single-objective probe runs of `qlip balance`
        x = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([x], lr=0.1)
        for _ in range(300):
            opt.zero_grad()
            fn(x).backward()
            opt.step()
        converged[name] = fn(x).item()
    assert converged["align"] == pytest.approx(0.5, rel=1e-3)
    weights = posthoc_weights(converged, reference="align")
    assert weights["align"] == 1.0
    assert weights["recon"] == pytest.approx(1000.0, rel=1e-2)  # a_r / a_a = L_align / L_mse
    # through the balancer, with base weights multiplying and untouched terms kept
    balancer = LossBalancer(BalanceConfig(mode="posthoc", weights=dict(UNIT, quant=2.0), converged=converged))
    ones = {k: torch.tensor(1.0) for k in ("align", "recon", "quant")}
    _, w = balancer.combine(ones, step=0)
    assert w["recon"] == pytest.approx(1000.0, rel=1e-2) and w["align"] == 1.0 and w["quant"] == 2.0


def test_posthoc_rejects_unusable_converged_values():
    with pytest.raises(ValueError, match="needs `converged`"):
        BalanceConfig(mode="posthoc")
    with pytest.raises(ValueError, match="finite and > 0"):
        BalanceConfig(mode="posthoc", converged={"align": 3.0, "recon": 0.0})
    with pytest.raises(ValueError, match="reference term"):
        posthoc_weights({"recon": 0.1}, reference="align")


def test_inverse_loss_equalizes_weighted_terms_after_warmup_and_holds_base_weights_before():
    cfg = BalanceConfig(mode="inverse-loss", weights=dict(UNIT), warmup_steps=3, ema_decay=0.9)
    balancer = LossBalancer(cfg)
    losses = {"align": torch.tensor(5.0), "recon": torch.tensor(0.005), "quant": torch.tensor(-0.2)}
    for step in range(6):
        _, w = balancer.combine(losses, step=step)
        if step < 3:
            assert w == {"align": 1.0, "recon": 1.0, "quant": 1.0}
        else:
            # bias-corrected EMA of a constant is the constant: weighted align == weighted recon
            assert w["align"] * 5.0 == pytest.approx(w["recon"] * 0.005, rel=1e-5)
            assert w["recon"] == pytest.approx(1000.0, rel=1e-5)
            assert w["quant"] == 1.0  # not a balanced term: a negative loss cannot be inverted


def test_inverse_loss_respects_the_clamps():
    cfg = BalanceConfig(mode="inverse-loss", weights=dict(UNIT), warmup_steps=0, min_weight=0.01, max_weight=50.0)
    balancer = LossBalancer(cfg)
    _, w = balancer.combine({"align": torch.tensor(5.0), "recon": torch.tensor(1e-6)}, step=0)
    assert w["recon"] == pytest.approx(50.0)
    balancer = LossBalancer(cfg)
    _, w = balancer.combine({"align": torch.tensor(1e-3), "recon": torch.tensor(1e3)}, step=0)
    assert w["recon"] == pytest.approx(0.01)


def test_grad_norm_equalizes_gradient_norms_at_the_shared_parameter():
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 4)  # the "last shared layer"
    head_a, head_r = torch.randn(4, 4), torch.randn(4, 4)
    x = torch.randn(8, 4)
    cfg = BalanceConfig(mode="grad-norm", weights=dict(UNIT), warmup_steps=0, grad_norm_every=3)
    balancer = LossBalancer(cfg)

    def losses(scale_r: float = 1.0):
        h = shared(x)
        return {"align": (h @ head_a).logsumexp(-1).mean(), "recon": scale_r * 1e-3 * (h @ head_r).pow(2).mean()}

    terms = losses()
    _, w = balancer.combine(terms, step=0, shared_param=shared.weight)
    g = {k: torch.autograd.grad(v, shared.weight, retain_graph=True)[0].norm().item() for k, v in terms.items()}
    assert g["recon"] * 100 < g["align"]  # the raw norms differ by orders of magnitude
    assert w["align"] * g["align"] == pytest.approx(w["recon"] * g["recon"], rel=1e-4)
    # between updates the last weights are reused even if the gradients change; the next update moves them
    _, w1 = balancer.combine(losses(scale_r=10.0), step=1, shared_param=shared.weight)
    assert w1 == w
    _, w3 = balancer.combine(losses(scale_r=10.0), step=3, shared_param=shared.weight)
    assert w3["recon"] < w["recon"]
    with pytest.raises(ValueError, match="shared_param"):
        balancer.combine(losses(), step=6)


def test_grad_norm_names_a_term_that_misses_the_shared_parameter():
    p = torch.ones(2, requires_grad=True)
    balancer = LossBalancer(BalanceConfig(mode="grad-norm", weights=dict(UNIT), warmup_steps=0))
    with pytest.raises(ValueError, match="'recon' does not depend"):
        balancer.combine({"align": p.sum(), "recon": torch.ones((), requires_grad=True)}, step=0, shared_param=p)


def test_zero_weight_terms_are_skipped_and_unknown_terms_rejected():
    balancer = LossBalancer(BalanceConfig(weights={"align": 1.0, "recon": 10.0, "gan": 0.0}))
    assert balancer.is_active("recon") and not balancer.is_active("gan")
    assert balancer.active_terms == ["align", "recon"]
    total, w = balancer.combine(
        {"align": torch.tensor(2.0), "recon": torch.tensor(0.5), "gan": torch.tensor(float("nan"))}, step=0
    )
    assert total.item() == pytest.approx(7.0) and "gan" not in w  # the NaN of an inactive term never enters
    total, w = balancer.combine({"align": torch.tensor(2.0)}, step=0)  # an absent active term just does not add
    assert total.item() == 2.0 and w == {"align": 1.0}
    with pytest.raises(ValueError, match="unknown loss term.*'lpips'"):
        balancer.combine({"align": torch.tensor(1.0), "lpips": torch.tensor(1.0)}, step=0)
    with pytest.raises(ValueError, match="unknown loss term"):
        balancer.is_active("percep")


def test_config_validation_messages():
    with pytest.raises(ValueError, match="unknown balance mode"):
        BalanceConfig(mode="gradnorm")
    with pytest.raises(ValueError, match="finite number >= 0"):
        BalanceConfig(weights={"align": -1.0})
    with pytest.raises(ValueError, match="reference_term"):
        BalanceConfig(weights={"recon": 1.0})
    with pytest.raises(ValueError, match="min_weight"):
        BalanceConfig(min_weight=10.0, max_weight=1.0)
    with pytest.raises(ValueError, match="balanced_terms"):
        BalanceConfig(mode="inverse-loss", balanced_terms=("align", "lpips"))


def test_adaptive_modes_warn_about_non_unit_base_weights(caplog):
    with caplog.at_level("WARNING", logger="qlip.losses.balance"):
        LossBalancer(BalanceConfig(mode="inverse-loss"))  # default weights carry recon: 1000
    assert "recon" in caplog.text and "set them to 1" in caplog.text


@pytest.mark.parametrize("mode", ["inverse-loss", "grad-norm"])
def test_state_dict_round_trip_resumes_exactly(mode):
    cfg = BalanceConfig(mode=mode, weights=dict(UNIT), warmup_steps=2, grad_norm_every=2, ema_decay=0.8)
    p = torch.tensor([0.3, -0.4, 0.2], requires_grad=True)

    def run(balancer, steps):
        out = []
        for step in steps:
            with torch.no_grad():
                p.add_(0.05)  # the losses change from step to step
            losses = {k: v for k, v in _toy_losses(p).items() if k in ("align", "recon")}
            out.append(balancer.combine(losses, step=step, shared_param=p)[1])
        return out

    with torch.no_grad():
        start = p.clone()
    straight = run(LossBalancer(cfg), range(8))
    with torch.no_grad():
        p.copy_(start)
    first = LossBalancer(cfg)
    run(first, range(5))
    resumed = LossBalancer(cfg)
    resumed.load_state_dict(first.state_dict())
    assert run(resumed, range(5, 8)) == straight[5:]


def test_return_tensors_gives_detached_tensors():
    balancer = LossBalancer(BalanceConfig(mode="inverse-loss", weights=dict(UNIT), warmup_steps=0))
    x = torch.tensor(2.0, requires_grad=True)
    total, w = balancer.combine({"align": x * 3, "recon": x * 0.01}, step=0, return_tensors=True)
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in w.values())
    total.backward()
    # weights are constants: d total / dx = w_a * 3 + w_r * 0.01
    assert x.grad.item() == pytest.approx(w["align"].item() * 3 + w["recon"].item() * 0.01, rel=1e-5)
