"""Tests for `qlip data write-shards / check / preview` through the argparse entry point."""

import json

from PIL import Image
from skimage import data as skdata

from qlip.cli import build_parser, main
from qlip.data import ShardDataset, generate_shapes_sample
from qlip.data.shapes import ShapesConfig


def test_data_commands_are_registered():
    parser = build_parser()
    for argv in (["data", "check", "x"], ["data", "write-shards", "x", "--out", "o"], ["data", "preview"]):
        assert callable(parser.parse_args(argv).func)


def test_write_shards_from_shapes_then_check(tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["data", "write-shards", "shapes:easy", "--count", "11", "--shard-size", "4", "--image-size", "32",
                 "--split", "val", "--out", str(out)]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 11 and [s["count"] for s in manifest["shards"]] == [4, 4, 3]
    keys = [s["key"] for s in ShardDataset(str(out))]
    cfg = ShapesConfig.preset("easy", image_size=32)
    assert keys == [generate_shapes_sample(i, cfg, split="val")["key"] for i in range(11)]
    assert main(["data", "check", str(out), "--json", str(tmp_path / "report.json")]) == 0
    text = capsys.readouterr().out
    assert "11 samples, 11 good, 0 bad" in text and "width: min 32" in text
    assert json.loads((tmp_path / "report.json").read_text())["good"] == 11


def test_check_reports_every_bad_file_and_fails(tmp_path, capsys):
    root = tmp_path / "folder" / "cats"
    root.mkdir(parents=True)
    Image.fromarray(skdata.chelsea()).save(root / "chelsea.jpg")
    Image.fromarray(skdata.camera()).save(root / "camera.png")
    (root / "broken.jpg").write_bytes((root / "chelsea.jpg").read_bytes()[:500])
    (root / "empty.png").write_bytes(b"")
    assert main(["data", "check", str(tmp_path / "folder")]) == 1  # bad data: named, counted, exit 1
    text = capsys.readouterr().out
    assert "4 samples, 2 good, 2 bad" in text
    assert "BAD cats/broken.jpg: corrupt" in text and "BAD cats/empty.png: empty" in text
    assert "width: min 451" in text and "max 512" in text
    # Bad files are skipped by write-shards and recorded in the manifest.
    assert main(["data", "write-shards", str(tmp_path / "folder"), "--out", str(tmp_path / "s"),
                 "--caption-template", "a photo of {}", "--format", "jpg"]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["total"] == 2 and manifest["source"]["bad"] == {"corrupt": 1, "empty": 1}


def test_preview_writes_png(tmp_path):
    out = tmp_path / "preview.png"
    assert main(["data", "preview", "shapes:hard", "--n", "6", "--cols", "3", "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.size[0] == 3 * (128 + 8) + 8 and img.size[1] > 2 * 128


def test_preview_shows_the_images_the_source_holds(tmp_path, capsys):
    """A caption list, a class folder and shards written from it: each cell shows that file's own color."""
    colors = [(230, 20, 20), (20, 200, 30), (30, 30, 220)]
    (tmp_path / "img" / "warm").mkdir(parents=True)
    (tmp_path / "img" / "cold").mkdir(parents=True)
    rows = ["file,caption"]
    for i, color in enumerate(colors):
        folder = "warm" if i == 0 else "cold"
        Image.new("RGB", (60 + 20 * i, 40), color).save(tmp_path / "img" / folder / f"{i}.png")  # not square
        rows.append(f"img/{folder}/{i}.png,picture {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    side = 32 * 2

    def cells(out):
        grid = Image.open(out).convert("RGB")
        return [grid.getpixel((8 + i * (side + 8) + side // 2, 8 + side // 2)) for i in range(3)]

    out = tmp_path / "captions.png"
    assert main(["data", "preview", str(tmp_path / "pairs.csv"), "--n", "3", "--cols", "3", "--image-size", "32",
                 "--out", str(out)]) == 0  # fmt: skip
    assert f"wrote 3 {tmp_path / 'pairs.csv'} samples" in capsys.readouterr().out
    assert cells(out) == colors
    assert main(["data", "preview", str(tmp_path / "img"), "--n", "3", "--cols", "3", "--image-size", "32",
                 "--out", str(out)]) == 0  # fmt: skip
    assert cells(out) == [colors[1], colors[2], colors[0]]  # class folders in sorted order: cold, then warm
    assert main(["data", "write-shards", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "shards")]) == 0
    assert main(["data", "preview", str(tmp_path / "shards"), "--n", "3", "--cols", "3", "--image-size", "32",
                 "--out", str(out)]) == 0  # fmt: skip
    assert cells(out) == colors
    (tmp_path / "pairs.csv").write_text("file,caption\nimg/gone.png,a picture\n" + "\n".join(rows[1:]) + "\n")
    assert main(["data", "preview", str(tmp_path / "pairs.csv"), "--n", "3", "--cols", "3", "--image-size", "32",
                 "--out", str(out)]) == 1  # the three readable images drawn, the missing one named
    assert "img/gone.png (missing_file)" in capsys.readouterr().err and cells(out) == colors
