"""Multi-process behaviour of the trainer: DDP on CPU (gloo) and SIGTERM handling, through real subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import torch

from qlip.train.checkpoint import find_resume_checkpoint
from qlip.train.config import load_config
from qlip.train.logger import read_metrics
from qlip.train.loop import train
from train_helpers import join_ranks, list_steps, load_ckpt, start_ranks, write_config

torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


# A linear-in-the-gradient first step (eps >> |g|: the Adam update is lr * g / eps), no clipping, and the BSQ
# entropy off (its codebook entropy is per rank by design), so DDP and one process must agree closely.
_DDP_SECTIONS = dict(
    optim={"steps": 1, "warmup_steps": 0, "lr": 1.0, "eps": 1.0, "grad_clip": 0.0, "weight_decay": 0.0},
    loss={"balance": {"weights": {"align": 1.0, "recon": 10.0, "quant": 0.0, "commit": 1.0}}},
)


def test_ddp_two_cpu_processes_match_one_process_on_the_full_batch(tmp_path):
    port = _free_port()
    ddp_cfg = write_config(tmp_path / "ddp.yaml", tmp_path / "ddp", data={"batch_size": 4}, **_DDP_SECTIONS)
    procs = [
        subprocess.Popen([sys.executable, "-m", "qlip.train", str(ddp_cfg)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT,
                         env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(port)))  # fmt: skip
        for r in range(2)
    ]
    # meanwhile, one process on the full batch of 8 (rank 0 reads samples 0, 2, 4, 6 and rank 1 samples 1, 3, 5, 7)
    single = load_config(write_config(tmp_path / "one.yaml", tmp_path / "one", data={"batch_size": 8},
                                      **_DDP_SECTIONS))  # fmt: skip
    train(single)
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]
    a, b = load_ckpt(tmp_path / "ddp", 1), load_ckpt(tmp_path / "one", 1)
    assert a["world_size"] == 2
    init = load_config(single.run_dir + "/config.yaml")  # same seed -> same initialization in both runs
    init.run_dir, init.optim.steps, init.stop_at = str(tmp_path / "init"), 1, None
    from qlip.train.build import build_model
    from qlip.train.distributed import seed_everything

    seed_everything(init.seed)
    w0 = build_model(init).state_dict()
    moved = 0
    for k, before in w0.items():
        da, db = a["model"][k] - before, b["model"][k] - before
        torch.testing.assert_close(da, db, rtol=2e-3, atol=2e-6, msg=k)
        moved += int(db.abs().max() > 1e-4)
    assert moved > 20  # the comparison is about real updates
    # the contrastive loss over the gathered global batch equals the one-process loss
    rec_a = read_metrics(tmp_path / "ddp", kind=None)[0]
    rec_b = read_metrics(tmp_path / "one", kind=None)[0]
    assert abs(rec_a["loss/align"] - rec_b["loss/align"]) < 1e-5


def test_sigterm_leaves_a_loadable_checkpoint(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "r", optim={"steps": 100000, "warmup_steps": 1})
    proc = subprocess.Popen([sys.executable, "-m", "qlip.train", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=_env())  # fmt: skip
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the run did not start logging in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out.decode()[-3000:]  # 128 + SIGTERM, like any tool stopped by it
    path, state = find_resume_checkpoint(tmp_path / "r", "auto")
    assert state["step"] >= 2 and state["optimizer"]["state"]
    assert "interrupted at step" in out.decode()


def test_sigterm_on_one_rank_stops_every_rank_after_that_step(tmp_path):
    # logging (where the ranks used to compare notes) only at the end: the stop must not wait for it
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "r", optim={"steps": 6, "warmup_steps": 1},
                       logging={"every": 100, "progress": False, "tensorboard": False})  # fmt: skip
    results = join_ranks(start_ranks(cfg, tmp_path / "ranks", sigterm_at=(1, 2)), tmp_path / "ranks")
    # rank 1 got SIGTERM during step 3; both ranks finish that step, write its checkpoint together and stop
    assert results == [{"step": 3, "interrupted": True, "signal": signal.SIGTERM, "exit_code": 143}] * 2
    assert list_steps(tmp_path / "r") == [3]
    assert load_ckpt(tmp_path / "r", 3)["world_size"] == 2
