"""Shared fixtures: a tiny model in the RELEASED Hugging Face layout, real test images from scikit-image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qlip_testing import CAPTIONS, TINY_RELEASED_CONFIG, randomize_

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from qlip.tokenizer import train_bpe

    return train_bpe(CAPTIONS, 600)


@pytest.fixture(scope="session")
def released_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A directory laid out exactly like a released repo, for a tiny config, with random weights."""
    from qlip.checkpoints import save_released_layout
    from qlip.config import config_from_released
    from qlip.models.qlip import QLIP

    model = randomize_(QLIP(config_from_released(TINY_RELEASED_CONFIG, name="tiny-released")))
    path = save_released_layout(model, tmp_path_factory.mktemp("released") / "QLIP-tiny")
    (path / "config.json").write_text(json.dumps(TINY_RELEASED_CONFIG, indent=2))  # exactly the released fields
    tiny_tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"crop_size": 32, "image_mean": [0.48, 0.46, 0.41]}))
    # released files may carry deterministic RoPE tables: they must be recomputed, not required or rejected
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "model.safetensors"))
    sd["vision_model.encoder.rope.freqs_cos"] = torch.zeros(16, 16)
    sd["vision_decoder.encoder.rope.freqs_sin"] = torch.zeros(16, 16)
    save_file(sd, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> dict[str, Path]:
    """Real photographs from scikit-image in several modes, plus a corrupt file."""
    import skimage.data as sd

    d = tmp_path_factory.mktemp("images")
    files = {}
    files["rgb"] = d / "astronaut.png"
    Image.fromarray(sd.astronaut()).save(files["rgb"])
    files["jpeg"] = d / "coffee.jpg"
    Image.fromarray(sd.coffee()).save(files["jpeg"], quality=90)
    files["gray"] = d / "camera.png"
    Image.fromarray(sd.camera()).save(files["gray"])
    files["rgba"] = d / "chelsea_rgba.png"
    cat = sd.chelsea()
    Image.fromarray(np.dstack([cat, np.full(cat.shape[:2], 200, np.uint8)])).save(files["rgba"])
    files["corrupt"] = d / "corrupt.jpg"
    files["corrupt"].write_bytes(Image.open(files["jpeg"]).tobytes()[:0] + files["jpeg"].read_bytes()[:300])
    return files
