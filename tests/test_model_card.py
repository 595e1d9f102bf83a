"""Model cards and ``qlip hub``: what a published repo holds, and that nothing the user wrote is replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import qlip
from qlip.cli import main
from qlip.model_card import CARD_MARKER, ModelCardError, write_card
from qlip_testing import randomize_

RUN_CONFIG = "model:\n  name: qlip-tiny\noptim:\n  lr: 0.00123\n"
REPORT = {"model": "m", "metrics": {"zs/shape": 97.4, "psnr": 29.93875, "num_eval": 500}}


@pytest.fixture()
def run_dir(tmp_path, tiny_tokenizer):
    """A training run as the trainer leaves it: RUN/config.yaml and the exported model RUN/last."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(RUN_CONFIG)
    model = randomize_(qlip.create_model("qlip-tiny"))
    model.save_pretrained(run / "last", tokenizer=tiny_tokenizer)
    return run


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_save_pretrained_writes_a_card_with_front_matter_and_the_model_facts(run_dir):
    card = (run_dir / "last" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "qlip"
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "zero-shot-image-classification"
    assert "visual-tokenizer" in meta["tags"]
    assert CARD_MARKER in card
    cfg = qlip.get_model_config("qlip-tiny")
    assert f"| bits per token | {cfg.quantizer.dim} " in card
    assert f"| token grid | {cfg.vision.grid_size} x {cfg.vision.grid_size} " in card
    assert f"| compression ratio | {cfg.compression_ratio:.1f} " in card
    assert f"| image size | {cfg.vision.image_size} x {cfg.vision.image_size} |" in card
    assert "lr: 0.00123" in card  # the run's training config
    assert "qlip.create_model_and_transforms" in card
    assert "## Evaluation" not in card  # no report: no numbers


def test_save_pretrained_refreshes_its_own_card_and_never_replaces_a_foreign_readme(tmp_path):
    model = randomize_(qlip.create_model("qlip-tiny"))
    target = tmp_path / "m"
    model.save_pretrained(target)
    (target / "README.md").write_text((target / "README.md").read_text().replace("# qlip-tiny", "# old title"))
    model.save_pretrained(target)
    assert "# qlip-tiny" in (target / "README.md").read_text()  # ours: rewritten
    (target / "README.md").write_text("# my own notes\n")
    model.save_pretrained(target)
    assert (target / "README.md").read_text() == "# my own notes\n"  # theirs: kept
    assert qlip.create_model(str(target)) is not None


def test_a_yaml_file_that_is_not_a_training_config_stays_out_of_the_card(tmp_path):
    (tmp_path / "config.yaml").write_text("secret: value\n")
    model = randomize_(qlip.create_model("qlip-tiny"))
    card = (model.save_pretrained(tmp_path / "m") / "README.md").read_text()
    assert "secret" not in card and "## Training config" not in card


def test_card_shows_the_numbers_of_an_eval_report(run_dir, tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(REPORT))
    assert main(["hub", "card", str(run_dir / "last"), "--report", str(report), "--license", "mit"]) == 0
    card = (run_dir / "last" / "README.md").read_text()
    assert front_matter(card)["license"] == "mit"
    assert "| `zs/shape` | 97.4 | % |" in card
    assert "| `psnr` | 29.94 | dB |" in card
    assert "| `num_eval` | 500 | count |" in card


def test_a_report_in_the_model_directory_is_cited_without_asking(run_dir):
    (run_dir / "last" / "report.json").write_text(json.dumps(REPORT))
    assert main(["hub", "card", str(run_dir / "last")]) == 0
    assert "| `zs/shape` | 97.4 | % |" in (run_dir / "last" / "README.md").read_text()


def test_card_refuses_a_foreign_readme_and_a_bad_report(run_dir, tmp_path, capsys):
    readme = run_dir / "last" / "README.md"
    readme.write_text("# hand-written\n")
    with pytest.raises(ModelCardError, match="not written by qlip"):
        write_card(readme, "new")
    assert main(["hub", "card", str(run_dir / "last")]) == 2
    assert "not written by qlip" in capsys.readouterr().err
    assert readme.read_text() == "# hand-written\n"
    readme.unlink()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"metrics": {}}))
    assert main(["hub", "card", str(run_dir / "last"), "--report", str(bad)]) == 2
    assert 'no "metrics"' in capsys.readouterr().err


def test_hub_push_dry_run_writes_the_repo_folder(run_dir, tmp_path, capsys):
    out = tmp_path / "hub"
    argv = ["hub", "push", str(run_dir / "last"), "--repo", "alice/qlip-tiny", "--dry-run", "--out", str(out)]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "merges.txt", "model.safetensors", "special_tokens_map.json",
                     "tokenizer_config.json", "vocab.json"]  # fmt: skip
    card = (out / "README.md").read_text()
    assert "# qlip-tiny" in card and 'create_model_and_transforms("hf-hub:alice/qlip-tiny")' in card
    assert "nothing uploaded" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == (run_dir / "last" / "model.safetensors").read_bytes()
    reloaded = qlip.create_model(str(out))
    assert reloaded.cfg == qlip.create_model(str(run_dir / "last")).cfg
    # a second run never writes into a folder that holds something
    assert main(["hub", "push", str(run_dir / "last"), "--repo", "alice/x", "--dry-run", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_hub_push_keeps_the_model_directorys_own_readme(run_dir, tmp_path):
    (run_dir / "last" / "README.md").write_text("# my card\n")
    out = tmp_path / "hub"
    assert main(["hub", "push", str(run_dir / "last"), "--repo", "a/b", "--dry-run", "--out", str(out)]) == 0
    assert (out / "README.md").read_text() == "# my card\n"


def test_hub_push_of_a_generator_directory_carries_its_qlip_model(tmp_path, tiny_tokenizer):
    from qlip.generation import T2IConfig, T2IModel, save_generator
    from qlip.tokenfile import TokenSpec

    q = randomize_(qlip.create_model("qlip-tiny"))
    cfg = T2IConfig.for_tokenizer(TokenSpec.of(q), text=q.cfg.text, width=32, depth=1, heads=2)
    save_generator(tmp_path / "gen", T2IModel(cfg, text_encoder=q.text), q, tiny_tokenizer)
    out = tmp_path / "hub"
    assert main(["hub", "push", str(tmp_path / "gen"), "--repo", "a/t2i", "--dry-run", "--out", str(out)]) == 0
    assert (out / "qlip" / "model.safetensors").is_file() and (out / "model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert front_matter(card)["pipeline_tag"] == "text-to-image"
    assert 'qlip.generation.load("hf-hub:a/t2i")' in card
    assert qlip.generation.load(out) is not None


def test_hub_push_offline_is_one_line_and_exit_2(run_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hub"
    assert main(["hub", "push", str(run_dir / "last"), "--repo", "alice/qlip-tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline" in err and "--dry-run" in err
    assert not out.exists()  # nothing written when nothing can be pushed


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records the calls, or fails like a machine without a network."""

    calls: list = []
    fail: Exception | None = None

    def create_repo(self, repo_id, **kwargs):
        if FakeApi.fail is not None:
            raise FakeApi.fail
        FakeApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, **kwargs):
        FakeApi.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))


def test_hub_push_uploads_the_assembled_folder(run_dir, monkeypatch, capsys):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    import qlip.hub

    monkeypatch.setattr(qlip.hub, "hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(FakeApi, "calls", [])
    assert main(["hub", "push", str(run_dir / "last"), "--repo", "alice/qlip-tiny", "--private"]) == 0
    (_, repo, options), (_, repo2, files) = FakeApi.calls
    assert repo == repo2 == "alice/qlip-tiny" and options["private"] is True
    assert "README.md" in files and "model.safetensors" in files
    assert "pushed" in capsys.readouterr().out
    monkeypatch.setattr(FakeApi, "fail", ConnectionError("Failed to resolve 'huggingface.co'"))
    assert main(["hub", "push", str(run_dir / "last"), "--repo", "alice/qlip-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not push to alice/qlip-tiny" in err and "Failed to resolve" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repo", "no-slash", "--dry-run", "--out", "X"], "USER/NAME"),
        (["--repo", "a/b", "--dry-run"], "--out"),
    ],
)
def test_hub_push_user_mistakes(run_dir, tmp_path, capsys, argv, message):
    argv = [a.replace("X", str(tmp_path / "x")) for a in argv]
    assert main(["hub", "push", str(run_dir / "last"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_hub_push_refuses_what_is_not_a_model_directory(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    assert main(["hub", "push", str(tmp_path / "notes"), "--repo", "a/b", "--dry-run", "--out",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    assert "config.json" in capsys.readouterr().err
