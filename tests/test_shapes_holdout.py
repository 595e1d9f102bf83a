"""Held-out (shape, color, position) triples of the `shapes` data: opt-in, stable, never in the train split."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from qlip.data import ShapesConfig, ShapesDataset, generate_shapes_sample, held_out_combinations, shapes_attributes
from qlip.data.shapes import POSITION_PHRASE, split_triples

DEMO = dict(sizes=("large",))  # the tokenizer demo's shapes (configs/shapes-tiny.yaml)


def _triples(config, split, n, seed=0):
    return [(s["shape"], s["color"], s["position"]) for i in range(n)
            for s in shapes_attributes(i, config, split=split, seed=seed)]  # fmt: skip


def test_default_presets_are_byte_identical_to_before_the_option():
    # Digest of images and captions of every preset and split, recorded before held-out triples existed.
    h = hashlib.sha256()
    for name in ("easy", "default", "hard"):
        cfg = ShapesConfig.preset(name)
        for split in ("train", "val", "test"):
            for i in range(0, 200, 7):
                s = generate_shapes_sample(i, cfg, split=split, seed=1)
                h.update(np.asarray(s["image"]).tobytes())
                h.update(s["caption"].encode())
    assert h.hexdigest() == "bd7c8df0132b1bc1bcacf144e7d6d0207de09957dc5e8d2b5213e1052d871c96"
    assert held_out_combinations(ShapesConfig()) == ()


@pytest.mark.parametrize("preset", ["easy", "hard"])
def test_the_train_split_never_draws_nor_captions_a_held_out_triple(preset):
    cfg = ShapesConfig.preset(preset, holdout_combinations=0.1)
    held = set(held_out_combinations(cfg))
    n_triples = len(cfg.shapes) * len(cfg.colors) * len(cfg.positions)
    assert len(held) == round(0.1 * n_triples)
    for seed in (0, 1):
        seen = _triples(cfg, "train", 6000, seed)
        assert not held & set(seen)
        # Every other triple still comes up: the restriction removes only the held-out ones.
        assert len(set(seen)) > 0.95 * (n_triples - len(held))
    named = 0
    for i in range(400):  # captions state what is drawn, so no (one-shape) caption names a held-out triple either
        sample = generate_shapes_sample(i, cfg)
        if len(sample["attributes"]["shapes"]) > 1:
            continue
        words = set(sample["caption"].rstrip(".").replace(",", "").split())
        named += {cfg.shapes[sample["labels"]["shape"]], cfg.colors[sample["labels"]["color"]]} <= words
        assert not any({s, c} <= words and POSITION_PHRASE[p] in sample["caption"] for s, c, p in held)
    assert named > 100


def test_held_out_set_is_stable_across_processes_seeds_and_list_order():
    cfg = ShapesConfig.preset("easy", **DEMO, holdout_combinations=0.1)
    held = held_out_combinations(cfg)
    code = ("from qlip.data import ShapesConfig, held_out_combinations; "
            "print(held_out_combinations(ShapesConfig.preset('easy', sizes=('large',), holdout_combinations=0.1)))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == str(held)
    shuffled = ShapesConfig.preset("easy", **DEMO, holdout_combinations=0.1, colors=tuple(reversed(cfg.colors)))
    assert set(held_out_combinations(shuffled)) == set(held)
    # The seed changes the samples, not which triples are held out: no seed enters the choice.
    assert not set(_triples(cfg, "train", 2000, seed=7)) & set(held)


def test_each_attribute_of_a_held_out_triple_is_trained_in_other_combinations():
    for share in (0.1, 0.5):
        cfg = ShapesConfig.preset("easy", holdout_combinations=share)
        held = set(held_out_combinations(cfg))
        train = set(split_triples(cfg, "train"))
        assert train and not train & held
        for shape, color, position in held:
            assert any(t[0] == shape for t in train)
            assert any(t[1] == color for t in train)
            assert any(t[2] == position for t in train)
    with pytest.raises(ValueError, match="keeps a training triple"):
        ShapesConfig(shapes=("circle", "square"), colors=("red",), positions=("top",), holdout_combinations=0.5)


def test_eval_splits_restricted_to_held_out_or_seen_or_left_alone():
    base = ShapesConfig.preset("easy", **DEMO)
    held = set(held_out_combinations(ShapesConfig.preset("easy", **DEMO, holdout_combinations=0.1)))
    composition = ShapesConfig.preset("easy", **DEMO, holdout_combinations=0.1, eval_combinations="held_out")
    for split in ("val", "test"):
        drawn = _triples(composition, split, 2000)
        assert set(drawn) == held  # only held-out triples, and all of them come up
    seen = ShapesConfig.preset("easy", **DEMO, holdout_combinations=0.1, eval_combinations="seen")
    assert not set(_triples(seen, "val", 1000)) & held
    # "all": the val/test samples are those of the config without holdout.
    plain = ShapesConfig.preset("easy", **DEMO, holdout_combinations=0.1)
    for i in range(20):
        a, b = generate_shapes_sample(i, plain, split="val"), generate_shapes_sample(i, base, split="val")
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) and a["caption"] == b["caption"]
    # The dataset (and the labels it carries) go through the same restriction.
    ds = ShapesDataset(composition, split="test", length=50)
    for sample in ds:
        s = sample["attributes"]["shapes"][0]
        assert (s["shape"], s["color"], s["position"]) in held
        assert composition.shapes[sample["labels"]["shape"]] == s["shape"]


def test_holdout_options_are_checked():
    with pytest.raises(ValueError, match="holdout_combinations"):
        ShapesConfig(holdout_combinations=0.9)
    with pytest.raises(ValueError, match="eval_combinations"):
        ShapesConfig(holdout_combinations=0.1, eval_combinations="unseen")
    with pytest.raises(ValueError, match="needs held-out triples"):
        ShapesConfig(eval_combinations="held_out")
