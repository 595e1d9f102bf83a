"""FSDP2 (``distributed.strategy=fsdp``) on 2 CPU ranks (gloo): it trains like one process on the full batch,
resumes exactly from its own checkpoint, and exports whole models (the EMA included)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import qlip
from qlip.train.build import build_model
from qlip.train.config import load_config
from qlip.train.distributed import Runtime, seed_everything, wrap_model
from qlip.train.ema import ModelEMA
from qlip.train.loop import train
from train_helpers import join_ranks, load_ckpt, start_ranks, write_config

torch.set_num_threads(1)

# As in the DDP test: Adam's update is linear in the gradient (eps >> |g|), no clipping, no BSQ entropy (per rank by
# design), so the sharded run and one process must agree closely; EMA with a decay that moves it visibly. The
# contrastive loss of each rank covers its own rows only (clip_local_loss): the logit scale's gradient then differs
# between ranks and only its average over them gives the one-process gradient.
_SECTIONS = dict(
    optim={"steps": 4, "warmup_steps": 0, "lr": 1.0, "eps": 1.0, "grad_clip": 0.0, "weight_decay": 0.0},
    loss={"balance": {"weights": {"align": 1.0, "recon": 10.0, "quant": 0.0, "commit": 1.0}}, "clip_local_loss": True},
    checkpoint={"every": 2, "keep_last": 5, "export": True, "ema_decay": 0.5},
)
_FSDP = {"threads": 1, "strategy": "fsdp"}


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp_two_ranks_train_resume_and_export_like_one_process(tmp_path):
    sharded = write_config(tmp_path / "a.yaml", tmp_path / "a", data={"batch_size": 4}, distributed=_FSDP,
                           **_SECTIONS)  # fmt: skip
    procs = start_ranks(sharded, tmp_path / "a-ranks")
    # meanwhile, one process on the full batch of 8 (rank 0 reads samples 0, 2, 4, 6 and rank 1 samples 1, 3, 5, 7)
    single = load_config(write_config(tmp_path / "one.yaml", tmp_path / "one", data={"batch_size": 8},
                                      **_SECTIONS))  # fmt: skip
    train(single)
    assert [r["step"] for r in join_ranks(procs, tmp_path / "a-ranks")] == [4, 4]
    a, one = load_ckpt(tmp_path / "a", 4), load_ckpt(tmp_path / "one", 4)

    # 1. the same training as one process: the weights and the EMA after 4 steps (the logged losses are rank 0's)
    seed_everything(single.seed)  # same seed -> the initialization both runs started from
    w0 = build_model(single).state_dict()
    assert a["model"].keys() == w0.keys()
    moved = 0
    for k, before in w0.items():
        da, do = a["model"][k] - before, one["model"][k] - before
        torch.testing.assert_close(da, do, rtol=5e-4, atol=2e-6, msg=k)
        ea, eo = a["ema"]["shadow"].get(k), one["ema"]["shadow"].get(k)
        if eo is not None:  # the EMA holds whole tensors, not rank 0's shard
            torch.testing.assert_close(ea - before, eo - before, rtol=5e-4, atol=2e-6, msg=f"ema {k}")
        moved += int(do.abs().max() > 1e-4)
    assert moved > 20  # the comparison is about real updates
    assert a["model"]["logit_scale"].shape == () and a["model"]["logit_scale"] != w0["logit_scale"]

    # 2. resuming from the sharded step-2 checkpoint continues exactly
    resumed = write_config(tmp_path / "b.yaml", tmp_path / "b", data={"batch_size": 4}, distributed=_FSDP,
                           resume=str(tmp_path / "a" / "checkpoints" / "step_00000002.pt"), **_SECTIONS)  # fmt: skip
    assert [r["step"] for r in join_ranks(start_ranks(resumed, tmp_path / "b-ranks"), tmp_path / "b-ranks")] == [4, 4]
    b = load_ckpt(tmp_path / "b", 4)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) == len(a["ema"]["shadow"])
    for name in sa:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa[name][field]), torch.as_tensor(sb[name][field])), (name, field)
    losses_a, losses_b = ([r["loss/total"] for r in _metrics(tmp_path / run)] for run in ("a", "b"))
    assert losses_b == losses_a[2:]  # steps 3 and 4, bit for bit

    # 3. the exports are whole models that load like any other; last-ema holds the averaged weights
    last = qlip.create_model(str(tmp_path / "a" / "last")).state_dict()
    last_ema = qlip.create_model(str(tmp_path / "a" / "last-ema")).state_dict()
    assert last.keys() == a["model"].keys()
    for k, v in a["model"].items():
        assert torch.equal(last[k], v), k
        assert torch.equal(last_ema[k], a["ema"]["shadow"].get(k, v)), k
    assert any(not torch.equal(last[k], last_ema[k]) for k in a["ema"]["shadow"])


def test_fsdp_needs_a_torch_whose_fully_shard_takes_ignored_params(monkeypatch):
    import torch.distributed.fsdp as fsdp

    monkeypatch.setattr(fsdp, "fully_shard", lambda module, *, mesh=None: module)  # torch 2.6's signature
    two_ranks = Runtime(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), autocast_dtype=None)
    with pytest.raises(RuntimeError, match=r"needs torch >= 2.7 .* or use distributed.strategy=ddp"):
        wrap_model(nn.Linear(2, 2), two_ranks, "fsdp")


def test_ema_state_round_trips_and_its_full_tensors_fill_a_plain_model():
    torch.manual_seed(0)
    model, plain = nn.Linear(3, 2), nn.Linear(3, 2)
    ema = ModelEMA(model, 0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # warm-up decay min(0.5, 2 / 11): shadow = w0 + (1 - 2 / 11) * 1
    state = ema.state_dict()
    again = ModelEMA(plain, 0.9)
    again.load_state_dict(state)
    assert again.decay == 0.5 and again.updates == 1
    assert all(torch.equal(again.shadow[k], state["shadow"][k]) for k in state["shadow"])
    ema.copy_to(plain, state["shadow"])  # how the trainer exports: from the gathered state, not the (sharded) shadow
    torch.testing.assert_close(plain.weight, model.weight - 2 / 11)
    torch.testing.assert_close(plain.bias, model.bias)
