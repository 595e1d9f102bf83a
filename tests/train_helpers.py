"""Shared tiny training configs for the trainer tests (qlip-tiny, 32x32 shapes, batch 4)."""

from __future__ import annotations

from pathlib import Path

import torch
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


def list_steps(run_dir: Path) -> list[int]:
    """The steps of the training checkpoints in ``run_dir``, oldest first."""
    return sorted(int(p.stem.split("_")[1]) for p in (Path(run_dir) / "checkpoints").glob("step_*.pt"))


def load_ckpt(run_dir: Path, step: int) -> dict:
    return load_checkpoint_file(checkpoint_path(run_dir, step))


# ---------------------------------------------------------------------------------------------------------------------
# Several ranks of qlip.train.loop.train on CPU (gloo), each a spawned process
# ---------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg_path: str, out_dir: str, sigterm_at: tuple | None) -> None:
    import json
    import os
    import signal

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # fmt: skip
    torch.set_num_threads(1)
    import qlip.train.loop as loop
    from qlip.train.config import load_config

    if sigterm_at is not None and rank == sigterm_at[0]:  # this rank alone gets SIGTERM as step sigterm_at[1] begins
        original = loop._Trainer.train_step

        def train_step(self):
            if self.step == sigterm_at[1]:
                signal.raise_signal(signal.SIGTERM)
            return original(self)

        loop._Trainer.train_step = train_step
    result = loop.train(load_config(cfg_path))
    record = {"step": result.step, "interrupted": result.interrupted, "signal": result.signal,
              "exit_code": result.exit_code}  # fmt: skip
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))


def start_ranks(cfg_path: Path, out_dir: Path, world: int = 2, sigterm_at: tuple | None = None) -> list:
    """Start ``world`` processes that each run ``train`` on ``cfg_path`` as one rank (torchrun's environment).

    Args:
        sigterm_at: (rank, step): that rank raises SIGTERM in itself when that step begins.
    """
    import torch.multiprocessing as mp

    out_dir.mkdir(parents=True, exist_ok=True)
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(cfg_path), str(out_dir), sigterm_at))
             for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    return procs


def join_ranks(procs: list, out_dir: Path, timeout: float = 300) -> list[dict]:
    """Wait for the processes of :func:`start_ranks` (killing them all if one fails) -> each rank's result."""
    import json
    import time

    deadline = time.time() + timeout
    while any(p.is_alive() for p in procs) and time.time() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):  # a dead rank leaves the others waiting in a collective
            break
        time.sleep(0.2)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    assert [p.exitcode for p in procs] == [0] * len(procs), "a rank failed (its traceback is in the captured stderr)"
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(len(procs))]
