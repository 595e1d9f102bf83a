"""The vision-language model through the one training loop and the command line: LLaVA's stage 1 and stage 2
(`qlip train`, task: vlm), then `qlip chat` and `qlip eval vqa`, and the user mistakes each one must turn into one
error line (exit 2)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qlip.cli import main
from qlip.factory import create_model
from qlip_testing import write_tiny_run_config

DATA = "shapes:easy?sizes=medium,large&holdout_combinations=0.1&image_size=32"


def _config(root, run, stage: int, **vlm) -> str:
    return write_tiny_run_config(root, run, "vlm", {"tokenizer": str(root / "tok"), "data": DATA, "width": 32,
                                                    "depth": 2, "heads": 2, "image_pool": 16, "eval_images": 4, **vlm},
                                 stage=stage)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A stage-1 run (LM frozen) and a stage-2 run from it, 3 steps each, through `qlip train`."""
    root = tmp_path_factory.mktemp("vlm")
    torch.manual_seed(0)
    create_model("qlip-tiny").save_pretrained(root / "tok")
    assert main(["train", _config(root, root / "s1", 1)]) == 0
    assert main(["train", _config(root, root / "s2", 2), f"init={root / 's1' / 'last'}"]) == 0
    return root


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_stage1_trains_the_projector_only_and_stage2_the_language_model_too(trained, tmp_path):
    s1 = _weights(trained / "s1" / "last")
    # the same stage-1 run at another learning rate: the frozen LM ends where it started, the projector does not
    assert main(["train", _config(trained, tmp_path / "fast", 1), "optim.lr=0.05"]) == 0
    fast = _weights(tmp_path / "fast" / "last")
    lm_keys = [k for k in s1 if k.startswith("lm.")]
    assert lm_keys and all(torch.equal(s1[k], fast[k]) for k in lm_keys)
    assert not torch.equal(s1["projector.0.weight"], fast["projector.0.weight"])
    s2 = _weights(trained / "s2" / "last")
    assert not all(torch.equal(s1[k], s2[k]) for k in lm_keys)
    metrics = [json.loads(line) for line in (trained / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/answer" in m for m in metrics) and any("vqa/color" in m for m in metrics)
    assert any("loss/caption" in m for m in (json.loads(x) for x in (trained / "s1" / "metrics.jsonl").open()))


def test_one_run_holds_both_stages_with_caption_steps(trained, tmp_path):
    run = tmp_path / "both"
    assert main(["train", _config(trained, run, 2, caption_steps=2, stage1_trains_lm=True)]) == 0
    terms = [next((k for k in ("loss/caption", "loss/answer") if k in m), None)
             for m in (json.loads(x) for x in (run / "metrics.jsonl").open()) if m.get("kind") == "train"]
    assert terms == ["loss/caption", "loss/caption", "loss/answer"]
    assert (run / "last" / "vision" / "config.json").is_file() and (run / "last" / "tokenizer.json").is_file()


def test_chat_and_eval_vqa_on_a_trained_run(trained, tmp_path, capsys):
    from PIL import Image

    last = trained / "s2" / "last"
    Image.new("RGB", (32, 32), (220, 35, 35)).save(tmp_path / "img.png")
    capsys.readouterr()
    assert main(["chat", "--model", str(last), "--image", str(tmp_path / "img.png"), "What color is the shape?",
                 "--device", "cpu"]) == 0  # fmt: skip
    assert capsys.readouterr().out.count("\n") == 1  # one answer line (an untrained model's may be empty)
    out = tmp_path / "report"
    assert main(["eval", "vqa", "--model", str(last), "--data", DATA + "&eval_combinations=held_out", "--limit", "4",
                 "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    m = report["metrics"]
    for key in ("vqa/color", "vqa/shape", "vqa/position", "vqa/size", "vqa/yesno", "vqa/mean", "vqa_blind/mean"):
        assert 0.0 <= m[key] <= 100.0
    assert m["num_eval"] == 20 and (out / "report.md").is_file()
    from qlip.eval.schema import metric_unit

    assert all(metric_unit(k) == "%" for k in m if k != "num_eval")


def test_bad_inputs_are_one_line_exit_2(trained, tmp_path, capsys):
    last = trained / "s2" / "last"
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    broken_lm = tmp_path / "no-lm"
    shutil.copytree(last, broken_lm)
    (broken_lm / "model.safetensors").unlink()
    swapped = tmp_path / "swapped"
    shutil.copytree(last, swapped)
    shutil.rmtree(swapped / "vision")
    create_model("qlip-shapes-s", parts=("vision",)).save_pretrained(swapped / "vision")
    capsys.readouterr()
    calls = [
        ["chat", "--model", str(last), "What color is the shape?"],  # no image
        ["chat", "--model", str(last), "--image", str(tmp_path / "broken.png"), "What color?"],  # unreadable
        ["chat", "--model", str(last), "--image", str(tmp_path / "nope.png"), "What color?"],  # missing
        ["chat", "--model", str(last), "--image", str(tmp_path / "ok.png"), "red " * 500],  # longer than the context
        ["chat", "--model", str(broken_lm), "--image", str(tmp_path / "ok.png"), "What color?"],  # LM file missing
        ["chat", "--model", str(swapped), "--image", str(tmp_path / "ok.png"), "What color?"],  # tower mismatch
        ["chat", "--model", str(tmp_path / "nothing"), "--image", str(tmp_path / "ok.png"), "What color?"],
        ["eval", "vqa", "--model", str(last), "--data", "imagenet/", "--out", str(tmp_path / "r")],
    ]
    for argv in calls:
        assert main([*argv, "--device", "cpu"]) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == len(calls)
    lines = err.strip().splitlines()
    assert len(lines) == len(calls)
    assert "no image" in lines[0] and "context" in lines[3] and "model.safetensors is missing" in lines[4]
    assert "width" in lines[5]


def test_config_errors_name_what_to_change(trained, tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", _config(trained, tmp_path / "a", 1), "vlm.feature=pixels"]) == 2
    assert main(["train", _config(trained, tmp_path / "b", 1), "vlm.caption_steps=2"]) == 2
    assert main(["train", _config(trained, tmp_path / "c", 2), "vlm.tokenizer=/nonexistent"]) == 2
    assert main(["train", _config(trained, tmp_path / "d", 2), "vlm.layer=7"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "vlm.feature='pixels'" in err and "needs stage=2" in err and "vlm.tokenizer=/nonexistent" in err
    assert "layer 7 does not exist" in err


def test_vlm_layers_experiment_writes_one_row_per_feature_kind(trained, tmp_path, capsys):
    other = tmp_path / "other-tok"
    torch.manual_seed(1)
    create_model("qlip-tiny").save_pretrained(other)
    cfg = _config(trained, tmp_path / "base", 2)
    out = tmp_path / "layers"
    assert main(["experiment", "vlm-layers", "--config", cfg, "--out", str(out), "--budget", "1", "--in-process",
                 "--eval-images", "2", "--other-tokenizer", str(other)]) == 0  # fmt: skip
    table = json.loads((out / "table.json").read_text())
    assert [r["variant"] for r in table["rows"]] == ["layer-2", "layer-1", "codes", "other-tokenizer"]
    for row in table["rows"]:
        assert {"vqa/mean", "vqa/color", "hallucination", "time_s"} <= set(row["metrics"])
    job = json.loads((out / "runs" / "codes" / "seed0" / "job.json").read_text())
    assert "vlm.feature=codes" in job["stages"][0]["overrides"]
    assert "| quantized codes |" in (out / "table.md").read_text()
    # rerun: every job is finished, nothing trains again
    assert main(["experiment", "vlm-layers", "--config", cfg, "--out", str(out), "--budget", "1", "--in-process",
                 "--eval-images", "2", "--other-tokenizer", str(other)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["experiment", "vlm-layers", "--config", cfg, "--out", str(tmp_path / "x"),
                 "--other-tokenizer", str(tmp_path / "none")]) == 2  # fmt: skip


def test_resume_continues_the_vlm_exactly(trained, tmp_path):
    from qlip.train.logger import read_metrics

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    extra = ["eval.at_end=false", "checkpoint.export=false"]
    assert main(["train", _config(trained, whole, 2, caption_steps=1, stage1_trains_lm=True), *extra]) == 0
    cfg = _config(trained, parts, 2, caption_steps=1, stage1_trains_lm=True)
    assert main(["train", cfg, *extra, "stop_at=2", "checkpoint.every=1"]) == 0
    assert main(["train", cfg, *extra]) == 0
    a = [r.get("loss/caption", r.get("loss/answer")) for r in read_metrics(whole)]
    b = [r.get("loss/caption", r.get("loss/answer")) for r in read_metrics(parts)]
    assert a == b and len(a) == 3


def test_yesno_share_out_of_range_is_a_config_error(tmp_path):
    from qlip.train.config import ConfigError, config_from_dict

    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="vlm.yesno_share must lie in"):
            config_from_dict({"task": "vlm", "stage": 2, "vlm": {"tokenizer": "x", "yesno_share": bad},
                              "run_dir": str(tmp_path / "r")})  # fmt: skip


def test_reword_out_of_range_is_a_config_error(tmp_path):
    from qlip.train.config import ConfigError, config_from_dict

    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="vlm.reword must lie in"):
            config_from_dict({"task": "vlm", "stage": 2, "vlm": {"tokenizer": "x", "reword": bad},
                              "run_dir": str(tmp_path / "r")})  # fmt: skip
