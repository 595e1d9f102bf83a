"""The trainer on a caption list: the held-out split (data.val or data.val_fraction, kept out of training), the
retrieval check, the log lines that say which checks run (or that none does), and truncated captions counted."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from qlip.cli import main
from qlip.train.config import ConfigError, load_config
from qlip.train.data import BatchStream, held_out_batches
from qlip.train.logger import read_metrics
from train_helpers import write_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """A caption list of 16 small images (2 of them with a second caption) and a BPE vocabulary for it."""
    from qlip.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("captioned")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    rows = ["file,caption"]
    words = ["red", "green", "blue", "round", "square", "small", "large", "bright"]
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,a {words[i % 8]} {words[(i * 3) % 8]} thing")
    rows += ["img/0.png,another red thing", "img/1.png," + " ".join(words * 4)]  # the last is too long
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    tok = train_bpe([r.split(",", 1)[1] for r in rows[1:]] * 3, 600)
    tok.save_pretrained(root / "tok")
    return root


def _config(tmp_path, captioned, **data):
    return write_config(tmp_path / "c.yaml", tmp_path / "run", optim={"steps": 2, "warmup_steps": 1, "lr": 1e-3},
                        data={"train": str(captioned / "pairs.csv"), "tokenizer": str(captioned / "tok"),
                              "batch_size": 4, **data},
                        eval={"every": 1, "at_end": True, "num_samples": 8, "batch_size": 4})  # fmt: skip


def test_val_fraction_is_held_out_of_training_and_ranked(tmp_path, captioned, caplog):
    cfg_path = _config(tmp_path, captioned, val_fraction=0.25)
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(cfg_path)]) == 0
    assert caplog.text.count("held-out checks on 25.0% of data.train=") == 1  # said once, at the first check
    assert "image-text retrieval" in caplog.text and "(4 samples)" in caplog.text
    evals = [r for r in read_metrics(tmp_path / "run", kind=None) if r["kind"] == "eval"]
    assert evals and all({"i2t/r1", "t2i/r1", "t2i/mean_rank", "psnr"} <= set(r) for r in evals)

    cfg = load_config(cfg_path)
    held = held_out_batches(cfg.data, image_size=32, tokenizer=None, num_samples=100, batch_size=4, seed=cfg.seed)
    held_keys = [(k, c) for b in held for k, c in zip(b["key"], b["caption"])]
    stream = BatchStream(cfg.data, image_size=32, tokenizer=None, seed=cfg.seed, rank=0, world_size=1)
    assert len(stream.dataset) + len(held_keys) == 18  # 18 rows: 4 (a quarter, rounded) held out, 14 trained on
    train_keys = set()
    for _ in range(2 * len(stream.dataset) // 4):  # two epochs of batches
        batch = next(stream)
        train_keys |= set(zip(batch["key"], batch["caption"]))
    assert len(held_keys) == 4 and not train_keys & set(held_keys)
    again = held_out_batches(cfg.data, image_size=32, tokenizer=None, num_samples=100, batch_size=4, seed=cfg.seed)
    assert [b["key"] for b in again] == [b["key"] for b in held]  # the same split every time (seeded)


def test_data_without_a_held_out_split_says_so_once(tmp_path, captioned, caplog):
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(_config(tmp_path, captioned))]) == 0
    assert caplog.text.count("no held-out checks: data.train=") == 1
    assert "data.val_fraction=0.05" in caplog.text
    # every training caption was tokenized for the count; the one too long for qlip-tiny's context is named once
    assert caplog.text.count("1 of 18 captions were longer than the 32-token context and were truncated") == 1
    assert not [r for r in read_metrics(tmp_path / "run", kind=None) if r["kind"] == "eval" and "psnr" in r]


def test_val_fraction_mistakes(tmp_path, captioned):
    with pytest.raises(ConfigError, match="val_fraction must lie in"):
        load_config(_config(tmp_path, captioned, val_fraction=1.0))
    with pytest.raises(ConfigError, match="both name the held-out data"):
        load_config(_config(tmp_path, captioned, val_fraction=0.1, val=str(captioned / "pairs.csv")))
    cfg = load_config(None, ["data.train=shapes:easy", "data.val_fraction=0.1"])
    with pytest.raises(ConfigError, match="set data.val to held-out data instead"):
        BatchStream(cfg.data, image_size=32, tokenizer=None, seed=0, rank=0, world_size=1)


def test_training_augmentation_takes_crop_scale_and_flips_only_captions_without_a_side(tmp_path):
    (tmp_path / "img").mkdir()
    arr = np.zeros((40, 40, 3), dtype=np.uint8)
    arr[:, 20:] = 255  # dark left half, bright right half: a flip shows
    rows = ["image,caption"]
    for i in range(16):
        Image.fromarray(arr).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{'a bright square on the right' if i % 2 else 'a bright square'} {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(None, [f"data.train={tmp_path / 'pairs.csv'}", "data.augment=true", "data.hflip=caption",
                             "data.crop_scale=[1.0,1.0]", "data.batch_size=8"])  # fmt: skip
    stream = BatchStream(cfg.data, image_size=32, tokenizer=None, seed=0, rank=0, world_size=1)
    assert stream.collate.transform.scale == (1.0, 1.0)
    flipped: dict[bool, int] = {True: 0, False: 0}
    for _ in range(12):  # six epochs of the 16 rows
        batch = next(stream)
        for image, caption in zip(batch["image"], batch["caption"]):
            flipped["on the right" in caption] += bool(image[0, :, 0].mean() > image[0, :, -1].mean())
    assert flipped[True] == 0 and 15 <= flipped[False] <= 33  # 48 fair coin tosses on the others: 24 +- 9

    wide = load_config(None, [f"data.train={tmp_path / 'pairs.csv'}", "data.augment=true", "data.crop_scale=[0.6,1]"])
    assert BatchStream(wide.data, image_size=32, tokenizer=None, seed=0, rank=0,
                       world_size=1).collate.transform.scale == (0.6, 1.0)  # fmt: skip
    assert load_config(None, []).data.crop_scale == [0.9, 1.0]  # the transform's own default stays the default
    with pytest.raises(ConfigError, match="crop_scale"):
        load_config(None, ["data.crop_scale=[0.8,0.5]"])
    with pytest.raises(ConfigError, match="hflip"):
        load_config(None, ["data.hflip=sometimes"])
