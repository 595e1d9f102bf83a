"""Shared tiny training configs for the trainer tests (qlip-tiny, 32x32 shapes, batch 4)."""

from __future__ import annotations

from pathlib import Path

import yaml

from qlip.train.checkpoint import checkpoint_path, load_checkpoint_file

TINY = {
    "model": {"name": "qlip-tiny"},
    "data": {"train": "shapes:easy", "batch_size": 4, "shapes_training": {"bpe_captions": 120, "bpe_vocab_size": 600},
             "shapes": {"image_size": 32}},
    "optim": {"steps": 3, "warmup_steps": 1, "lr": 1.0e-3},
    "eval": {"num_samples": 8, "batch_size": 4, "at_end": False},
    "logging": {"every": 1, "progress": False, "tensorboard": False},
    "checkpoint": {"every": 0, "export": False},
    "distributed": {"threads": 1},
}


def write_config(path: Path, run_dir: Path, **sections) -> Path:
    """A YAML config: TINY updated section by section with ``sections`` (dicts merged one level deep)."""
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    cfg["run_dir"] = str(run_dir)
    path.write_text(yaml.safe_dump(cfg))
    return path


def load_ckpt(run_dir: Path, step: int) -> dict:
    return load_checkpoint_file(checkpoint_path(run_dir, step))
