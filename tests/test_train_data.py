"""Trainer data: hard-negative grouped shapes batches (exact resume) and the `qlip balance` probe fragment."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import yaml

from qlip.data import StreamTracker
from qlip.data.shapes import ShapesConfig
from qlip.train.config import ConfigError, load_config
from qlip.train.grouped import GroupedShapesDataset
from train_helpers import write_config

torch.set_num_threads(1)


def _grouped(**kw):
    return GroupedShapesDataset(ShapesConfig.preset("easy", image_size=32), seed=3, batch_size=16,
                                group_by=["color", "position"], group_size=4, grouped_fraction=0.5, rank=0,
                                world_size=1, **kw)  # fmt: skip


def test_grouped_batches_share_attributes_and_use_every_index_once():
    ds = _grouped()
    it = ds.batch_indices(0, 1)
    batches = [next(it) for _ in range(30)]
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 30 * 16  # no sample repeated
    for b in batches:
        assert len(b) == 16
        for g in range(2):  # two groups of 4 sharing color and position, then the ordinary rest
            keys = {ds._key(i) for i in b[4 * g : 4 * g + 4]}
            assert len(keys) == 1
    # the attributes drawn without rendering are the rendered sample's
    for i in flat[:20]:
        first = ds.source[i]["attributes"]["shapes"][0]
        assert ds._key(i) == (first["color"], first["position"])
    assert max(Counter(ds._key(i) for i in batches[5]).values()) >= 4


def test_grouped_stream_resumes_exactly():
    straight = [s["key"] for s, _ in zip(_grouped(), range(16 * 5))]
    first = _grouped()
    tracker = StreamTracker()
    consumed = []
    for s, _ in zip(first, range(16 * 2)):
        consumed.append(s["key"])
        tracker.update({"position": {s["position"][0]: s["position"][1:]}})
    resumed = _grouped()
    resumed.load_state_dict(tracker.state_dict())
    rest = [s["key"] for s, _ in zip(resumed, range(16 * 3))]
    assert consumed + rest == straight


def test_group_by_validation():
    with pytest.raises(ConfigError, match="group_by"):
        load_config(None, ["data.shapes_training.group_by=[texture]"])


def test_balance_probe_writes_a_usable_posthoc_fragment(tmp_path):
    from qlip.train.probe import run_balance_probes

    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "run", probe={"steps": 4, "tail_fraction": 0.5}))
    result = run_balance_probes(cfg)
    assert set(result.converged) == {"align", "recon"} and all(v > 0 for v in result.converged.values())
    expected = result.converged["align"] / result.converged["recon"]
    assert result.weights["recon"] == pytest.approx(expected) and result.weights["align"] == 1.0
    frag = yaml.safe_load(result.fragment.read_text())
    assert frag["loss"]["balance"]["mode"] == "posthoc"
    merged = load_config([tmp_path / "c.yaml", result.fragment])
    assert merged.loss.balance["converged"] == result.converged
    assert (tmp_path / "run" / "probe-align" / "metrics.jsonl").is_file()
