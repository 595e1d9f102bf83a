"""`qlip eval ...` end to end on the tiny model with a tokenizer trained on shapes captions."""

from __future__ import annotations

import json

import pytest
import torch

import qlip.cli

torch.set_num_threads(1)


@pytest.fixture()
def qlip_main():
    """The real `qlip` entry point, with the eval commands as it registers them."""
    return qlip.cli.main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import qlip
    from qlip.data.shapes import generate_shapes_sample
    from qlip.tokenizer import train_bpe

    tok = train_bpe([generate_shapes_sample(i)["caption"] for i in range(200)], 600)
    path = tmp_path_factory.mktemp("models") / "tiny"
    torch.manual_seed(0)
    qlip.create_model("qlip-tiny").save_pretrained(path, tokenizer=tok)
    return path


def test_eval_all_on_shapes_writes_the_report(qlip_main, tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss/mse": 1 / (s + 1), "weight/rec": 1e3})
                                                 for s in range(5)))  # fmt: skip
    out = tmp_path / "report"
    code = qlip_main(["eval", "all", "--model", str(tiny_dir), "--data", "shapes", "--limit", "32",
                      "--train-limit", "48", "--task", "shape", "--task", "size", "--out", str(out),
                      "--device", "cpu", "--run-dir", str(run), "--fid-cache", str(tmp_path / "fid")])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "zero-shot" in printed and "linear probe" in printed and "reconstruction" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["zero_shot"]) == {"shape", "size"}
    assert report["zero_shot"]["shape"]["n"] == 32 and "top5" in report["zero_shot"]["shape"]
    assert "top5" not in report["zero_shot"]["size"]  # 2 classes
    assert report["linear_probe"]["shape"]["n_train"] == 48 and report["linear_probe"]["shape"]["features"] == "cls"
    recon = report["recon"]
    assert recon["num_images"] == 32 and recon["psnr"]["available"]
    assert recon["rfid"]["available"] is False and recon["lpips"]["value"] is None
    assert recon["usage"]["num_tokens"] == 32 * 16
    md = (out / "report.md").read_text()
    for name in ("reconstructions", "bit_usage", "confusion_shape", "loss_curves"):
        rel = report["figures"][name]
        assert (out / rel).is_file() and f"]({rel})" in md
    assert "rFID unavailable" in md


def test_single_commands_and_user_errors(qlip_main, tiny_dir, tmp_path, capsys):
    out = tmp_path / "zs"
    assert qlip_main(["eval", "zero-shot", "--model", str(tiny_dir), "--data", "shapes", "--limit", "8",
                      "--task", "color", "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    assert "color" in json.loads((out / "report.json").read_text())["zero_shot"]
    assert qlip_main(["eval", "zero-shot", "--model", "qlip-tiny", "--data", "shapes", "--limit", "8",
                      "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2  # fmt: skip
    assert "tokenizer" in capsys.readouterr().err  # a bare architecture name has no vocabulary
    assert qlip_main(["eval", "zero-shot", "--model", str(tiny_dir), "--data", "shapes", "--task", "smell",
                      "--out", str(tmp_path / "y"), "--device", "cpu"]) == 2  # fmt: skip
    assert "unknown shapes task" in capsys.readouterr().err


def test_zero_shot_and_recon_on_a_class_folder(qlip_main, tiny_dir, image_files, tmp_path, capsys):
    import shutil

    root = tmp_path / "folder" / "val"
    for cls, keys in (("cat", ("rgba",)), ("photo", ("rgb", "jpeg", "gray"))):
        (root / cls).mkdir(parents=True)
        for k in keys:
            shutil.copy(image_files[k], root / cls / image_files[k].name)
    out = tmp_path / "rec"
    assert qlip_main(["eval", "recon", "--model", str(tiny_dir), "--data", str(tmp_path / "folder"),
                      "--out", str(out), "--device", "cpu", "--fid-cache", str(tmp_path / "fid")]) == 0  # fmt: skip
    assert json.loads((out / "report.json").read_text())["recon"]["num_images"] == 4
    out = tmp_path / "zsf"
    assert qlip_main(["eval", "zero-shot", "--model", str(tiny_dir), "--data", str(tmp_path / "folder"),
                      "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    zs = json.loads((out / "report.json").read_text())["zero_shot"]["label"]
    assert zs["classnames"] == ["cat", "photo"] and zs["num_templates"] == 80 and zs["n"] == 4


def test_reports_count_the_samples_each_stage_skipped(qlip_main, tiny_dir, image_files, tmp_path, capsys):
    import shutil

    root = tmp_path / "folder" / "val" / "photo"
    root.mkdir(parents=True)
    for k in ("rgb", "jpeg", "corrupt"):
        shutil.copy(image_files[k], root / image_files[k].name)
    out = tmp_path / "rec"
    assert qlip_main(["eval", "recon", "--model", str(tiny_dir), "--data", str(tmp_path / "folder"), "--quiet",
                      "--out", str(out), "--device", "cpu", "--fid-cache", str(tmp_path / "fid")]) == 0  # fmt: skip
    assert "skipped samples" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["recon"]["num_images"] == 2 and report["skipped_samples"] == {"recon": {"corrupt": 1}}
