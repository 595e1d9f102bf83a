"""Tests for the procedural `shapes` dataset: determinism, split disjointness, captions vs attributes, tasks."""

import hashlib
import itertools

import numpy as np
import pytest
import torch

from qlip.data import (
    SHAPES_TASKS,
    ShapesConfig,
    ShapesDataset,
    StreamTracker,
    generate_shapes_sample,
    shapes_attributes,
    shapes_tasks,
)
from qlip.data.loader import SampleCollator
from qlip.data.shapes import COLOR_RGB, POSITION_CELL, POSITION_PHRASE, SHAPE_KINDS
from qlip.transforms import image_transform

torch.set_num_threads(1)


def _digest(sample):
    return hashlib.sha256(np.asarray(sample["image"]).tobytes()).hexdigest()


def test_deterministic_from_seed_split_index():
    cfg = ShapesConfig.preset("hard")
    a = generate_shapes_sample(17, cfg, seed=3)
    b = generate_shapes_sample(17, cfg, seed=3)
    assert _digest(a) == _digest(b) and a["caption"] == b["caption"] and a["labels"] == b["labels"]
    assert _digest(generate_shapes_sample(17, cfg, seed=4)) != _digest(a)
    assert _digest(generate_shapes_sample(18, cfg, seed=3)) != _digest(a)
    # Map-style access and iteration agree.
    ds = ShapesDataset(cfg, seed=3, length=20)
    assert _digest(ds[17]) == _digest(a)
    assert [s["key"] for s in ds] == [f"shapes-train-{i:09d}" for i in range(20)]


def test_attributes_without_rendering_equal_the_sample():
    cfg = ShapesConfig.preset("hard", image_size=32)
    for split, seed, index in (("train", 0, 0), ("train", 3, 17), ("val", 1, 5), ("test", 0, 99)):
        sample = generate_shapes_sample(index, cfg, split=split, seed=seed)
        assert shapes_attributes(index, cfg, split=split, seed=seed) == sample["attributes"]["shapes"]
    with pytest.raises(ValueError, match="unknown split"):
        shapes_attributes(0, cfg, split="dev")


def test_splits_never_overlap():
    cfg = ShapesConfig.preset("easy", image_size=32)
    digests = {split: {_digest(generate_shapes_sample(i, cfg, split=split)) for i in range(150)}
               for split in ("train", "val", "test")}  # fmt: skip
    assert all(len(d) == 150 for d in digests.values())
    for a, b in itertools.combinations(digests.values(), 2):
        assert not a & b


@pytest.mark.parametrize("preset,mode", [("easy", "full"), ("default", "full"), ("hard", "full"), ("hard", "varied")])
def test_captions_agree_with_attributes(preset, mode):
    cfg = ShapesConfig.preset(preset, caption_mode=mode)
    all_colors, all_shapes = set(COLOR_RGB), set(SHAPE_KINDS)
    for i in range(60):
        s = generate_shapes_sample(i, cfg)
        caption, shapes = s["caption"], s["attributes"]["shapes"]
        words = set(caption.replace(",", " ").replace(".", " ").replace(":", " ").split())
        # No attribute word that the image does not have.
        assert words & all_colors <= {x["color"] for x in shapes}, caption
        assert words & all_shapes <= {x["shape"] for x in shapes}, caption
        if cfg.caption_mode == "full":
            for x in shapes:
                assert {x["color"], x["shape"], x["size"]} <= words, caption
                assert POSITION_PHRASE[x["position"]] in caption, caption
                if len(shapes) > 1:  # each shape described as one phrase, so attributes cannot be mixed up
                    assert f"{x['size']} {x['color']} {x['shape']} {POSITION_PHRASE[x['position']]}" in caption
        if len(shapes) > 1:
            assert caption.startswith(("two shapes", "three shapes"))
        # Labels index the config's class lists and describe the first shape.
        first = shapes[0]
        assert cfg.shapes[s["labels"]["shape"]] == first["shape"] == cfg.shapes[s["label"]]
        assert cfg.colors[s["labels"]["color"]] == first["color"]
        assert cfg.positions[s["labels"]["position"]] == first["position"]
        assert cfg.sizes[s["labels"]["size"]] == first["size"]
        names = shapes_tasks(cfg)["color_shape"].classnames
        assert names[s["labels"]["color_shape"]] == f"{first['color']} {first['shape']}"


def test_pixels_show_the_shape_color_and_position():
    cfg = ShapesConfig.preset("easy", image_size=64, sizes=("large",), color_jitter=0)
    for i in range(20):
        s = generate_shapes_sample(i, cfg)
        shape = s["attributes"]["shapes"][0]
        img = np.asarray(s["image"]).astype(int)
        cx, cy = (int(v * 64) for v in shape["center"])
        center_pixel = img[cy, cx]
        if shape["shape"] != "ring":
            assert np.abs(center_pixel - np.array(COLOR_RGB[shape["color"]])).max() <= 2, shape
        # The shape lies in its grid cell: the colored pixels' centroid is in the right third.
        mask = np.abs(img - np.array(COLOR_RGB[shape["color"]])).max(axis=-1) <= 2
        ys, xs = np.nonzero(mask)
        col, row = int(xs.mean() * 3 // 64), int(ys.mean() * 3 // 64)
        assert (col, row) == POSITION_CELL[shape["position"]]


def test_config_ranges_and_presets():
    for size in (32, 256):
        assert generate_shapes_sample(0, ShapesConfig(image_size=size))["image"].size == (size, size)
    with pytest.raises(ValueError, match="image_size"):
        ShapesConfig(image_size=16)
    with pytest.raises(ValueError, match="colors"):
        ShapesConfig(colors=("red", "chartreuse"))
    with pytest.raises(ValueError, match="preset"):
        ShapesConfig.preset("impossible")
    easy = ShapesConfig.preset("easy")
    assert easy.max_shapes == 1 and easy.caption_mode == "full" and easy.backgrounds == ("solid",)
    assert len(SHAPE_KINDS) >= 8 and len(COLOR_RGB) >= 8 and len(POSITION_PHRASE) == 9


def test_zero_shot_tasks_cover_labels():
    assert {"shape", "color", "position", "size", "color_shape"} <= set(SHAPES_TASKS)
    for name, task in SHAPES_TASKS.items():
        assert task.label_key == name and len(set(task.classnames)) == len(task.classnames)
        assert all("{}" in t for t in task.templates)
    hard = shapes_tasks(ShapesConfig.preset("hard"))
    assert hard["count"].classnames == ("one", "two", "three")
    assert len(hard["size"].classnames) == 3


def test_endless_iteration_split_and_resume():
    ds = ShapesDataset(ShapesConfig.preset("easy", image_size=32), rank=1, world_size=2)
    it = iter(ds)
    first = [next(it)["key"] for _ in range(5)]
    assert first == [f"shapes-train-{i:09d}" for i in (1, 3, 5, 7, 9)]
    collate = SampleCollator(image_transform(32), tokenizer=lambda caps: torch.zeros(len(caps), 77, dtype=torch.long))
    tracker = StreamTracker()
    it = iter(ds)
    batch = collate([next(it) for _ in range(3)])
    tracker.update(batch)
    assert batch["image"].shape == (3, 3, 32, 32) and batch["text"].shape == (3, 77)
    assert set(batch["labels"]) >= {"shape", "color", "position", "size"}
    resumed = ShapesDataset(ShapesConfig.preset("easy", image_size=32), rank=1, world_size=2)
    resumed.load_state_dict(tracker.state_dict())
    assert next(iter(resumed))["key"] == "shapes-train-000000007"
