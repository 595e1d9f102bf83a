"""Never lose a run: atomic training checkpoints, checksums, keep-last-K, and resume from the newest good one.

A training checkpoint is one file ``run_dir/checkpoints/step_00001234.pt`` holding everything needed to continue
exactly: model, EMA, optimizers, schedulers, grad scaler, loss-balancer state, step, the RNG states of every rank
(python, numpy, torch, cuda) and the data-stream position. It holds tensors and plain values only (lists, tuples,
dicts, strings, numbers) and is loaded with ``torch.load(weights_only=True)``: a file someone swapped in cannot run
code; one holding anything else is refused like a corrupt one.

Each file is written to a temporary file in the same folder, flushed to disk and renamed into place, so a crash
leaves either the previous file set or the new complete file. Its sha256 then goes into ``run_dir/checkpoints.sha256``
(the ``sha256sum`` format: ``sha256sum -c checkpoints.sha256`` in the run directory checks every file). Resuming
skips, with a warning naming it, a file that fails to load or no longer matches its recorded sha256 (a bad disk
block, a copy cut short) and takes the next newest.

Pruning keeps the ``keep_last`` newest of the run's own history and never the file just written. Files of later
steps than the step a run started from (an older run under ``resume=never``, files that failed to load, a run
resumed from an earlier file) are never deleted: when the run writes its first checkpoint they are moved, with a
warning, to ``run_dir/checkpoints.replaced-<UTC time>/`` (their checksum lines follow them). Until then nothing is
touched, so a run that fails at start-up leaves the older run resumable.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_write, dir_mode, sha256_file, write_text_atomic

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKSUMS_NAME = "checkpoints.sha256"  # in the run directory; paths relative to it
REPLACED_PREFIX = "checkpoints.replaced-"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


class CheckpointLoadError(ValueError):
    """A training checkpoint could not be used: corrupt, changed since it was written, or not plain tensors."""


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


# ---------------------------------------------------------------------------------------------------------------------
# Checksums: one sha256sum-format file per run directory
# ---------------------------------------------------------------------------------------------------------------------




def _checksum_key(path: Path) -> tuple[Path, str]:
    """(the checksums file that records ``path``, its line's name): checkpoints sit one folder below the run."""
    return path.parent.parent / CHECKSUMS_NAME, f"{path.parent.name}/{path.name}"


def read_checksums(run_dir: str | Path) -> dict[str, str]:
    """name (relative to ``run_dir``) -> sha256 hex, from ``run_dir/checkpoints.sha256`` (bad lines are ignored)."""
    path = Path(run_dir) / CHECKSUMS_NAME
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) == 64 and name:
            sums[name] = digest
    return sums


def _write_checksums(run_dir: Path, sums: dict[str, str]) -> None:
    text = "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))
    write_text_atomic(run_dir / CHECKSUMS_NAME, text, durable=True)


def recorded_checksum(path: str | Path) -> str | None:
    record, name = _checksum_key(Path(path))
    return read_checksums(record.parent).get(name)


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------

_PLAIN_LEAVES = (str, int, float, bool, type(None), torch.Tensor)


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first entry of ``obj`` that ``torch.load(weights_only=True)`` would refuse."""
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; checkpoints take str / int keys")
            check_plain(value, f"{where}[{key!r}]")
    elif type(obj) in (list, tuple, torch.Size):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN_LEAVES):
        raise TypeError(f"{where} is a {type(obj).__name__}; training checkpoints hold only tensors and plain values "
                        "(they are loaded with weights_only=True): convert it in its state_dict()")  # fmt: skip


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save into a temp file beside ``path``, fsync, then rename over ``path`` (atomic on POSIX)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), durable=True)


def _replaced_dir(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        candidate = run_dir / f"{REPLACED_PREFIX}{stamp}{f'-{n}' if n else ''}"
        try:
            candidate.mkdir(mode=dir_mode())
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not find a free {REPLACED_PREFIX}{stamp}-N folder name in {run_dir}")


class RunCheckpoints:
    """The checkpoint folder of one training invocation, which started at ``start_step``.

    Args:
        run_dir: the run directory.
        keep_last: how many of the newest checkpoints to keep (at least the one just written).
        start_step: the step this invocation started from (0, or the step of the checkpoint it resumed).
    """

    def __init__(self, run_dir: str | Path, keep_last: int, start_step: int) -> None:
        self.run_dir = Path(run_dir)
        self.keep_last = max(1, keep_last)
        self.start_step = start_step
        self._cleared = False

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``state`` as the checkpoint of ``step``, record its sha256, then prune older ones."""
        check_plain(state)
        if not self._cleared:
            self._move_aside_later_steps()
            self._cleared = True
        path = atomic_torch_save(state, checkpoint_path(self.run_dir, step))
        sums = read_checksums(self.run_dir)
        sums[_checksum_key(path)[1]] = sha256_file(path)
        # This run's history: nothing of a later step is left in the folder (moved aside above), so the newest
        # files are this run's; the file just written is never a candidate.
        for old_step, old in list_checkpoints(self.run_dir)[self.keep_last :]:
            if old != path and old_step < step:
                old.unlink(missing_ok=True)
        present = {f"{CHECKPOINT_DIR}/{p.name}" for _, p in list_checkpoints(self.run_dir)}
        sums = {k: v for k, v in sums.items() if not k.startswith(f"{CHECKPOINT_DIR}/") or k in present}
        _write_checksums(self.run_dir, sums)
        for tmp in (self.run_dir / CHECKPOINT_DIR).glob(".step_*.tmp"):  # left by a writer that was killed
            tmp.unlink(missing_ok=True)
        return path

    def _move_aside_later_steps(self) -> None:
        later = [p for step, p in list_checkpoints(self.run_dir) if step > self.start_step]
        if not later:
            return
        dest = _replaced_dir(self.run_dir)
        sums = read_checksums(self.run_dir)
        for p in later:
            os.replace(p, dest / p.name)
            digest = sums.pop(f"{CHECKPOINT_DIR}/{p.name}", None)
            if digest is not None:
                sums[f"{dest.name}/{p.name}"] = digest
        _write_checksums(self.run_dir, sums)
        log.warning("moved %d checkpoint(s) of steps after %d (%s) to %s: this run started at step %d and would "
                    "otherwise replace or prune them", len(later), self.start_step,
                    ", ".join(p.name for p in sorted(later)), dest, self.start_step)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint on CPU, tensors and plain values only; raises :class:`CheckpointLoadError` when it
    does not match its recorded sha256, holds other objects, or is unreadable or not a qlip training checkpoint."""
    path = Path(path)
    expected = recorded_checksum(path)
    if expected is None:
        log.warning("%s has no line in %s (written by an older qlip, or copied here): loaded without a checksum "
                    "check", path, _checksum_key(path)[0])  # fmt: skip
    elif sha256_file(path) != expected:
        raise CheckpointLoadError(f"{path} does not match its recorded sha256: the file changed after it was written "
                                  "(a bad disk block or an interrupted copy)")  # fmt: skip
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointLoadError(f"{path} holds objects other than tensors and plain values; it is not loaded, since "
                                  f"unpickling them could run code ({first.strip()[:200]})") from e  # fmt: skip
    except Exception as e:
        raise CheckpointLoadError(f"{path} is unreadable: {type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointLoadError(f"{path} is not a qlip training checkpoint (no 'step' / 'model' entries)")
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
    """This process's python, numpy, torch CPU and CUDA generator states, as tensors and plain values."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),  # (version, tuple of ints, gauss_next)
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
