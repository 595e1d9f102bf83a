"""Non-square and transparent images: data.resize (crop | pad) and data.background, decided in transforms.py and
used alike by training, its held-out checks, evaluation, encode and tokenize."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from qlip.cli import main
from qlip.train.config import ConfigError, load_config
from qlip.train.data import held_out_batches
from qlip.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    _note_flattened,
    image_transform,
    load_image,
    parse_background,
    to_uint8,
)

torch.set_num_threads(1)


def _pixels(x):
    return to_uint8(x).permute(1, 2, 0).numpy()  # (S, S, 3)


def test_parse_background():
    assert parse_background("white") == (255, 255, 255) and parse_background("BLACK") == (0, 0, 0)
    assert parse_background("#ff8000") == (255, 128, 0) and parse_background((1, 2, 3)) == (1, 2, 3)
    for bad in ("purple", "#12345", "#gggggg", (1, 2), (0, 0, 256)):
        with pytest.raises(ValueError, match="white, black or #rrggbb"):
            parse_background(bad)


def test_pad_keeps_the_whole_image_and_crop_fills_the_square():
    wide = Image.new("RGB", (64, 32), (200, 20, 20))
    crop = _pixels(image_transform(32)(wide))
    assert (np.abs(crop.astype(int) - (200, 20, 20)) <= 1).all()  # the default: the released recipe, unchanged
    pad = _pixels(image_transform(32, resize="pad", background="#0000ff")(wide))
    assert (pad[:7] == (0, 0, 255)).all() and (pad[-7:] == (0, 0, 255)).all()  # bands above and below
    assert (np.abs(pad[10:22].astype(int) - (200, 20, 20)) <= 1).all()  # the whole width, scaled to fit
    train = image_transform(32, train=True, resize="pad", background="black", scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert (_pixels(train(wide))[:6] == 0).all()  # training pads to a square before its crop
    with pytest.raises(ValueError, match="resize must be one of"):
        image_transform(32, resize="stretch")


def test_transparent_pixels_take_the_background_and_are_noted_once(tmp_path, caplog):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[5:15, 5:15] = (0, 255, 0, 255)  # an opaque green square on a transparent field
    Image.fromarray(rgba).save(tmp_path / "logo.png")
    _note_flattened.cache_clear()
    with caplog.at_level(logging.WARNING, logger="qlip.transforms"):
        black = np.asarray(load_image(tmp_path / "logo.png", background="black"))
        again = np.asarray(load_image(tmp_path / "logo.png", background="black"))
        gray = np.asarray(load_image(tmp_path / "logo.png", background="#808080"))
    assert (black[0, 0] == 0).all() and (black[10, 10] == (0, 255, 0)).all() and (again == black).all()
    assert (gray[0, 0] == 128).all()
    assert caplog.text.count("transparent images are flattened onto the background black") == 1
    assert (np.asarray(load_image(tmp_path / "logo.png"))[0, 0] == 255).all()  # white stays the default


def test_training_config_reaches_loading_and_the_held_out_checks(tmp_path):
    rgba = np.zeros((16, 48, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, :24, 3] = 255  # left half opaque white, right half transparent
    Image.fromarray(rgba).save(tmp_path / "wide.png")
    (tmp_path / "pairs.csv").write_text("file,caption\nwide.png,a wide picture\n")
    cfg = load_config(None, [f"data.train={tmp_path / 'pairs.csv'}", f"data.val={tmp_path / 'pairs.csv'}",
                             "data.resize=pad", "data.background=black"])  # fmt: skip
    batch = held_out_batches(cfg.data, image_size=24, tokenizer=None, num_samples=1, batch_size=1, seed=0)[0]
    pixels = _pixels(batch["image"][0])  # 24 x 24: rows 8..15 hold the image, the rest is black padding
    assert (pixels[:7] == 0).all() and (pixels[-7:] == 0).all()
    assert (pixels[10:14, :10] == 255).all() and (pixels[10:14, -10:] == 0).all()  # transparent half: black
    for override, message in (("data.resize=stretch", "data.resize"), ("data.background=purple", "data.background")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


def test_encode_and_eval_take_the_options(tmp_path, capsys):
    import qlip

    path = tmp_path / "tiny"
    torch.manual_seed(0)
    qlip.create_model("qlip-tiny").save_pretrained(path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 96, 3), dtype=np.uint8)).save(tmp_path / "w.png")
    for mode in ("crop", "pad"):
        assert main(["encode", str(tmp_path / "w.png"), "--model", str(path), "--out", str(tmp_path / f"{mode}.st"),
                     "--resize", mode, "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    from safetensors.torch import load_file

    crop, pad = load_file(str(tmp_path / "crop.st")), load_file(str(tmp_path / "pad.st"))
    key = next(k for k in crop if crop[k].ndim == 3)  # the (N, h, w) token indices
    assert not torch.equal(crop[key], pad[key])  # the whole wide image is encoded, not its centre
    with pytest.raises(SystemExit) as exit_:  # an argparse error: usage and one line, exit 2
        main(["eval", "recon", "--model", str(path), "--data", "shapes", "--background", "purple", "--out",
              str(tmp_path / "r")])  # fmt: skip
    assert exit_.value.code == 2
    assert "white, black or #rrggbb" in capsys.readouterr().err


def test_mean_and_std_unchanged():
    assert image_transform(8).mean.flatten().tolist() == pytest.approx(OPENAI_CLIP_MEAN)
    assert image_transform(8).std.flatten().tolist() == pytest.approx(OPENAI_CLIP_STD)
