"""The trainer end to end on tiny data: both stages through the real entry point, exact resume,
frozen stage-2 parameters, non-finite skipping, corrupt-checkpoint fallback."""

from __future__ import annotations

import logging
import signal

import pytest
import torch

import qlip
from qlip.cli import main
from qlip.train.checkpoint import find_resume_checkpoint
from qlip.train.config import load_config
from qlip.train.logger import read_metrics
from qlip.train.loop import NonFiniteLossError, train
from train_helpers import load_ckpt, write_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """3 steps of stage 1 through `qlip train` (what `python -m qlip.train` runs), exporting run_dir/last."""
    tmp = tmp_path_factory.mktemp("s1")
    cfg = write_config(tmp / "s1.yaml", tmp / "run", checkpoint={"every": 2, "export": True},
                       eval={"at_end": True, "num_samples": 8, "batch_size": 4})
    assert main(["train", str(cfg)]) == 0
    return tmp / "run"


def test_stage1_three_steps_logs_every_term_and_exports(stage1_run):
    records = read_metrics(stage1_run, kind=None)
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3]
    for term in ("align", "recon", "quant", "commit"):
        assert all(isinstance(r[f"loss/{term}"], float) for r in train_recs)
        assert train_recs[-1][f"w/{term}"] == {"align": 1.0, "recon": 1000.0, "quant": 1.0, "commit": 1.0}[term]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and "psnr" in evals[-1] and "zs/shape" in evals[-1] and "bits_used" in evals[-1]
    assert (stage1_run / "grids" / "final.png").is_file()
    assert (stage1_run / "config.yaml").is_file()
    assert sorted(p.name for p in (stage1_run / "checkpoints").iterdir()) == ["step_00000002.pt", "step_00000003.pt"]
    model = qlip.create_model(str(stage1_run / "last"))  # loadable like any qlip model, with its tokenizer
    tok = qlip.get_tokenizer(str(stage1_run / "last"))
    emb = model.encode_text(tok(["a large red circle in the center."]))
    assert emb.shape == (1, model.cfg.embed_dim)


def test_stage2_freezes_visual_encoder_bit_identically(stage1_run, tmp_path):
    cfg = write_config(tmp_path / "s2.yaml", tmp_path / "run2", stage=2, init=str(stage1_run / "last"),
                       loss={"lpips_weight": 0.0, "gan_weight": 0.1, "gan_start": 1, "disc_layers": 2,
                             "disc_width": 8, "r1_weight": 1.0, "r1_every": 2},
                       checkpoint={"every": 0, "export": True})
    assert main(["train", str(cfg)]) == 0
    before = qlip.create_model(str(stage1_run / "last")).state_dict()
    after = qlip.create_model(str(tmp_path / "run2" / "last")).state_dict()  # full model: stage-1 text tower kept
    assert set(before) == set(after)
    frozen = [k for k in before if k.startswith(("visual.", "text.")) or k == "logit_scale"]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    trained = [k for k in before if k.startswith(("decoder.", "quant_in.", "quant_out."))]
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    rec = read_metrics(tmp_path / "run2", kind=None)
    assert "loss/gan" not in rec[0] and "loss/gan" in rec[-1] and "loss/disc" in rec[-1]  # GAN starts at step 1
    assert "loss/align" not in rec[-1]


def test_stage2_lpips_without_weight_files_fails_at_startup(stage1_run, tmp_path):
    cfg = load_config(None, ["stage=2", f"init={stage1_run / 'last'}", f"run_dir={tmp_path}", "data.batch_size=4"])
    with pytest.raises(ValueError, match="lpips_weight=0"):
        train(cfg)


def _overrides(run_dir, *extra):
    return [f"run_dir={run_dir}", *extra]


def test_resume_is_exact(tmp_path, caplog):
    base = write_config(tmp_path / "c.yaml", tmp_path / "unused", optim={"steps": 6, "warmup_steps": 2})
    straight = load_config(base, _overrides(tmp_path / "a"))
    train(straight)
    first = load_config(base, _overrides(tmp_path / "b", "stop_at=3"))
    assert train(first).step == 3
    second = load_config(base, _overrides(tmp_path / "b"))  # resume=auto picks step 3
    with caplog.at_level(logging.WARNING, logger="qlip.train.loop"):  # WARNING: shown without -v
        assert train(second).step == 6
    assert f"resumed from step 3 ({tmp_path / 'b' / 'checkpoints' / 'step_00000003.pt'})" in caplog.text
    a, b = load_ckpt(tmp_path / "a", 6), load_ckpt(tmp_path / "b", 6)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name]))
    assert a["scheduler"] == b["scheduler"]
    assert a["data"][0]["stream"] == b["data"][0]["stream"]


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_after_the_current_step_with_its_exit_code(tmp_path, monkeypatch, signum, exit_code):
    import qlip.train.loop as loop

    original = loop._Trainer.train_step

    def train_step(self):
        if self.step == 1:
            signal.raise_signal(signum)  # arrives during step 2
        return original(self)

    monkeypatch.setattr(loop._Trainer, "train_step", train_step)
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "r", optim={"steps": 50, "warmup_steps": 1},
                                   logging={"every": 100, "progress": False, "tensorboard": False}))  # fmt: skip
    before = signal.getsignal(signum)
    result = train(cfg)
    assert (result.step, result.interrupted, result.signal, result.exit_code) == (2, True, signum, exit_code)
    assert find_resume_checkpoint(tmp_path / "r", "auto")[1]["step"] == 2
    assert signal.getsignal(signum) == before  # the previous handler is back


def test_nonfinite_losses_are_skipped_then_stop(tmp_path, monkeypatch):
    import qlip.train.tasks.qlip as loop  # where the QLIP task computes its pixel loss

    real = loop.pixel_loss
    bad_calls = {"n": 0}

    def flaky(recon, target, kind="mse", **options):
        bad_calls["n"] += 1
        value = real(recon, target, kind, **options)
        return value * float("nan") if bad_calls["n"] in (2, 3) else value

    monkeypatch.setattr(loop, "pixel_loss", flaky)
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "r", optim={"steps": 4, "warmup_steps": 1}))
    result = train(cfg)
    assert result.step == 4 and result.skipped_steps == 2
    recs = read_metrics(tmp_path / "r", kind=None)
    assert [r["skipped_steps"] for r in recs] == [0, 1, 2, 2]
    assert recs[1]["loss/recon"] == "nan"

    # K in a row: a clear error, and the last checkpoint on disk is intact
    monkeypatch.setattr(loop, "pixel_loss", lambda r, t, kind="mse", **o: real(r, t, kind, **o) * float("nan"))
    cfg = load_config(write_config(tmp_path / "c2.yaml", tmp_path / "r2", optim={"steps": 20, "warmup_steps": 1,
                                                                                "max_nonfinite_steps": 2}))
    cfg.resume = "never"
    before = load_ckpt(tmp_path / "r", 4)
    cfg.run_dir = str(tmp_path / "r")
    cfg.optim.steps = 20
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row"):
        train(cfg)
    after = find_resume_checkpoint(tmp_path / "r", "auto")[1]
    assert after["step"] == 4 and all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_corrupt_newest_checkpoint_is_skipped(tmp_path, caplog):
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "r", optim={"steps": 4, "warmup_steps": 1},
                                   checkpoint={"every": 2, "keep_last": 5}))
    train(cfg)
    newest = tmp_path / "r" / "checkpoints" / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short
    with caplog.at_level("WARNING"):
        path, state = find_resume_checkpoint(tmp_path / "r", "auto")
    assert state["step"] == 2 and path.name == "step_00000002.pt"
    assert "skipping unreadable checkpoint" in caplog.text and "step_00000004.pt" in caplog.text
    # resuming trains from step 2 again
    cfg.optim.steps = 4
    assert train(cfg).step == 4


@pytest.mark.parametrize("mode", ["inverse-loss", "grad-norm"])
def test_online_balancing_modes_log_finite_weights(tmp_path, mode):
    balance = {"mode": mode, "warmup_steps": 0, "grad_norm_every": 1,
               "weights": {"align": 1.0, "recon": 1.0, "quant": 1.0, "commit": 1.0}}  # fmt: skip
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "r", optim={"steps": 2, "warmup_steps": 1},
                                   loss={"balance": balance}))  # fmt: skip
    train(cfg)
    recs = read_metrics(tmp_path / "r", kind=None)
    for r in recs:
        weights = {k: v for k, v in r.items() if k.startswith("w/")}
        assert set(weights) == {"w/align", "w/recon", "w/quant", "w/commit"}
        assert all(isinstance(v, float) and v > 0 for v in weights.values())
    assert recs[-1]["w/recon"] != 1.0  # the online rule moved the recon weight away from its base


def test_one_stage_recipe_trains_the_gan_in_stage_1(tmp_path):
    """Stage 1 may weigh the GAN (the "all losses at once" recipe): the discriminator is built and trained."""
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", checkpoint={"every": 0, "export": False},
                       loss={"gan_start": 0, "gan_weight": 0.1,
                             "balance": {"weights": {"align": 1.0, "recon": 1000.0, "quant": 1.0, "commit": 1.0}}})
    result = train(load_config(cfg, None))
    assert result.step == 3
    records = read_metrics(tmp_path / "run", kind=None)
    last = [r for r in records if r["kind"] == "train"][-1]
    assert isinstance(last["loss/gan"], float) and isinstance(last["loss/align"], float)
    assert last["w/gan"] == pytest.approx(0.1)
    assert any(k.startswith("loss/disc") for k in last), sorted(last)  # the discriminator stepped too


def test_stage2_export_carries_the_configured_tokenizer(stage1_run, tmp_path):
    """An init directory without vocabulary plus data.tokenizer: run_dir/last still holds the tokenizer, whose ids fit
    the exported text tower (what `qlip classify --model run/last` needs)."""
    import shutil

    init = tmp_path / "init"
    shutil.copytree(stage1_run / "last", init)
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.move(init / name, vocab / name)
    cfg = write_config(tmp_path / "s2.yaml", tmp_path / "run2", stage=2, init=str(init),
                       data={"tokenizer": str(vocab)}, optim={"steps": 1, "warmup_steps": 0},
                       loss={"lpips_weight": 0.0, "gan_weight": 0.0}, checkpoint={"every": 0, "export": True})
    assert main(["train", str(cfg)]) == 0
    model = qlip.create_model(str(tmp_path / "run2" / "last"))
    ids = qlip.get_tokenizer(str(tmp_path / "run2" / "last"))(["a large red circle in the center."])
    assert ids.shape == (1, model.cfg.text.context_length)
    assert model.encode_text(ids).shape == (1, model.cfg.embed_dim)
