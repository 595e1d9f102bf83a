"""The text-to-image experiments (`qlip experiment t2i-codecs | t2i-tokenizers`) end to end on tiny models: every
variant trains for the same steps, is scored by ShapesEval, and lands in table.json / table.md; a rerun skips
finished variants; user mistakes are one error line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlip.cli import main
from qlip.factory import create_model

SPEC = "shapes:easy?holdout_combinations=0.1&eval_combinations=held_out&image_size=32"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    from qlip.data.shapes import ShapesConfig
    from qlip.eval.judge import JudgeConfig, ShapesJudge, save_judge

    root = tmp_path_factory.mktemp("t2i-exp")
    for seed, name in ((0, "aligned"), (1, "recon")):
        torch.manual_seed(seed)
        create_model("qlip-tiny").save_pretrained(root / name, tokenizer=tiny_tokenizer)
    assert main(["tokenize", "--model", str(root / "aligned"), "--data", "shapes:easy", "--count", "16", "--out",
                 str(root / "tokens"), "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    easy = ShapesConfig.preset("easy")  # an untrained judge: the experiments' plumbing is tested, not its verdicts
    classes = {"shape": easy.shapes, "color": easy.colors, "position": easy.positions}
    save_judge(ShapesJudge(JudgeConfig(image_size=32, classes=classes)), root / "judge")
    cfg = {
        "task": "generator",
        "generator": {"tokenizer": str(root / "aligned"), "tokens": str(root / "tokens"), "width": 32, "depth": 1,
                      "heads": 2, "eval_prompts": 0},
        "data": {"batch_size": 4},
        "optim": {"steps": 100, "warmup_steps": 10, "lr": 1e-3},
        "distributed": {"threads": 1},
        "run_dir": str(root / "unused"),
    }
    (root / "t2i.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _common(root, out):
    return ["--config", str(root / "t2i.yaml"), "--out", str(out), "--steps", "2", "--in-process", "--judge",
            str(root / "judge"), "--eval-data", SPEC, "--eval-images", "3"]


def test_codecs_train_at_equal_steps_and_are_scored(setup, tmp_path, capsys):
    out = tmp_path / "codecs"
    assert main(["experiment", "t2i-codecs", *_common(setup, out), "--temperature", "0.5"]) == 0
    table = json.loads((out / "table.json").read_text())
    rows = {r["variant"]: r for r in table["rows"]}
    assert list(rows) == ["subtoken", "depth", "bits"]
    for row in rows.values():
        m = row["metrics"]
        assert m["train/steps"]["mean"] == 2 and m["num_eval"]["mean"] == 3
        for key in ("gen/shape", "gen/color", "gen/position", "gen/all", "judge_recon/shape", "clip_score",
                    "train/time_s"):
            assert key in m, key
    params = {k: r["metrics"]["params"]["mean"] for k, r in rows.items()}
    assert len(set(params.values())) == 3  # the codecs differ in size: the table says by how much
    saved = json.loads((out / "runs" / "bits" / "seed0" / "train" / "last" / "config.json").read_text())
    assert saved["codec"]["kind"] == "bits"
    md = (out / "table.md").read_text()
    assert "trainable params" in md and "depth: one AR step per position" in md
    assert table["settings"]["generation"]["data"] == SPEC
    assert table["settings"]["generation"]["temperature"] == 0.5 and "temperature 0.5" in md
    # A rerun continues: finished variants are not trained again.
    stamp = (out / "runs" / "depth" / "seed0" / "result.json").stat().st_mtime_ns
    assert main(["experiment", "t2i-codecs", *_common(setup, out)]) == 0
    assert (out / "runs" / "depth" / "seed0" / "result.json").stat().st_mtime_ns == stamp


def test_tokenizers_tokenize_train_and_compare_side_by_side(setup, tmp_path):
    out = tmp_path / "toks"
    argv = ["experiment", "t2i-tokenizers", *_common(setup, out), "--tokenizers",
            f"aligned={setup / 'aligned'},{setup / 'tokens'}", f"recon={setup / 'recon'}", "--data", "shapes:easy",
            "--count", "12", "--tokenize-batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    assert [r["variant"] for r in table["rows"]] == ["aligned", "recon"]
    assert (out / "tokens" / "recon" / "manifest-r000.json").is_file()  # tokenized by the experiment
    assert not (out / "tokens" / "aligned").exists()  # its token folder was given
    for name in ("aligned", "recon"):  # each generator carries the tokenizer it was trained over
        carried = load_file(out / "runs" / name / "seed0" / "train" / "last" / "qlip" / "model.safetensors")
        own = load_file(setup / name / "model.safetensors")
        assert all(torch.equal(carried[k], own[k]) for k in own)
    for row in table["rows"]:
        assert row["metrics"]["train/steps"]["mean"] == 2 and "gen/all" in row["metrics"]


def test_user_mistakes_are_one_line(setup, tmp_path, capsys):
    tok = tmp_path / "tok.yaml"
    tok.write_text(yaml.safe_dump({"model": {"name": "qlip-tiny"}}))
    assert main(["experiment", "t2i-codecs", "--config", str(tok), "--out", str(tmp_path / "a"), "--in-process"]) == 2
    base = ["experiment", "t2i-tokenizers", "--config", str(setup / "t2i.yaml"), "--out", str(tmp_path / "b")]
    assert main([*base, "--tokenizers", f"only={setup / 'aligned'}"]) == 2
    assert main([*base, "--tokenizers", f"a={setup / 'aligned'}", f"b={tmp_path / 'nothing'}"]) == 2
    assert main([*base, "--tokenizers", f"{setup / 'aligned'}", f"b={setup / 'recon'}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 4
    assert "generator config" in err and "at least two" in err and "no QLIP model directory" in err
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it before anything runs
        main([*base, "--tokenizers", f"a={setup / 'aligned'}", f"b={setup / 'recon'}", "--temperature", "-1"])
    assert exit_info.value.code == 2 and "--temperature: must be a finite number >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not a finite temperature either: refused before any training
        main([*base, "--tokenizers", f"a={setup / 'aligned'}", f"b={setup / 'recon'}", "--temperature", "inf"])
    assert "--temperature: must be a finite number >= 0, got inf" in capsys.readouterr().err
