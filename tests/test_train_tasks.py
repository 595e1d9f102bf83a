"""The one training loop trains a second model family: a toy next-token LM declared as a Task in this file.

It trains, checkpoints, resumes exactly, exports, and reads its own config section, through the same loop and the
same config machinery as QLIP; the QLIP default (``task: qlip``) is covered by the other trainer tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from qlip.fileio import write_json_atomic
from qlip.train.checkpoint import find_resume_checkpoint
from qlip.train.config import ConfigError, TrainConfig, load_config
from qlip.train.loop import train
from qlip.train.tasks import TASKS, StepLosses, Task
from train_helpers import list_steps, load_ckpt


@dataclass
class ToyOptions:
    """The ``toy:`` section.

    Attributes:
        vocab_size: tokens 0..vocab_size-1.
        width: embedding width.
        seq_len: tokens per sequence.
    """

    vocab_size: int = 16
    width: int = 8
    seq_len: int = 6

    def validate(self, cfg: TrainConfig) -> None:
        if self.vocab_size < 2:
            raise ConfigError(f"toy.vocab_size must be >= 2, got {self.vocab_size}")


class ToyStream:
    """Sequences that count up modulo the vocabulary from a random start; batch n depends on (seed, rank, n) only."""

    def __init__(self, opts: ToyOptions, batch_size: int, seed: int, rank: int) -> None:
        self.opts, self.batch_size, self.seed, self.rank = opts, batch_size, seed, rank
        self.position = 0

    def __iter__(self) -> ToyStream:
        return self

    def __next__(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + self.position)
        self.position += 1
        start = torch.randint(0, self.opts.vocab_size, (self.batch_size, 1), generator=g)
        return (start + torch.arange(self.opts.seq_len)) % self.opts.vocab_size  # (B, T)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


class ToyLM(nn.Module):
    def __init__(self, opts: ToyOptions) -> None:
        super().__init__()
        self.embed = nn.Embedding(opts.vocab_size, opts.width)
        self.head = nn.Linear(opts.width, opts.vocab_size)
        self.frozen_bias = nn.Parameter(torch.zeros(opts.vocab_size), requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens)) + self.frozen_bias  # (B, T, V)


class ToyTask(Task):
    section = "toy"
    section_class = ToyOptions
    progress_unit = "seq/s"

    def build_model(self) -> nn.Module:
        self.after_steps = 0  # extra state, to show it resumes
        return ToyLM(self.options).to(self.rt.device)

    def batches(self) -> ToyStream:
        return ToyStream(self.options, self.cfg.data.batch_size, self.cfg.seed, self.rt.rank)

    def losses(self, model: nn.Module, batch: torch.Tensor, step: int) -> StepLosses:
        tokens = batch.to(self.rt.device)
        logits = model(tokens[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        return StepLosses(terms={"next_token": ce}, total=ce, samples=tokens.shape[0])

    def after_step(self, step: int, last: StepLosses) -> dict[str, torch.Tensor]:
        self.after_steps += 1
        return {"after_steps": torch.tensor(float(self.after_steps))}

    def state_dict(self) -> dict[str, Any]:
        return {"toy_after_steps": self.after_steps}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.after_steps = checkpoint["toy_after_steps"]

    def evaluate(self, model: nn.Module, *, name: str) -> dict[str, Any]:
        return {"num_eval": 4}

    def export_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        model = ToyLM(self.options)
        model.load_state_dict(state)
        return model

    def save_export(self, model: nn.Module, out_dir: Path) -> Path:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
        write_json_atomic(out_dir / "config.json", {"vocab_size": self.options.vocab_size})
        return out_dir


@pytest.fixture
def toy_task(monkeypatch):
    monkeypatch.setitem(TASKS, "toy", ToyTask)


def toy_config(path: Path, run_dir: Path, **changes: Any) -> Path:
    cfg = {"task": "toy", "toy": {"vocab_size": 16, "seq_len": 6}, "data": {"batch_size": 8},
           "optim": {"steps": 6, "warmup_steps": 1, "lr": 3e-2, "weight_decay": 0.0},
           "logging": {"every": 1, "progress": False, "tensorboard": False},
           "checkpoint": {"every": 0, "export": True}, "eval": {"at_end": True}, "distributed": {"threads": 1},
           "run_dir": str(run_dir)}  # fmt: skip
    for key, value in changes.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind", "train") == kind]


def test_a_second_task_trains_checkpoints_and_exports_through_the_same_loop(tmp_path, toy_task):
    result = train(load_config(toy_config(tmp_path / "c.yaml", tmp_path / "r", optim={"steps": 20})))
    assert result.step == 20 and not result.interrupted
    recs = read_records(tmp_path / "r")
    assert [r["step"] for r in recs] == list(range(1, 21))
    assert recs[-1]["loss/next_token"] < 0.8 * recs[0]["loss/next_token"]  # the counting pattern is learned
    assert recs[-1]["loss/after_steps"] == 20.0  # the hook ran after every step
    assert result.eval == {"num_eval": 4}
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "r" / "last" / "model.safetensors"))
    ckpt = load_ckpt(tmp_path / "r", 20)
    assert ckpt["toy_after_steps"] == 20 and ckpt["data"][0] == {"position": 20}
    for name, value in ckpt["model"].items():
        assert torch.equal(exported[name], value)
    assert torch.equal(ckpt["model"]["frozen_bias"], torch.zeros(16))  # frozen: not optimized
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["task"] == "toy" and saved["toy"]["vocab_size"] == 16


def test_a_second_task_resumes_exactly(tmp_path, toy_task):
    whole = train(load_config(toy_config(tmp_path / "a.yaml", tmp_path / "a")))
    first = train(load_config(toy_config(tmp_path / "b.yaml", tmp_path / "b", stop_at=3)))
    assert (whole.step, first.step) == (6, 3) and list_steps(tmp_path / "b") == [3]
    second = train(load_config(toy_config(tmp_path / "b.yaml", tmp_path / "b")))
    assert second.step == 6
    a, b = load_ckpt(tmp_path / "a", 6), load_ckpt(tmp_path / "b", 6)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["toy_after_steps"] == b["toy_after_steps"] == 6 and a["data"] == b["data"]
    losses = [[r["loss/next_token"] for r in read_records(tmp_path / d)] for d in ("a", "b")]
    assert losses[0] == losses[1]


def test_a_task_section_is_read_checked_and_written_like_the_others(tmp_path, toy_task):
    cfg = load_config(toy_config(tmp_path / "c.yaml", tmp_path / "r"), ["toy.width=4"])
    assert isinstance(cfg.task_options, ToyOptions) and (cfg.task_options.width, cfg.task_options.seq_len) == (4, 6)
    assert cfg.to_dict()["toy"] == {"vocab_size": 16, "width": 4, "seq_len": 6}
    with pytest.raises(ConfigError, match=r"unknown config key 'toy\.depth'; valid keys under toy: vocab_size, width"):
        load_config(toy_config(tmp_path / "c.yaml", tmp_path / "r"), ["toy.depth=2"])
    with pytest.raises(ConfigError, match="toy.width must be an integer"):
        load_config(toy_config(tmp_path / "c.yaml", tmp_path / "r"), ["toy.width=wide"])
    with pytest.raises(ConfigError, match="toy.vocab_size must be >= 2"):
        load_config(toy_config(tmp_path / "c.yaml", tmp_path / "r"), ["toy.vocab_size=1"])
    with pytest.raises(ConfigError, match="config section 'toy' belongs to task 'toy'.*set task=toy"):
        load_config(toy_config(tmp_path / "c.yaml", tmp_path / "r"), ["task=qlip"])
    with pytest.raises(ConfigError,
                       match="unknown task 'tiny'; the registered tasks are generator, lm, qlip, toy, unified, vlm"):
        load_config(toy_config(tmp_path / "c.yaml", tmp_path / "r"), ["task=tiny"])


def test_the_default_task_is_qlip_and_other_tasks_runs_are_not_resumed(tmp_path, toy_task):
    assert TrainConfig().task == "qlip" and TrainConfig().task_options is None
    train(load_config(toy_config(tmp_path / "c.yaml", tmp_path / "r", optim={"steps": 2})))
    assert find_resume_checkpoint(tmp_path / "r", "auto")[1]["step"] == 2
    qlip_there = load_config(overrides=[f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="holds checkpoints of task 'toy' and this config trains task 'qlip'"):
        train(qlip_there)


def test_a_task_state_key_may_not_replace_the_loops(tmp_path, toy_task, monkeypatch):
    monkeypatch.setattr(ToyTask, "state_dict", lambda self: {"step": 0})
    with pytest.raises(RuntimeError, match=r"ToyTask.state_dict uses the loop's checkpoint keys \['step'\]"):
        train(load_config(toy_config(tmp_path / "c.yaml", tmp_path / "r", optim={"steps": 1})))


def test_the_balance_probes_refuse_another_task(tmp_path, toy_task):
    from qlip.train.probe import run_balance_probes

    with pytest.raises(ConfigError, match="this config trains task 'toy'; use a QLIP config"):
        run_balance_probes(load_config(toy_config(tmp_path / "c.yaml", tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def test_every_downstream_family_names_a_missing_tokenizer_directory_the_same_way(tmp_path):
    """generator and vlm (and unified, after its init check) build on a QLIP model directory: a path without one is
    one ConfigError naming the config key and what to do, before anything is written."""
    from qlip.train.config import ConfigError
    from qlip.train.tasks import TASKS

    missing = str(tmp_path / "no-model")
    for task in ("generator", "vlm"):
        cfg = type("Cfg", (), {})()
        cfg.task_options = TASKS[task].section_class(tokenizer=missing)
        with pytest.raises(ConfigError, match=rf"{task}\.tokenizer=.*no-model: no QLIP model directory there \(train"):
            TASKS[task].check_startup(cfg)
