"""The VLM task at LLaVA scale: with ``vlm.features: stream`` DataLoader workers read each batch's images (each rank
its own share) and the frozen tower encodes them inside the step, instead of a whole-set feature cache and a
decode-all at start. Streaming trains exactly as caching does, resumes exactly, and drops a conversation whose image
turns out unreadable mid-run (named, counted) instead of crashing."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from qlip.cli import main
from qlip.factory import create_model
from qlip.train.logger import read_metrics
from qlip.train.tasks.vlm import choose_features
from qlip.train.vlm_data import BatchPlan, PackedRecords
from qlip_testing import write_tiny_run_config

SHAPES = "shapes:easy?sizes=medium,large&image_size=32"
COLORS = {"red": (220, 35, 35), "green": (40, 190, 60), "blue": (30, 60, 210)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny QLIP tower and a LLaVA JSON of 12 conversations (one of them two turns) about real small PNG files."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("vlm-stream")
    torch.manual_seed(0)
    create_model("qlip-tiny").save_pretrained(root / "tok")
    (root / "images").mkdir()
    records = []
    for i in range(12):
        name, rgb = list(COLORS.items())[i % 3]
        img = Image.new("RGB", (40 + i, 36), (250, 250, 250))
        ImageDraw.Draw(img).rectangle((2 * i, 4, 2 * i + 14, 24), fill=rgb)
        img.save(root / "images" / f"{i}.png")
        turns = [{"from": "human", "value": "<image>\nWhat color is the box?"}, {"from": "gpt", "value": name}]
        if i == 5:
            turns += [{"from": "human", "value": "Is it a box?"}, {"from": "gpt", "value": "yes"}]
        records.append({"id": f"c{i}", "image": f"{i}.png", "conversations": turns})
    (root / "conversations.json").write_text(json.dumps(records))
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png after all")
    broken = [*records[:7], {"id": "cbroken", "image": "broken.png", "conversations": records[0]["conversations"]},
              *records[7:11]]  # fmt: skip
    (root / "with-broken.json").write_text(json.dumps(broken))
    return root


def _config(root, run, data: str, **vlm) -> str:
    options = {"tokenizer": str(root / "tok"), "data": data, "width": 32, "depth": 2, "heads": 2, "eval_images": 0,
               "image_pool": 16, **vlm}  # fmt: skip
    if not data.startswith("shapes"):
        options["image_root"] = str(root / "images")
    return write_tiny_run_config(root, run, "vlm", options, stage=2)


NO_EXPORT = ["eval.at_end=false", "checkpoint.export=false"]


def _losses(run) -> list[float]:
    return [r["loss/answer"] for r in read_metrics(run)]


@pytest.mark.parametrize("data", ["llava", "shapes"])
def test_streamed_features_train_as_cached_ones(root, tmp_path, data):
    spec = str(root / "conversations.json") if data == "llava" else SHAPES
    cached, streamed = tmp_path / "cached", tmp_path / "streamed"
    assert main(["train", _config(root, cached, spec, features="cache"), *NO_EXPORT]) == 0
    assert main(["train", _config(root, streamed, spec, features="stream"), "data.num_workers=2", *NO_EXPORT]) == 0
    a, b = _losses(cached), _losses(streamed)
    assert len(a) == 3 and b == pytest.approx(a, rel=1e-5, abs=1e-6)
    accuracy = [[r["vlm/token_accuracy"] for r in read_metrics(run)] for run in (cached, streamed)]
    assert accuracy[0] == accuracy[1]


@pytest.mark.parametrize("features", ["cache", "stream"])
def test_a_resumed_run_continues_exactly(root, tmp_path, features):
    spec = str(root / "conversations.json")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    extra = [*NO_EXPORT, "optim.steps=5"]  # 3 batches of 4 per epoch: the resumed part crosses into epoch 1
    extra += ["data.num_workers=2"] if features == "stream" else []
    assert main(["train", _config(root, whole, spec, features=features), *extra]) == 0
    cfg = _config(root, parts, spec, features=features)
    assert main(["train", cfg, *extra, "stop_at=2", "checkpoint.every=1"]) == 0
    assert main(["train", cfg, *extra]) == 0
    a, b = _losses(whole), _losses(parts)
    assert a == b and len(a) == 5


def test_an_unreadable_image_mid_run_drops_its_conversation_named_and_counted(root, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = _config(root, run, str(root / "with-broken.json"), cache_budget_mb=0)  # auto, over budget: streams
    with caplog.at_level(logging.INFO):
        assert main(["train", cfg, "data.num_workers=1", *NO_EXPORT]) == 0  # 3 batches of 4: every record once
    log = caplog.text
    assert "tower features streamed" in log and "over vlm.cache_budget_mb=0" in log
    assert "record cbroken" in log and "broken.png" in log  # named, when its batch read it: not decoded at start
    metrics = read_metrics(run)
    assert [m["vlm/bad_images"] for m in metrics] == sorted(m["vlm/bad_images"] for m in metrics)
    assert metrics[-1]["vlm/bad_images"] == 1 and len(metrics) == 3


def test_a_cached_run_skips_an_unreadable_image_at_start(root, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(["train", _config(root, run, str(root / "with-broken.json")), *NO_EXPORT]) == 0  # auto: cache
    assert "tower features cached" in caplog.text and "unreadable image" in caplog.text
    assert "broken.png" in caplog.text and "11 conversations" in caplog.text
    assert "vlm/bad_images" not in read_metrics(run)[-1]

def test_auto_caches_a_small_image_set_and_streams_a_large_one():
    assert choose_features("auto", 4000, 16, 32, 4096)[0] == "cache"  # the demo's pool size: 8 MB
    mode, why = choose_features("auto", 665_298, 256, 768, 4096)  # LLaVA-1.5's mix over a B-16 tower
    assert mode == "stream" and "523,212 MB" in why and "over vlm.cache_budget_mb=4096" in why
    assert choose_features("cache", 665_298, 256, 768, 4096)[0] == "cache"  # asked for: kept
    assert choose_features("stream", 10, 16, 32, 4096)[0] == "stream"


def test_each_rank_draws_its_own_share_of_every_epoch():
    plans = [BatchPlan(20, 3, seed=7, rank=r, world_size=2, default_kind="qa") for r in range(2)]
    assert plans[0].per_epoch == 3  # 10 items per rank, batches of 3, the incomplete one dropped
    for epoch in range(2):
        drawn = [torch.cat([p.indices(epoch * 3 + k) for k in range(3)]).tolist() for p in plans]
        assert not set(drawn[0]) & set(drawn[1]) and len(set(drawn[0]) | set(drawn[1])) == 18
    again = BatchPlan(20, 3, seed=7, rank=1, world_size=2, default_kind="qa")
    assert torch.equal(again.indices(4), plans[1].indices(4)) and torch.equal(again.indices(1), plans[1].indices(1))
    assert not torch.equal(plans[1].indices(0), plans[1].indices(3))  # each epoch is another permutation


def test_packed_records_read_back_as_they_were_read():
    from pathlib import Path

    records = [{"image": Path("/data/coco/1.jpg"), "turns": [("<image>\nWhat is it?", "Ein Café, 東京")], "key": "a"},
               {"image": Path("rel/2.png"), "turns": [("<image>\nQ1", "A1"), ("Q2", "A2")], "key": "17"}]  # fmt: skip
    packed = PackedRecords(records)
    assert len(packed) == 2 and list(packed) == records and packed[-1] == records[1]
    assert packed.nbytes < 300
    with pytest.raises(IndexError):
        packed[2]


@pytest.mark.slow
def test_two_fsdp_ranks_stream_their_shares_and_resume_exactly(root, tmp_path):
    """The LLaVA-1.5 stage-2 layout on two CPU ranks: FSDP2 shards the LM, each rank's workers read that rank's
    images and the tower (in the sharded model's root) encodes them in the step; a resumed run continues exactly."""
    from qlip.train.config import load_config
    from train_helpers import join_ranks, start_ranks

    spec = str(root / "conversations.json")
    for name, extra in (("whole", []), ("parts", ["stop_at=2", "checkpoint.every=1"]), ("parts", [])):
        args = ["distributed.strategy=fsdp", "distributed.backend=gloo", "data.num_workers=1", "data.batch_size=2",
                *NO_EXPORT, *extra]  # fmt: skip
        resolved = tmp_path / f"{name}.resolved.yaml"
        load_config(_config(root, tmp_path / name, spec, features="stream"), args).save(resolved)
        join_ranks(start_ranks(resolved, tmp_path / f"{name}-ranks"), tmp_path / f"{name}-ranks")
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "parts")
    assert a == b and len(a) == 3
