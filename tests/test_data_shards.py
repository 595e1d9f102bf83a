"""Tests for tar shards: brace expansion, write/read round trip, bad members, rank x worker split, exact resume."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from qlip.data import (
    BadSampleCounter,
    ShapesConfig,
    ShardDataset,
    ShardWriter,
    StreamTracker,
    build_dataloader,
    expand_braces,
    generate_shapes_sample,
    is_bad,
    list_shards,
)
from qlip.data.loader import SampleCollator
from qlip.transforms import image_transform

torch.set_num_threads(1)
CFG = ShapesConfig.preset("easy", image_size=32)


def _write(out, n, shard_size, fmt="png"):
    with ShardWriter(out, shard_size=shard_size, image_format=fmt) as writer:
        for i in range(n):
            writer.write(generate_shapes_sample(i, CFG))
    return json.loads((out / "manifest.json").read_text())


def _keys(items):
    return [s["key"] for s in items]


def test_expand_braces():
    assert expand_braces("data-{000..003}.tar") == [f"data-{i:03d}.tar" for i in range(4)]
    assert expand_braces("d{8..10}.tar") == ["d8.tar", "d9.tar", "d10.tar"]
    assert expand_braces("{a,b}/x-{0..1}.tar") == ["a/x-0.tar", "a/x-1.tar", "b/x-0.tar", "b/x-1.tar"]
    assert expand_braces("x-{2..0}.tar::y.tar") == ["x-2.tar", "x-1.tar", "x-0.tar", "y.tar"]
    assert len(expand_braces("data-{000000..000999}.tar")) == 1000
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="braces"):
        expand_braces("x-{oops}.tar")


def test_round_trip_and_manifest(tmp_path):
    manifest = _write(tmp_path / "s", 10, shard_size=4)
    assert manifest["total"] == 10 and [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    for entry in manifest["shards"]:
        raw = (tmp_path / "s" / entry["name"]).read_bytes()
        assert entry["bytes"] == len(raw) and entry["sha256"] == hashlib.sha256(raw).hexdigest()
    assert list_shards(str(tmp_path / "s" / "data-{000000..000002}.tar")) == list_shards(tmp_path / "s")
    items = list(ShardDataset(str(tmp_path / "s")))
    assert len(items) == 10 and not any(is_bad(s) for s in items)
    for i, s in enumerate(items):
        ref = generate_shapes_sample(i, CFG)
        assert s["key"] == ref["key"] and s["caption"] == ref["caption"] and s["label"] == ref["label"]
        assert s["labels"] == ref["labels"]
        assert np.array_equal(np.asarray(s["image"]), np.asarray(ref["image"]))  # PNG is lossless
    with pytest.raises(FileNotFoundError, match="1 of 4 shards do not exist"):
        ShardDataset(str(tmp_path / "s" / "data-{000000..000003}.tar"))


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_bad_members_are_counted_not_raised(tmp_path):
    png = io.BytesIO()
    Image.fromarray(skdata.astronaut()).resize((40, 40)).save(png, "PNG")
    jpg = io.BytesIO()
    Image.fromarray(skdata.coffee()).resize((60, 40)).save(jpg, "JPEG")
    gray = io.BytesIO()
    Image.fromarray(skdata.camera()).resize((40, 40)).save(gray, "PNG")
    with tarfile.open(tmp_path / "bad-0.tar", "w") as tar:
        _add(tar, "a.png", png.getvalue())
        _add(tar, "a.txt", b"an astronaut")
        _add(tar, "b.jpg", jpg.getvalue()[:300])  # corrupt image
        _add(tar, "b.txt", b"coffee")
        _add(tar, "c.png", png.getvalue())  # no caption
        _add(tar, "d.png", png.getvalue())
        _add(tar, "d.txt", b"caf\xe9")  # not UTF-8
        _add(tar, "e.txt", b"caption without image")
        _add(tar, "f.webp", b"")  # zero bytes
        _add(tar, "f.txt", b"empty")
        _add(tar, "g.png", gray.getvalue())  # grayscale: converted, kept
        _add(tar, "g.json", json.dumps({"caption": "a cameraman", "label": 3}).encode())
        _add(tar, "h.png", png.getvalue())
        _add(tar, "h.txt", b"the last one")
    raw = (tmp_path / "bad-0.tar").read_bytes()
    cut = raw.rfind(png.getvalue()[:64])  # cut inside the last image's data
    (tmp_path / "bad-1.tar").write_bytes(raw[: cut + 100])
    (tmp_path / "bad-2.tar").write_bytes(b"")  # a zero-byte shard
    counter = BadSampleCounter(max_bad_fraction=1.0)
    items = list(ShardDataset(str(tmp_path / "bad-{0..2}.tar")))
    for item in items:
        counter.record(item)
    good = [s for s in items if not is_bad(s)]
    # bad-1 is bad-0 cut inside its last image: the same samples up to there, then one truncated marker.
    captions = [s["caption"] for s in good]
    assert captions == ["an astronaut", "a cameraman", "the last one", "an astronaut", "a cameraman"]
    assert good[1]["label"] == 3 and good[1]["image"].mode == "RGB"
    assert counter.counts == {"corrupt": 2, "missing_caption": 2, "non_utf8_caption": 2, "missing_image": 2,
                              "empty": 2, "truncated_tar": 1, "bad_shard": 1}  # fmt: skip


def _all_slots(ds_factory, world, workers):
    """Read every (rank, worker) slot of one epoch the way DataLoader workers would."""
    from unittest import mock

    out = []
    for rank in range(world):
        for worker in range(workers):
            info = mock.Mock(id=worker, num_workers=workers)
            with mock.patch("torch.utils.data.get_worker_info", return_value=info):
                out.append(_keys(ds_factory(rank, world)))
    return out


@pytest.mark.parametrize("shard_size", [3, 10])  # 8 shards (split by shard) or 3 shards (split by sample)
def test_ranks_and_workers_cover_every_sample_once(tmp_path, shard_size):
    _write(tmp_path / "s", 23, shard_size=shard_size)
    expected = sorted(generate_shapes_sample(i, CFG)["key"] for i in range(23))
    for shuffle, buffer in [(False, 0), (True, 5)]:
        def make(rank, world, shuffle=shuffle, buffer=buffer):
            return ShardDataset(str(tmp_path / "s"), shuffle=shuffle, shuffle_buffer=buffer, epoch=1, rank=rank,
                                world_size=world)  # fmt: skip

        parts = _all_slots(make, world=2, workers=2)
        assert all(parts)
        assert sorted(k for p in parts for k in p) == expected
    # Shuffling changes the order between epochs but not the content.
    e0 = _keys(ShardDataset(str(tmp_path / "s"), shuffle=True, shuffle_buffer=5, epoch=0))
    e1 = _keys(ShardDataset(str(tmp_path / "s"), shuffle=True, shuffle_buffer=5, epoch=1))
    assert e0 != e1 and sorted(e0) == sorted(e1) == expected


def test_real_dataloader_two_workers_covers_once(tmp_path):
    _write(tmp_path / "s", 14, shard_size=2)
    keys = []
    for rank in range(2):
        ds = ShardDataset(str(tmp_path / "s"), rank=rank, world_size=2, shuffle=True, shuffle_buffer=3)
        loader = build_dataloader(ds, batch_size=3, transform=image_transform(32), num_workers=2)
        for batch in loader:
            keys += batch["key"]
    assert sorted(keys) == sorted(generate_shapes_sample(i, CFG)["key"] for i in range(14))


@pytest.mark.parametrize("shard_size,buffer", [(5, 0), (5, 4), (2, 7)])
def test_resume_mid_shard_neither_repeats_nor_skips(tmp_path, shard_size, buffer):
    _write(tmp_path / "s", 17, shard_size=shard_size)

    def make():
        return ShardDataset(str(tmp_path / "s"), shuffle=True, shuffle_buffer=buffer, seed=7, endless=True)

    collate = SampleCollator(image_transform(32))
    full_stream = iter(make())
    reference = _keys(next(full_stream) for _ in range(40))  # two epochs and a bit
    tracker = StreamTracker()
    stream = iter(make())
    consumed = []
    for _ in range(3):  # 3 batches of 5: stop mid-shard and mid-block (15 is not a multiple of 4 or 7)
        batch = collate([next(stream) for _ in range(5)])
        tracker.update(batch)
        consumed += batch["key"]
    state = json.loads(json.dumps(tracker.state_dict()))  # survives a JSON checkpoint
    resumed = make()
    resumed.load_state_dict(state)
    it = iter(resumed)
    consumed += _keys(next(it) for _ in range(25))
    assert consumed == reference
    with pytest.raises(ValueError, match="same world size"):
        other = ShardDataset(str(tmp_path / "s"), rank=0, world_size=2)
        other.load_state_dict(state)
        next(iter(other))


def test_resume_through_dataloader_workers(tmp_path):
    _write(tmp_path / "s", 30, shard_size=3)

    def loader(state=None):
        ds = ShardDataset(str(tmp_path / "s"), shuffle=True, shuffle_buffer=4, seed=1)
        if state is not None:
            ds.load_state_dict(state)
        return build_dataloader(ds, batch_size=2, transform=image_transform(32), num_workers=2)

    tracker = StreamTracker()
    consumed = []
    for i, batch in enumerate(loader()):  # workers prefetch ahead; only consumed batches are tracked
        tracker.update(batch)
        consumed += batch["key"]
        if i == 4:  # worker 0 gave 3 batches (6 samples), worker 1 two (4): both stop inside a block of 4
            break
    assert tracker.state_dict()["slots"] == {0: [0, 6], 1: [0, 4]}
    consumed += [k for batch in loader(tracker.state_dict()) for k in batch["key"]]
    assert len(consumed) == len(set(consumed)) == 30
    uninterrupted = [k for batch in loader() for k in batch["key"]]
    assert sorted(consumed) == sorted(uninterrupted)
