"""`qlip data openclipart` on a tiny fake package tree: metadata parsing, captions, a broken PNG skipped and
counted, the held-out split, the manifest, the refusal to write into a folder it did not write, and the message
when the packages are not installed."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qlip.cli import main
from qlip.data.captions import CaptionFileDataset
from qlip.data.openclipart import (
    ClipArtMetadata,
    assign_split,
    build_caption,
    cap_per_caption,
    is_file_name_like,
    read_svg_metadata,
)
from qlip.fileio import sha256_file

SVG = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
     xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     width="40" height="30">
  <metadata>
    <rdf:RDF>
      <cc:Work rdf:about="">
        <dc:title>{title}</dc:title>
        <dc:description>{description}</dc:description>
        <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
        <dc:creator><cc:Agent><dc:title>Jane Drawer</dc:title></cc:Agent></dc:creator>
        <cc:license rdf:resource="{license}"/>
      </cc:Work>
    </rdf:RDF>
  </metadata>
  <rect width="40" height="30" fill="red"/>
</svg>
"""

# (category path, name, title, description, keywords, license)
DRAWINGS = [
    ("food", "apple", "Red Apple", "a red apple with a green leaf", ["fruit", "food", "hash", ""], "PD"),
    ("food", "pear_01", "Clipart by Jane Drawer - pear", "", ["fruit", "Jane Drawer"], "PD"),
    ("food", "plum", "plum_drawing_01", "jane@example.org", ["fruit", "purple"], ""),
    ("animals/mammals", "dog", "Dog facing left", "", ["mammal", "animal"], "PD"),
    ("animals", "cat", "Part of the Flat Icon Collection (Wed Aug 25 2004)", "", ["cat", "animal"], "PD"),
    ("animals", "broken", "Broken bird", "", ["bird"], "PD"),
    ("shapes", "tiny", "Tiny dot", "", ["dot"], "PD"),
    ("shapes", "blank", "smiley111", "", ["hash", ""], "PD"),
] + [("shapes", f"star{i}", "Gold star", "", ["star", "shape"], "PD") for i in range(12)]


def _fake_package(root: Path) -> Path:
    """A tree laid out like /usr/share/openclipart: png/<category>/... and svg/<category>/..., plus a symlink that
    files a drawing under a second category, a PNG without SVG, a corrupt PNG and one too small."""
    rng = np.random.default_rng(0)
    for folder, name, title, description, keywords, license_ in DRAWINGS:
        (root / "png" / folder).mkdir(parents=True, exist_ok=True)
        (root / "svg" / folder).mkdir(parents=True, exist_ok=True)
        png = root / "png" / folder / f"{name}.png"
        side = (8, 8) if name == "tiny" else (60, 40)
        rgba = rng.integers(0, 255, (*side[::-1], 4), dtype=np.uint8)
        rgba[..., 3] = 0
        rgba[5:-5, 5:-5, 3] = 255  # a drawing on a transparent canvas
        Image.fromarray(rgba, "RGBA").save(png)
        if name == "broken":  # cut short, as a failed download leaves it
            png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
        lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
        lic = {"PD": "http://web.resource.org/cc/PublicDomain", "": ""}[license_]
        (root / "svg" / folder / f"{name}.svg").write_text(SVG.format(title=title, description=description,
                                                                      keywords=lis, license=lic))  # fmt: skip
    (root / "png" / "recreation").mkdir()
    (root / "png" / "recreation" / "apple.png").symlink_to(root / "png" / "food" / "apple.png")
    Image.new("RGB", (50, 50), "blue").save(root / "png" / "shapes" / "orphan.png")
    return root


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return _fake_package(tmp_path_factory.mktemp("openclipart"))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_metadata_and_captions(package):
    meta = read_svg_metadata(package / "svg" / "food" / "apple.svg")
    assert meta == ClipArtMetadata("Red Apple", "a red apple with a green leaf", ["fruit", "food", "hash", ""],
                                   "http://web.resource.org/cc/PublicDomain", "Jane Drawer")  # fmt: skip
    assert build_caption(meta)[0] == "red apple. a red apple with a green leaf. fruit, food."
    # the byline goes, the author is no keyword
    assert build_caption(read_svg_metadata(package / "svg" / "food" / "pear_01.svg"))[0] == "pear. fruit."
    # a file-name title and an e-mail address say nothing about the drawing
    assert build_caption(read_svg_metadata(package / "svg" / "food" / "plum.svg"))[0] == "fruit, purple."
    assert build_caption(read_svg_metadata(package / "svg" / "animals" / "cat.svg"))[0] == "cat, animal."
    assert build_caption(read_svg_metadata(package / "svg" / "shapes" / "blank.svg"))[0] == ""
    assert build_caption(ClipArtMetadata("Gold star", keywords=["star"]), frozenset({"gold star"}))[0] == "star."
    assert build_caption(ClipArtMetadata("Scrub_Brush", keywords=["tool"]))[0] == "scrub brush. tool."
    assert build_caption(ClipArtMetadata("jigsaw_red_10", keywords=["jigsaw"]))[0] == "jigsaw."
    for name in ("jigsaw_red_10", "smiley111", "button-green", "arrow.svg", "fc23", "blueman#305"):
        assert is_file_name_like(name), name
    for name in ("Red Apple", "Ice Cream Cone (1 scoop)", "stick man"):
        assert not is_file_name_like(name), name


def test_split_holds_out_whole_captions_and_the_cap_keeps_a_few_per_caption():
    rows = [{"image": f"images/x{i}.png", "caption": f"caption {i % 50}"} for i in range(400)]
    assign_split(rows, 0.3)
    train = {r["caption"] for r in rows if r["split"] == "train"}
    held = {r["caption"] for r in rows if r["split"] == "heldout"}
    assert held and not train & held and len(train | held) == 50
    assert 5 <= len(held) <= 25  # about 30% of the 50 captions
    kept, dropped = cap_per_caption(rows, 3)
    assert len(kept) == 150 and len(dropped) == 250 and max(Counter(r["caption"] for r in kept).values()) == 3
    assert [r for r in rows if r in kept] == kept  # the order is kept
    assert cap_per_caption(rows, 0) == (rows, [])


def test_openclipart_command(package, tmp_path, capsys):
    def argv(out: Path) -> list[str]:
        return ["data", "openclipart", "--src", str(package), "--out", str(out), "--size", "32", "--min-side", "16",
                "--heldout-fraction", "0.3", "--max-per-caption", "5", "--quiet"]  # fmt: skip

    out = tmp_path / "clipart"
    assert main(argv(out)) == 1  # the corrupt PNG is bad data: named, counted, skipped
    captured = capsys.readouterr()
    assert "skipped animals/broken.png: corrupt" in captured.err
    assert "skipped 11 of 21 (1 corrupt, 7 duplicate_caption, 1 no_caption, 1 no_svg, 1 too_small)" in captured.out

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["found"] == 21 and manifest["images"] == 10 and manifest["complete"]
    assert manifest["skipped"] == {"corrupt": 1, "duplicate_caption": 7, "no_caption": 1, "no_svg": 1, "too_small": 1}
    assert {"png": "shapes/tiny.png", "reason": "too_small", "detail": "8x8 is under --min-side 16"} in (
        manifest["skipped_files"])  # fmt: skip
    assert manifest["categories"] == {"animals": 2, "food": 3, "shapes": 5}  # the symlinked copy counted once
    for name in ("train.csv", "heldout.csv"):
        assert manifest["files"][name]["sha256"] == sha256_file(out / name)
    train, held = _rows(out / "train.csv"), _rows(out / "heldout.csv")
    assert len(train) + len(held) == 10 and held and train
    assert list(train[0]) == ["image", "caption", "category", "title", "keywords", "license", "source"]
    assert not {r["caption"] for r in train} & {r["caption"] for r in held}
    assert {r["caption"] for r in train + held if r["title"] == "Gold star"} == {"gold star. shape."}
    apple = next(r for r in train + held if r["source"] == "png/food/apple.png")
    assert apple["category"] == "food" and apple["license"] == "http://web.resource.org/cc/PublicDomain"
    plum = next(r for r in train + held if r["source"] == "png/food/plum.png")
    assert plum["license"].startswith("public domain")
    image = Image.open(out / apple["image"])
    assert image.size == (32, 32) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)  # the transparent canvas and the padding are white
    ds = CaptionFileDataset(out / "train.csv", label_key="category")  # a caption list the trainer and eval read
    assert ds[0]["image"].size == (32, 32) and ds.classnames

    # Deterministic: a second run in its own folder writes the same lists; rerunning into its own folder works.
    again = tmp_path / "again"
    assert main(argv(again)) == 1
    assert json.loads((again / "manifest.json").read_text())["files"] == manifest["files"]
    assert main(argv(out)) == 1
    capsys.readouterr()

    # A folder it did not write is refused, and left as it was.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(argv(other)) == 2
    assert "not empty and was not written by qlip data openclipart" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_missing_package_says_how_to_install(tmp_path, capsys):
    assert main(["data", "openclipart", "--src", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "apt install openclipart-png openclipart-svg" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_clipart_recipe_parses_with_augmentation_that_keeps_captions_true():
    from qlip.train.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "real-small.yaml")
    assert cfg.data.hflip == "caption" and cfg.data.crop_scale == [0.6, 1.0] and cfg.data.augment
    assert cfg.data.train.endswith("train.csv") and cfg.data.val.endswith("heldout.csv")
