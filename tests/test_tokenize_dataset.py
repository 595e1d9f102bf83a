"""`qlip tokenize`: shards read back equal model.encode; an interrupted run resumes without redoing shards."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import qlip
from qlip.data.loader import build_dataset, iter_samples
from qlip.tokenize_dataset import (
    load_manifests,
    read_token_shards,
    tokenize_dataset,
)
from qlip.transforms import image_transform

torch.set_num_threads(1)

SOURCE = "shapes:easy"


@pytest.fixture(scope="module")
def model() -> qlip.QLIP:
    torch.manual_seed(0)
    return qlip.create_model("qlip-tiny", parts=("vision", "quantizer"))


def _expected_tokens(model: qlip.QLIP, spec: str, n: int | None = None, **kw) -> dict[str, torch.Tensor]:
    """key -> indices (h, w), computed sample by sample with the model's own encode."""
    ds = build_dataset(spec, length=n, image_size=model.image_size, **kw) if spec.startswith("shapes") else (
        build_dataset(spec, **kw))  # fmt: skip
    transform = image_transform(model.image_size, train=False)
    out = {}
    for s in iter_samples(ds):
        if "bad" not in s:
            out[s["key"]] = model.encode(transform(s["image"])[None])[0]
    return out


def _read_all(out) -> tuple[torch.Tensor, list[str], list]:
    shards = list(read_token_shards(out))
    return torch.cat([s.indices for s in shards]), [k for s in shards for k in s.keys], [
        c for s in shards for c in s.captions
    ]


def test_shards_read_back_equal_encode(model: qlip.QLIP, tmp_path) -> None:
    result = tokenize_dataset(model, SOURCE, tmp_path, batch_size=4, num_workers=2, shard_size=8, limit=20,
                              progress=False)  # fmt: skip
    assert result.complete and result.images == 20 and result.shards_written == 3
    indices, keys, captions = _read_all(tmp_path)
    assert indices.shape == (20, model.grid_size, model.grid_size) and indices.dtype == torch.int64
    assert len(set(keys)) == 20 and all(isinstance(c, str) and c for c in captions)
    expected = _expected_tokens(model, SOURCE, 20)
    assert set(keys) == set(expected)
    for k, idx in zip(keys, indices):
        assert torch.equal(idx, expected[k]), k
    manifest = load_manifests(tmp_path)[0]
    assert manifest["complete"] and [e["num_samples"] for e in manifest["shards"]] == [8, 8, 4]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupt_and_resume_redoes_nothing(model: qlip.QLIP, tmp_path, workers: int) -> None:
    kw = dict(batch_size=4, num_workers=workers, shard_size=8, limit=28, progress=False)
    whole = tmp_path / "whole"
    tokenize_dataset(model, SOURCE, whole, **kw)

    parts = tmp_path / "parts"
    first = tokenize_dataset(model, SOURCE, parts, stop_after_shards=1, **kw)
    assert not first.complete and first.shards_written == 1 and first.images == 8
    shard0 = parts / load_manifests(parts)[0]["shards"][0]["file"]
    stamp = shard0.stat().st_mtime_ns
    second = tokenize_dataset(model, SOURCE, parts, **kw)
    assert second.complete and second.shards_skipped == 1 and second.images == 20  # 28 - the 8 already done
    assert shard0.stat().st_mtime_ns == stamp  # the finished shard was not rewritten
    a, b = _read_all(whole), _read_all(parts)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]

    third = tokenize_dataset(model, SOURCE, parts, **kw)  # already complete: nothing to do
    assert third.shards_written == 0 and third.images == 0


def test_folder_source_resume_by_index(model: qlip.QLIP, tmp_path) -> None:
    """A class folder (map-style source) with one unreadable file: resumed by dataset index, bad file counted."""
    root = tmp_path / "imgs"
    for c, color in enumerate(["red", "blue"]):
        (root / color).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (40 + i, 36), (200 * (1 - c), 30 * i, 200 * c)).save(root / color / f"{i}.png")
    (root / "red" / "broken.png").write_bytes(b"not a png")
    kw = dict(batch_size=3, num_workers=0, shard_size=3, progress=False)
    first = tokenize_dataset(model, str(root), tmp_path / "t", stop_after_shards=2, **kw)
    second = tokenize_dataset(model, str(root), tmp_path / "t", **kw)
    assert first.shards_written == 2 and second.complete
    indices, keys, _ = _read_all(tmp_path / "t")
    assert len(keys) == 10 and len(set(keys)) == 10
    assert sum(first.bad.values()) + sum(second.bad.values()) == 1
    expected = _expected_tokens(model, str(root))
    for k, idx in zip(keys, indices):
        assert torch.equal(idx, expected[k]), k
    labels = torch.cat([s.labels for s in read_token_shards(tmp_path / "t")])
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5


def test_resume_with_other_settings_is_refused(model: qlip.QLIP, tmp_path) -> None:
    tokenize_dataset(model, SOURCE, tmp_path, batch_size=4, num_workers=0, shard_size=4, limit=8, progress=False,
                     stop_after_shards=1)  # fmt: skip
    with pytest.raises(ValueError, match="settings differ in \\['shard_size'\\]"):
        tokenize_dataset(model, SOURCE, tmp_path, batch_size=4, num_workers=0, shard_size=8, limit=8, progress=False)
    with pytest.raises(ValueError, match="endless stream"):
        tokenize_dataset(model, SOURCE, tmp_path / "x", batch_size=4, num_workers=0, progress=False)


def test_ranks_write_disjoint_shards(model: qlip.QLIP, tmp_path) -> None:
    """Two ranks (as under torchrun) each write their own shards; together they cover the data once."""
    for rank in (0, 1):
        tokenize_dataset(model, SOURCE, tmp_path, batch_size=4, num_workers=0, shard_size=8, limit=16, rank=rank,
                         world_size=2, progress=False)  # fmt: skip
    manifests = load_manifests(tmp_path)
    assert [m["settings"]["rank"] for m in manifests] == [0, 1]
    _, keys, _ = _read_all(tmp_path)
    assert len(keys) == 16 and len(set(keys)) == 16


def test_cli(model: qlip.QLIP, tmp_path, capsys) -> None:
    import qlip.cli as cli

    argv = ["tokenize", "--model", "qlip-tiny", "--data", SOURCE, "--out", str(tmp_path), "--limit", "6",
            "--batch-size", "4", "--workers", "0", "--shard-size", "4", "--device", "cpu", "--mode", "fp32", "--quiet"]
    assert cli.main(argv) == 0
    assert "6 images -> 2 new shard(s)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest-r000.json").read_text())
    assert manifest["complete"] and manifest["settings"]["model"] == "qlip-tiny"
    assert cli.main([*argv[:5], "--out", str(tmp_path / "y"), "--batch-size", "4", "--device", "cpu"]) == 2
    assert "endless stream" in capsys.readouterr().err


def test_resize_and_background_reach_the_tokens(model: qlip.QLIP, tmp_path) -> None:
    """--resize pad / --background: the tokens are those of the padded image, and a resume must use the same."""
    import numpy as np

    root = tmp_path / "imgs" / "logos"
    root.mkdir(parents=True)
    rgba = np.random.default_rng(0).integers(0, 255, (20, 60, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(60) < 30, 255, 0)  # right half transparent
    Image.fromarray(rgba).save(root / "wide.png")
    kw = dict(batch_size=2, num_workers=0, shard_size=2, progress=False)
    tokenize_dataset(model, str(tmp_path / "imgs"), tmp_path / "t", source_options={"background": "black"},
                     resize="pad", **kw)  # fmt: skip
    indices, _, _ = _read_all(tmp_path / "t")
    image = next(iter_samples(build_dataset(str(tmp_path / "imgs"), background="black")))["image"]
    padded = image_transform(model.image_size, train=False, resize="pad", background="black")(image)
    assert torch.equal(indices[0], model.encode(padded[None])[0])
    cropped = image_transform(model.image_size, train=False)(image)
    assert not torch.equal(indices[0], model.encode(cropped[None])[0])
    with pytest.raises(ValueError, match="settings differ in \\['resize'\\]"):
        tokenize_dataset(model, str(tmp_path / "imgs"), tmp_path / "t", source_options={"background": "black"}, **kw)
