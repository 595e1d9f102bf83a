"""Pictures render to real PNG files; metrics.jsonl parsing finds loss terms and balancing weights."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from qlip.eval import plots


def _png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_reconstruction_grid_bit_usage_and_confusion(tmp_path):
    g = torch.Generator().manual_seed(0)
    orig = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=g)
    w, h = _png(plots.plot_reconstruction_grid(orig, orig.flip(0), tmp_path / "grid.png", columns=4))
    assert w > 100 and h > 100
    _png(plots.plot_bit_usage([0.5, 0.1, 0.9, 0.5], [1.0, 0.47, 0.47, 1.0], tmp_path / "bits.png"))
    _png(plots.plot_confusion_matrix([[3, 1], [0, 4]], ["cat", "dog"], tmp_path / "sub" / "cm.png"))
    with pytest.raises(ValueError, match="does not match"):
        plots.plot_confusion_matrix([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="differ"):
        plots.plot_reconstruction_grid(orig, orig[:2], tmp_path / "x.png")


def test_loss_curves_from_a_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        json.dumps({"step": s, "loss": 2.0 / (s + 1), "loss/mse": 0.1, "loss/align": 1.5, "weights": {"rec": 1000.0},
                    "alpha_align": 1.0, "lr": 1e-3, "optim/weight_decay": 0.05})
        for s in range(0, 50, 10)
    ]
    lines.insert(2, '{"step": 15, "loss": ')  # a line cut short by a killed run
    # the trainer's own record layout: kind, time, loss/<term>, w/<term>; eval records are left out
    lines.append(json.dumps({"step": 50, "kind": "train", "time": 1.7e9, "loss/mse": 0.05, "w/align": 0.001}))
    lines.append(json.dumps({"step": 50, "kind": "eval", "time": 1.7e9, "loss/mse": 9.0}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    series = plots.read_metrics_jsonl(run / "metrics.jsonl")
    assert series["loss/mse"] == ([0.0, 10.0, 20.0, 30.0, 40.0, 50.0], [0.1] * 5 + [0.05])
    losses = sorted(k for k in series if plots.is_loss_key(k))
    weights = sorted(k for k in series if plots.is_weight_key(k))
    assert losses == ["loss", "loss/align", "loss/mse"]
    assert weights == ["alpha_align", "w/align", "weights/rec"]  # lr, weight decay and time are none of them
    _png(plots.plot_loss_curves(run, tmp_path / "curves.png"))
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.plot_loss_curves(tmp_path / "empty", tmp_path / "c.png")
