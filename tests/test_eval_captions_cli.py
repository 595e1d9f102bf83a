"""`qlip eval` on a caption list of real images: retrieval, a label column for zero-shot and the probe, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import qlip.cli

torch.set_num_threads(1)

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import qlip
    from qlip.tokenizer import train_bpe

    words = [f"a {c} {s} picture of a thing" for c in COLORS for s in ("small", "large", "bright", "dark")]
    tok = train_bpe(words * 5, 600)
    path = tmp_path_factory.mktemp("models") / "tiny"
    torch.manual_seed(0)
    qlip.create_model("qlip-tiny").save_pretrained(path, tokenizer=tok)
    return path


@pytest.fixture()
def pairs(tmp_path):
    """12 images in 3 categories, the first 4 with two captions each, and one row whose image is missing."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = ["file,caption,category"]
    for i in range(12):
        color = list(COLORS)[i % 3]
        pixels = np.clip(np.array(COLORS[color]) + rng.integers(-20, 20, (40 + i, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,a {color} picture number {i},{color}")
        if i < 4:
            rows.append(f"img/{i}.png,a bright {color} thing,{color}")
    rows.append("img/missing.png,a picture that is not there,red")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


def test_retrieval_on_a_caption_list_names_and_skips_missing_images(tiny_dir, pairs, tmp_path, capsys):
    out = tmp_path / "ret"
    code = qlip.cli.main(["eval", "retrieval", "--model", str(tiny_dir), "--data", str(pairs), "--out", str(out),
                          "--device", "cpu", "--quiet", "--batch-size", "5"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1  # bad data: the readable pairs are evaluated, the missing image is named and counted
    assert "skipped 1 of 17 samples: 1 missing file (img/missing.png)" in captured.err
    report = json.loads((out / "report.json").read_text())
    r = report["retrieval"]
    assert r["num_images"] == 12 and r["num_captions"] == 16
    assert r["chance"]["t2i"]["R@1"] == pytest.approx(1 / 12)
    assert set(r["i2t"]) == {"R@1", "R@5", "R@10", "mean_rank", "median_rank"}
    assert report["metrics"]["t2i/r10"] == pytest.approx(100 * r["t2i"]["R@10"])
    assert report["metrics"]["i2t/mean_rank"] == pytest.approx(r["i2t"]["mean_rank"])
    assert "image->text" in captured.out and "chance" in captured.out
    assert "## Retrieval" in (out / "report.md").read_text()


def test_label_column_labels_a_caption_list_for_zero_shot_and_the_probe(tiny_dir, pairs, tmp_path, capsys):
    out = tmp_path / "zs"
    assert qlip.cli.main(["eval", "zero-shot", "--model", str(tiny_dir), "--data", str(pairs), "--out", str(out),
                          "--label-column", "category", "--templates", str(_templates(tmp_path)), "--device", "cpu",
                          "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    zs = json.loads((out / "report.json").read_text())["zero_shot"]["label"]
    assert zs["classnames"] == ["blue", "green", "red"]
    assert zs["n"] == 12  # one sample per image, however many captions it has; the missing image skipped
    assert zs["majority"] == pytest.approx(4 / 12)
    assert "majority %" in printed and "chance %" in printed
    out = tmp_path / "lp"
    assert qlip.cli.main(["eval", "linear-probe", "--model", str(tiny_dir), "--data", str(pairs), "--out", str(out),
                          "--label-column", "category", "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    lp = json.loads((out / "report.json").read_text())["linear_probe"]["label"]
    assert lp["num_classes"] == 3 and lp["n_test"] == 4 and lp["n_train"] == 8 and "majority" in lp
    assert "majority %" in (out / "report.md").read_text()


def _templates(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a {} picture\n")
    return path


def test_caption_list_mistakes_are_one_line(tiny_dir, pairs, tmp_path, capsys):
    main = qlip.cli.main
    assert main(["eval", "zero-shot", "--model", str(tiny_dir), "--data", str(pairs), "--label-column", "kind",
                 "--out", str(tmp_path / "a"), "--device", "cpu"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "no label column named 'kind'" in err and "'category'" in err and "Traceback" not in err
    empty = tmp_path / "empty.csv"
    empty.write_text("file,caption\n")
    assert main(["eval", "retrieval", "--model", str(tiny_dir), "--data", str(empty), "--out", str(tmp_path / "b"),
                 "--device", "cpu"]) == 2  # fmt: skip
    assert "has no rows" in capsys.readouterr().err
    gone = tmp_path / "gone.csv"
    gone.write_text("file,caption\nnope/1.png,a thing\nnope/2.png,another thing\n")
    assert main(["eval", "retrieval", "--model", str(tiny_dir), "--data", str(gone), "--out", str(tmp_path / "c"),
                 "--device", "cpu", "--quiet"]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "2 missing file (nope/1.png, nope/2.png)" in err[-1]
    assert main(["eval", "retrieval", "--model", str(tiny_dir), "--data", "shapes", "--out", str(tmp_path / "d"),
                 "--device", "cpu"]) == 2  # fmt: skip
    assert "shapes captions repeat" in capsys.readouterr().err


def test_retrieval_counts_the_captions_cut_to_the_context(tiny_dir, caplog):
    import logging

    import qlip
    from qlip.eval.retrieval import evaluate_retrieval

    model, tok = qlip.create_model(str(tiny_dir)).eval(), qlip.get_tokenizer(str(tiny_dir))
    size = model.image_size
    batches = [{"image": torch.randn(2, 3, size, size), "key": ["a", "b"], "caption": ["a red thing", "red " * 40]},
               {"image": torch.randn(1, 3, size, size), "key": ["a"], "caption": ["green " * 40]}]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="qlip.eval.retrieval"):
        result = evaluate_retrieval(model, batches, tokenizer=tok)
    assert result["num_images"] == 2 and result["num_captions"] == 3  # "a" has two captions
    assert caplog.text.count("2 of 3 captions were longer than the 32-token context and were truncated") == 1
