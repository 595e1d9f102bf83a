"""Nothing lost, no one in: training checkpoints never run pickled code, survive stale or corrupt neighbours and
follow the umask, and metrics.jsonl holds each step once."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from qlip.checkpoints import ModelDirectoryError
from qlip.train.checkpoint import (
    CHECKSUMS_NAME,
    RunCheckpoints,
    checkpoint_path,
    find_resume_checkpoint,
    list_checkpoints,
    read_checksums,
    sha256_file,
)
from qlip.train.config import load_config
from qlip.train.logger import read_metrics
from qlip.train.loop import train
from train_helpers import write_config

torch.set_num_threads(1)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4), written under umask 022; copy it before changing it."""
    tmp = tmp_path_factory.mktemp("run4")
    old = os.umask(0o022)
    try:
        train(load_config(write_config(tmp / "c.yaml", tmp / "r", optim={"steps": 4, "warmup_steps": 1},
                                       checkpoint={"every": 2, "keep_last": 5})))  # fmt: skip
    finally:
        os.umask(old)
    return tmp / "r"


def _copy_run(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "r"
    shutil.copytree(run, dest)
    return dest


def _steps(run_dir: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(run_dir)]


# ---------------------------------------------------------------------------------------------------------------------
# Training checkpoints: no unpickling, checksums, retention
# ---------------------------------------------------------------------------------------------------------------------


def test_checkpoints_follow_the_umask(four_step_run):
    for _, ckpt in list_checkpoints(four_step_run):
        assert _mode(ckpt) == 0o644, ckpt  # mkstemp alone gives 0600
    assert _mode(four_step_run / CHECKSUMS_NAME) == 0o644
    assert _mode(four_step_run / "metrics.jsonl") == 0o644


class _WritesMarker:
    """Unpickling this creates the marker file: any code a pickle can name would run the same way."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_payload_as_newest_checkpoint_does_not_run(four_step_run, tmp_path, caplog):
    run = _copy_run(four_step_run, tmp_path)
    marker = tmp_path / "pwned"
    evil = checkpoint_path(run, 6)
    torch.save({"step": 6, "model": _WritesMarker(marker)}, evil)
    evil_bytes = evil.read_bytes()
    # whoever can write the file can write its checksum line too: the checksum is no defence here
    with open(run / CHECKSUMS_NAME, "a") as f:
        f.write(f"{sha256_file(evil)}  checkpoints/{evil.name}\n")
    with caplog.at_level("WARNING"):
        path, state = find_resume_checkpoint(run, "auto")
    assert not marker.exists()
    assert path.name == "step_00000004.pt" and state["step"] == 4
    assert "skipping unreadable checkpoint" in caplog.text and "step_00000006.pt" in caplog.text
    assert "holds objects other than tensors and plain values" in caplog.text

    cfg = load_config(write_config(tmp_path / "c.yaml", run, optim={"steps": 6, "warmup_steps": 1},
                                   checkpoint={"every": 2, "keep_last": 5}))  # fmt: skip
    assert train(cfg).step == 6 and not marker.exists()
    assert find_resume_checkpoint(run, "auto")[1]["step"] == 6
    (moved,) = run.glob("checkpoints.replaced-*/step_00000006.pt")  # set aside, not deleted
    assert moved.read_bytes() == evil_bytes


def test_a_checkpoint_zeroed_in_the_middle_is_skipped_by_its_checksum(four_step_run, tmp_path, caplog):
    run = _copy_run(four_step_run, tmp_path)
    newest = checkpoint_path(run, 4)
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)  # a bad disk block: the zip structure is intact
    newest.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        path, state = find_resume_checkpoint(run, "auto")
    assert path.name == "step_00000002.pt" and state["step"] == 2
    assert "step_00000004.pt" in caplog.text and "sha256" in caplog.text


@pytest.mark.parametrize("case", ["resume-never-over-an-older-run", "every-checkpoint-unreadable"])
def test_stale_later_checkpoints_are_moved_aside_and_the_new_ones_kept(tmp_path, caplog, case):
    base = dict(optim={"steps": 6, "warmup_steps": 1}, checkpoint={"every": 2, "keep_last": 2})
    train(load_config(write_config(tmp_path / "old.yaml", tmp_path / "r", **base)))
    old = {p.name: p.read_bytes() for _, p in list_checkpoints(tmp_path / "r")}
    assert sorted(old) == ["step_00000004.pt", "step_00000006.pt"]
    if case == "every-checkpoint-unreadable":
        for _, p in list_checkpoints(tmp_path / "r"):
            p.write_bytes(p.read_bytes()[:1000])
        old = {p.name: p.read_bytes() for _, p in list_checkpoints(tmp_path / "r")}
    resume = "never" if case.startswith("resume-never") else "auto"
    cfg = load_config(write_config(tmp_path / "new.yaml", tmp_path / "r", resume=resume,
                                   optim={"steps": 3, "warmup_steps": 1},
                                   checkpoint={"every": 1, "keep_last": 2}))  # fmt: skip
    with caplog.at_level("WARNING"):
        assert train(cfg).step == 3
    assert _steps(tmp_path / "r") == [3, 2]  # the new run's checkpoints survive their own pruning
    assert find_resume_checkpoint(tmp_path / "r", "auto")[1]["step"] == 3
    (aside,) = list(tmp_path.glob("r/checkpoints.replaced-*"))
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == old  # the older run, byte for byte
    assert "moved 2 checkpoint(s)" in caplog.text and aside.name in caplog.text
    assert set(read_checksums(tmp_path / "r")) == {"checkpoints/step_00000002.pt", "checkpoints/step_00000003.pt",
                                                   f"{aside.name}/step_00000004.pt", f"{aside.name}/step_00000006.pt"}


def test_pruning_keeps_the_newest_and_never_the_file_just_written(tmp_path):
    ckpts = RunCheckpoints(tmp_path, keep_last=2, start_step=0)
    for step in (1, 2, 3, 4):
        ckpts.save({"step": step, "model": {"w": torch.full((3,), float(step))}}, step)
    assert _steps(tmp_path) == [4, 3]
    assert set(read_checksums(tmp_path)) == {"checkpoints/step_00000003.pt", "checkpoints/step_00000004.pt"}
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\] is a \w*Path; .*weights_only"):
        ckpts.save({"step": 5, "model": {}, "extra": Path("x")}, 5)  # would not load with weights_only
    assert _steps(tmp_path) == [4, 3]


# ---------------------------------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------------------------------


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    lines = [json.dumps({"step": s, "kind": "train", "loss/recon": 0.5}) for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "kind": "tr')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", kind=None)] == [1, 2]


def test_resumed_run_logs_each_step_once(tmp_path):
    config = dict(optim={"steps": 3, "warmup_steps": 1}, checkpoint={"every": 2, "keep_last": 5})
    train(load_config(write_config(tmp_path / "c.yaml", tmp_path / "r", **config)))
    # killed during step 4, after logging step 3 but before its checkpoint: resume starts from step 2
    checkpoint_path(tmp_path / "r", 3).unlink()
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "tr')
    config["optim"]["steps"] = 5
    assert train(load_config(write_config(tmp_path / "c.yaml", tmp_path / "r", **config))).step == 5
    assert [r["step"] for r in read_metrics(tmp_path / "r", kind=None)] == [1, 2, 3, 4, 5]


def test_a_fresh_start_moves_an_older_metrics_log_aside(four_step_run, tmp_path):
    run = _copy_run(four_step_run, tmp_path)
    before = (run / "metrics.jsonl").read_text()
    cfg = load_config(write_config(tmp_path / "c.yaml", run, resume="never", optim={"steps": 2, "warmup_steps": 1}))
    train(cfg)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    (aside,) = run.glob("metrics.replaced-*.jsonl")
    assert aside.read_text() == before


def test_a_foreign_export_directory_is_refused_before_training(tmp_path):
    (tmp_path / "r" / "last").mkdir(parents=True)
    (tmp_path / "r" / "last" / "notes.txt").write_text("mine")
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "r", checkpoint={"every": 0, "export": True}))
    with pytest.raises(ModelDirectoryError, match="last is not empty and is not a qlip model directory"):
        train(cfg)
    assert not (tmp_path / "r" / "checkpoints").exists()  # no step was trained
    assert (tmp_path / "r" / "last" / "notes.txt").read_text() == "mine"
