"""One evaluation vocabulary: the trainer's checks, `qlip eval` reports and the experiments state the same keys in
the same units; skipped samples and progress of an evaluation stage."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

import qlip
from qlip.data import build_dataloader, build_dataset
from qlip.eval.progress import TrackedBatches
from qlip.eval.recon import evaluate_reconstruction
from qlip.eval.report import write_report
from qlip.eval.schema import USED_BIT_ENTROPY, bits_used, metric_unit, summary_metrics
from qlip.eval.zero_shot import evaluate_zero_shot_tasks
from qlip.train.evaluate import evaluate as trainer_checks
from qlip.transforms import image_transform

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return qlip.create_model("qlip-tiny").eval()


@pytest.fixture(scope="module")
def tokenizer(tiny, tiny_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny.save_pretrained(path, tokenizer=tiny_tokenizer)
    return qlip.get_tokenizer(str(path))  # rows as long as the tiny text tower's context


def shapes_batches(image_size: int, n: int = 12, batch_size: int = 5) -> list[dict]:
    dataset = build_dataset("shapes", split="val", length=n, image_size=64)
    loader = build_dataloader(dataset, batch_size=batch_size, transform=image_transform(image_size, train=False))
    return list(loader)


def test_trainer_checks_and_eval_state_the_same_keys_and_units(tiny, tokenizer, tmp_path):
    batches = shapes_batches(tiny.image_size)
    tasks = {k: v for k, v in build_dataset("shapes", split="val", length=1).tasks.items() if k in ("shape", "size")}
    trainer = trainer_checks(tiny, batches, tokenizer=tokenizer, tasks=tasks, device=torch.device("cpu"),
                             grid_path=tmp_path / "grid.png", grid_images=4)  # fmt: skip

    zero_shot = evaluate_zero_shot_tasks(tiny, tokenizer, batches, tasks, topk=(1, 5))
    recon = evaluate_reconstruction(tiny, batches, keep_examples=0).metrics
    report = {"model": "qlip-tiny", "zero_shot": zero_shot, "recon": recon}
    write_report(report, tmp_path / "report")
    written = json.loads((tmp_path / "report" / "report.json").read_text())["metrics"]

    assert set(trainer) == set(written)  # one vocabulary
    assert {"zs/shape", "zs/size", "zs/mean", "psnr", "ssim", "bits_used", "num_eval"} <= set(trainer)
    for key, value in written.items():
        assert trainer[key] == pytest.approx(value, rel=1e-6), key
    # Percent, not the calculator's share in [0, 1].
    assert trainer["zs/shape"] == pytest.approx(100.0 * zero_shot["shape"]["top1"])
    assert trainer["zs/mean"] == pytest.approx((trainer["zs/shape"] + trainer["zs/size"]) / 2)
    assert trainer["num_eval"] == 12 and 0.0 <= trainer["bits_used"] <= 1.0
    assert (tmp_path / "grid.png").is_file()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Summary" in md and "| zs/shape |" in md and "| % |" in md


def test_units_and_the_used_bit_threshold():
    assert metric_unit("zs/shape") == metric_unit("lp/mean") == metric_unit("stage1/zs/color") == "%"
    assert metric_unit("psnr") == metric_unit("stage1/psnr") == "dB"
    assert metric_unit("bits_used") == "fraction" and metric_unit("code_entropy") == "bits"
    with pytest.raises(KeyError, match="not an evaluation metric"):
        metric_unit("zeroshot/shape")
    assert bits_used([USED_BIT_ENTROPY + 0.01, USED_BIT_ENTROPY, 0.1, 1.0]) == 0.5
    lp = {"shape": {"top1": 0.5, "n_test": 8}, "color": {"top1": 1.0, "n_test": 8}}
    assert summary_metrics(linear_probe=lp) == {"num_eval": 8, "lp/shape": 50.0, "lp/color": 100.0, "lp/mean": 75.0}


def test_a_report_records_skipped_samples_by_reason(tiny, image_files, tmp_path):
    root = tmp_path / "folder"
    for cls, keys in (("cat", ("rgba", "corrupt")), ("photo", ("rgb", "jpeg"))):
        (root / cls).mkdir(parents=True)
        for k in keys:
            shutil.copy(image_files[k], root / cls / image_files[k].name)
    (root / "photo" / "empty.png").write_bytes(b"")
    loader = build_dataloader(build_dataset(str(root)), batch_size=2,
                              transform=image_transform(tiny.image_size, train=False))  # fmt: skip
    stage = TrackedBatches(loader, desc="recon", total=5, progress=False)
    result = evaluate_reconstruction(tiny, stage, keep_examples=0)
    assert result.metrics["num_images"] == stage.images == 3
    assert stage.skipped_counts() == {"corrupt": 1, "empty": 1}

    report = {"model": "qlip-tiny", "recon": result.metrics, "skipped_samples": {"recon": stage.skipped_counts()}}
    write_report(report, tmp_path / "report")
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["skipped_samples"] == {"recon": {"corrupt": 1, "empty": 1}}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Skipped samples" in md
    assert "| recon | corrupt | 1 | truncated or corrupt image data |" in md
    assert "| recon | empty | 1 | zero-byte image file |" in md


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_stage_shows_a_bar_only_on_a_terminal_and_not_when_quiet():
    batches = [{"image": torch.zeros(3, 3, 4, 4), "bad": {}}, {"image": torch.zeros(2, 3, 4, 4), "bad": {"empty": 1}}]
    for stream, progress, shown in ((_Terminal(), True, True), (io.StringIO(), True, False),
                                    (_Terminal(), False, False)):  # fmt: skip
        stage = TrackedBatches(batches, desc="zero-shot", total=6, progress=progress, stream=stream)
        assert [b["image"].shape[0] for b in stage] == [3, 2]
        assert stage.images == 5 and stage.skipped_counts() == {"empty": 1}
        assert ("zero-shot" in stream.getvalue()) is shown
        if shown:  # every sample read, the skipped one too
            assert "6/6" in stream.getvalue() and "skipped=1" in stream.getvalue()
