"""Never lose a run (issue 4, part 7): atomic training checkpoints, keep-last-K, and resume from the newest good one.

A training checkpoint is one file ``run_dir/checkpoints/step_00001234.pt`` holding everything needed to continue
exactly: model, EMA, optimizers, schedulers, grad scaler, loss-balancer state, step, the RNG states of every rank
(python, numpy, torch, cuda) and the data-stream position. It is written to a temporary file in the same folder,
flushed to disk (fsync) and renamed into place, so a crash or a kill at any moment leaves either the previous
file set or the new complete file, never a half-written one. A file that still fails to load (disk corruption,
a copy cut short) is skipped with a warning and the next newest is used.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in ``run_dir``, newest first (temporary files are ignored)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save into a temp file beside ``path``, fsync, then rename over ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints (and stale temporary files)."""
    for _, p in list_checkpoints(run_dir)[keep_last:]:
        p.unlink(missing_ok=True)
    folder = Path(run_dir) / CHECKPOINT_DIR
    if folder.is_dir():
        for p in folder.glob(".step_*.tmp"):
            p.unlink(missing_ok=True)


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint on CPU; raises if it is unreadable or not a qlip training checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise ValueError(f"{path} is not a qlip training checkpoint (no 'step' / 'model' entries)")
    return state


def find_resume_checkpoint(run_dir: str | Path, resume: str) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from, loaded, or None to start fresh.

    Args:
        run_dir: the run directory.
        resume: "auto" (newest loadable checkpoint in run_dir; corrupt ones are skipped with a warning), "never",
            or a path to a checkpoint file (which must load).
    """
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"resume={resume}: no such checkpoint file; use resume=auto or resume=never")
        return path, load_checkpoint_file(path)
    for step, path in list_checkpoints(run_dir):
        try:
            return path, load_checkpoint_file(path)
        except Exception as e:  # a corrupt file: fall back to the previous one, loudly
            log.warning("skipping unreadable checkpoint %s (step %d): %s: %s", path, step, type(e).__name__, e)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU and CUDA generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
