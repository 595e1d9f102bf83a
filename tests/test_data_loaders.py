"""Tests for the class-folder and caption-list sources, the bad-data policy, and the collate/DataLoader path."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from qlip.data import (
    BadDataError,
    BadSampleCounter,
    CaptionFileDataset,
    ImageFolderDataset,
    build_dataloader,
    build_dataset,
    describe_source,
    is_bad,
    iter_samples,
)
from qlip.transforms import image_transform

torch.set_num_threads(1)


def fake_tokenizer(captions):
    return torch.tensor([[len(c)] * 77 for c in captions], dtype=torch.long)


def _small(arr, size=48):
    return Image.fromarray(arr).resize((size, size))


def _write_images(folder):
    """Good images of several modes and formats, plus one of each bad kind; returns {name: expected reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    _small(skdata.astronaut()).save(folder / "astronaut.jpg")
    _small(skdata.coffee()).save(folder / "coffee.webp")
    _small(skdata.camera()).save(folder / "camera_gray.png")  # mode L
    Image.fromarray(skdata.logo()).resize((48, 48)).save(folder / "logo_rgba.png")  # mode RGBA
    (Image.fromarray(skdata.camera()).resize((48, 48)).convert("I;16")).save(folder / "camera16.png")
    _small(skdata.chelsea()).convert("P").save(folder / "chelsea_palette.png")
    _small(skdata.chelsea()).convert("CMYK").save(folder / "chelsea_cmyk.jpg")
    good_jpeg = (folder / "astronaut.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 3])
    (folder / "zero.png").write_bytes(b"")
    (folder / "unknown.png").write_bytes(b"definitely not an image" * 4)
    _small(skdata.coffee(), 4).save(folder / "tiny.png")
    Image.new("L", (1200, 1200)).save(folder / "bomb.png")
    return {"truncated.jpg": "corrupt", "zero.png": "empty", "unknown.png": "unknown_format", "tiny.png": "too_small",
            "bomb.png": "decompression_bomb"}  # fmt: skip


def test_image_folder_labels_and_bad_files(tmp_path, caplog):
    root = tmp_path / "folder"
    bad = _write_images(root / "cats")
    (root / "rockets").mkdir()
    _small(skdata.rocket()).save(root / "rockets" / "rocket.png")
    (root / "rockets" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(root, caption_template="a photo of a {}.", min_size=8, max_pixels=1_000_000)
    assert ds.classnames == ["cats", "rockets"]
    assert len(ds) == 7 + len(bad) + 1
    counter = BadSampleCounter(max_bad_fraction=1.0, name="folder")
    with caplog.at_level(logging.WARNING):
        items = list(iter_samples(ds))
        for item in items:
            counter.record(item)
    good = [s for s in items if not is_bad(s)]
    reasons = {s["key"].split("/")[-1]: s["bad"] for s in items if is_bad(s)}
    assert reasons == bad
    assert all(s["image"].mode == "RGB" for s in good) and len(good) == 8
    assert {s["label"] for s in good if s["key"].startswith("rockets")} == {1}
    assert next(s for s in good if s["key"].startswith("rockets"))["caption"] == "a photo of a rockets."
    assert counter.counts == {r: 1 for r in bad.values()} and counter.total == 5 and counter.seen == 13
    # Logged once per reason, with the file named.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipping" in r.getMessage()]
    assert len(warnings) == 5 and any("truncated.jpg" in w for w in warnings)
    assert "tiny.png" in counter.summary() or "too_small=1" in counter.summary()


def test_caption_files_csv_tsv_jsonl_with_bad_rows(tmp_path):
    images = tmp_path / "imgs"
    _write_images(images)
    rows = [
        ("imgs/astronaut.jpg", "an astronaut"),
        ("imgs/camera_gray.png", "a man with a camera"),
        (str(images / "logo_rgba.png"), "a logo"),  # absolute path
        ("imgs/coffee.webp", ""),  # missing caption
        ("imgs/does_not_exist.jpg", "a ghost"),  # missing file
        ("imgs/truncated.jpg", "half a picture"),
        ("imgs/zero.png", "nothing"),
    ]
    expected_bad = {"missing_caption": 1, "missing_file": 1, "corrupt": 1, "empty": 1, "non_utf8_caption": 1}
    csv_text = "filepath,caption\n" + "".join(f'{p},"{c}"\n' for p, c in rows)
    (tmp_path / "pairs.csv").write_bytes(csv_text.encode() + b'imgs/chelsea_palette.png,"caf\xe9 cat"\n')
    tsv_text = "image\ttext\n" + "".join(f"{p}\t{c}\n" for p, c in rows)
    (tmp_path / "pairs.tsv").write_bytes(tsv_text.encode() + b"imgs/chelsea_palette.png\tcaf\xe9 cat\n")
    jsonl = "".join(json.dumps({"img": p, "desc": c, "y": i}) + "\n" for i, (p, c) in enumerate(rows))
    (tmp_path / "pairs.jsonl").write_bytes(jsonl.encode() + b'{"img": "imgs/chelsea_palette.png", "desc": "caf\xe9"}\n')
    for name, options in [("pairs.csv", {}), ("pairs.tsv", {}), ("pairs.jsonl", {"image_key": "img",
                                                                                   "caption_key": "desc"})]:
        ds = build_dataset(str(tmp_path / name), **options)
        assert isinstance(ds, CaptionFileDataset) and len(ds) == 8
        counter = BadSampleCounter(max_bad_fraction=1.0)
        items = list(iter_samples(ds))
        for item in items:
            counter.record(item)
        assert counter.counts == expected_bad, name
        good = [s for s in items if not is_bad(s)]
        assert [s["caption"] for s in good] == ["an astronaut", "a man with a camera", "a logo"]
        assert all(s["image"].mode == "RGB" for s in good)
    with pytest.raises(ValueError, match="image column"):
        CaptionFileDataset(tmp_path / "pairs.jsonl")
    labelled = CaptionFileDataset(tmp_path / "pairs.jsonl", image_key="img", caption_key="desc", label_key="y")
    assert labelled[1]["label"] == 1


def test_max_bad_fraction_stops_with_clear_error():
    counter = BadSampleCounter(max_bad_fraction=0.25, min_samples=8, name="web")
    for _ in range(3):
        counter.bad("corrupt", "x.jpg")
    counter.good(4)  # 3/7 bad, but fewer than min_samples: no verdict yet
    with pytest.raises(BadDataError, match=r"web: 4 of 8 samples \(50%\) are bad.*qlip data check"):
        counter.bad("empty", "y.png")
    state = counter.state_dict()
    restored = BadSampleCounter()
    restored.load_state_dict(state)
    assert restored.counts == {"corrupt": 3, "empty": 1} and restored.seen == 8


def test_dataloader_drops_bad_and_reports_counts(tmp_path):
    root = tmp_path / "folder"
    bad = _write_images(root / "a")
    (root / "b").mkdir()
    _small(skdata.rocket()).save(root / "b" / "rocket.png")
    ds = ImageFolderDataset(root, caption_template="{}", min_size=8, max_pixels=1_000_000)
    loader = build_dataloader(ds, batch_size=4, transform=image_transform(32), tokenizer=fake_tokenizer,
                              max_bad_fraction=1.0)  # fmt: skip
    totals = BadSampleCounter(max_bad_fraction=1.0)
    keys = []
    for batch in loader:
        n = len(batch["key"])
        assert batch["image"].shape == (n, 3, 32, 32) and batch["label"].shape == (n,)
        if n:
            assert batch["text"].shape == (n, 77)
        totals.update(batch)
        keys += batch["key"]
    assert totals.seen == len(ds) and totals.total == len(bad)
    assert sorted(totals.counts) == sorted(bad.values())
    assert len(keys) == len(set(keys)) == len(ds) - len(bad)
    # A mostly broken source stops the run with the counter's error.
    strict = build_dataloader(ds, batch_size=13, transform=image_transform(32), max_bad_fraction=0.1, min_samples=5)
    with pytest.raises(BadDataError, match="are bad"):
        next(iter(strict))


def test_describe_source(tmp_path):
    (tmp_path / "cls" / "x").mkdir(parents=True)
    assert describe_source("shapes") == describe_source("shapes:easy") == "shapes"
    assert describe_source("web-{000..009}.tar") == "shards"
    assert describe_source("pairs.csv") == "captions"
    assert describe_source(str(tmp_path / "cls")) == "folder"
    with pytest.raises(FileNotFoundError, match="neither"):
        describe_source(str(tmp_path / "nowhere"))
    ds = build_dataset("shapes:easy", image_size=32, length=5, split="val")
    assert len(ds) == 5 and ds[0]["image"].size == (32, 32) and ds[0]["key"].startswith("shapes-val")
    assert np.asarray(ds[0]["image"]).dtype == np.uint8


def test_a_shapes_spec_can_change_any_field_of_its_preset():
    from qlip.data.loader import build_dataset, describe_source, shapes_config_from_spec

    spec = "shapes:easy?sizes=large&colors=red,blue&rotation_deg=5&antialias=2"
    cfg = shapes_config_from_spec(spec, image_size=48)
    assert describe_source(spec) == "shapes"
    assert cfg.sizes == ("large",) and cfg.colors == ("red", "blue") and cfg.rotation_deg == 5.0
    assert cfg.antialias == 2 and cfg.image_size == 48 and cfg.backgrounds == ("solid",)  # the rest: easy
    sample = next(iter(build_dataset(spec, length=1, image_size=48)))
    assert sample["labels"]["color"] in (0, 1) and sample["image"].size == (48, 48)
    bad_specs = ("shapes:easy?nope=1", "shapes:easy?sizes", "shapes:easy?antialias=maybe", "shapes?max_shapes=x")
    for bad in bad_specs:
        with pytest.raises(ValueError, match="shapes"):
            shapes_config_from_spec(bad)
