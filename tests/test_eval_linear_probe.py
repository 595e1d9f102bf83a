"""Linear probe: near-perfect on separable features, chance on random labels, L2 picked on held-out data."""

from __future__ import annotations

import pytest
import torch

from qlip.eval.linear_probe import extract_features, fit_logistic_regression, linear_probe

torch.set_num_threads(1)


def _clusters(n: int, num_classes: int, dim: int, seed: int, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.randint(0, num_classes, (n,), generator=g)
    return centers[y] + spread * torch.randn(n, dim, generator=g) + 10.0, y  # offset: standardization must cope


def test_separable_features_reach_full_accuracy():
    x_tr, y_tr = _clusters(300, 6, 16, seed=0)
    x_te, y_te = _clusters(200, 6, 16, seed=1)
    out = linear_probe(x_tr, y_tr, x_te, y_te, l2_grid=(1e-4, 1e-2, 1.0, 100.0))
    assert out["top1"] >= 0.99
    assert out["top5"] == 1.0
    assert out["l2"] in (1e-4, 1e-2, 1.0)  # 100 underfits: the held-out split must reject it
    assert out["val_top1"]["100"] < out["val_top1"][f"{out['l2']:g}"]
    assert (out["n_train"], out["n_test"], out["num_classes"], out["feature_dim"]) == (300, 200, 6, 16)


def test_random_labels_give_chance():
    g = torch.Generator().manual_seed(0)
    x_tr, y_tr = torch.randn(300, 32, generator=g), torch.randint(0, 4, (300,), generator=g)
    x_te, y_te = torch.randn(1000, 32, generator=g), torch.randint(0, 4, (1000,), generator=g)
    out = linear_probe(x_tr, y_tr, x_te, y_te)
    assert abs(out["top1"] - 0.25) < 0.06, out
    assert "top5" not in out


def test_l2_shrinks_weights_and_the_fit_is_deterministic():
    x, y = _clusters(120, 3, 8, seed=2)
    weak = fit_logistic_regression(x, y, 3, 1e-4)
    strong = fit_logistic_regression(x, y, 3, 1.0)
    assert strong.weight.norm() < weak.weight.norm()
    again = fit_logistic_regression(x, y, 3, 1e-4)
    torch.testing.assert_close(again.weight, weak.weight)
    assert (weak.logits(x).argmax(dim=1) == y).float().mean() == 1.0
    with pytest.raises(ValueError, match="l2 strength"):
        fit_logistic_regression(x, y, 3, -1.0)


@pytest.mark.parametrize("kind, dim", [("cls", 32), ("patch-mean", 32), ("codes", 16 * 8)])
def test_feature_kinds_on_the_tiny_model(kind, dim):
    import qlip

    model = qlip.create_model("qlip-tiny", parts=("vision", "quantizer"))
    images = torch.randn(5, 3, 32, 32)
    batch = {"image": images, "label": torch.arange(5)}
    x, y = extract_features(model, [batch, {"image": images[:0], "label": torch.zeros(0)}], kind)
    assert x.shape == (5, dim) and y.tolist() == [0, 1, 2, 3, 4]
    if kind == "cls":  # the CLS token after post_norm, i.e. the input of the visual projection
        with torch.no_grad():
            torch.testing.assert_close(model.visual.proj(x), model.encode_image(images))
    if kind == "codes":
        torch.testing.assert_close(x.abs(), torch.full_like(x, 8**-0.5))
    with pytest.raises(ValueError, match="unknown feature kind"):
        extract_features(model, [batch], "pooled")
