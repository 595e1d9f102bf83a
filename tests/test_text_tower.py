"""A pretrained Hugging Face encoder as QLIP's text tower (``model.text_tower: hf:...``): training, the
self-contained model directory it exports, its tokenizer, and the errors a user can meet."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

import qlip
import qlip.cli
from qlip.config import HFTextConfig, QLIPConfig
from qlip.hf import HFModelError
from qlip_testing import CAPTIONS, save_tiny_hf_text_encoder
from train_helpers import write_config

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny random BERT with a WordPiece tokenizer.json, as a Hugging Face folder."""
    return save_tiny_hf_text_encoder(tmp_path_factory.mktemp("hf") / "tiny-bert", wordpiece=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, encoder_dir):
    """3 steps of stage 1 through `qlip train` with the pretrained tower; the source folder is then moved away, so
    everything after reads the exported directory alone. Returns (run_dir/last, the moved source folder)."""
    root = tmp_path_factory.mktemp("run")
    source = root / "tiny-bert"
    shutil.copytree(encoder_dir, source)
    cfg = write_config(root / "cfg.yaml", root / "run", model={"name": "qlip-tiny", "text_tower": f"hf:{source}"},
                       checkpoint={"every": 0, "export": True})  # fmt: skip
    assert qlip.cli.main(["train", str(cfg)]) == 0
    moved = root / "moved-away"
    source.rename(moved)
    return root / "run" / "last", moved


def _in_memory_model(encoder_dir, **options):
    from qlip.hf.text_tower import pretrained_text_tower, use_text_tower

    torch.manual_seed(0)
    model = qlip.create_model("qlip-tiny")
    tower, tokenizer = pretrained_text_tower(encoder_dir, model.cfg.embed_dim, context_length=12, **options)
    return use_text_tower(model, tower).eval(), tokenizer


def test_the_exported_directory_loads_alone_and_embeds_text_as_in_memory(encoder_dir, tmp_path):
    model, tokenizer = _in_memory_model(encoder_dir)
    torch.nn.init.normal_(model.text.proj.weight)
    captions = [*CAPTIONS[:7], "a caption far too long for a context of twelve tokens, which is cut at the end"]
    expected = model.encode_text(tokenizer(captions))
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)

    loaded, loaded_tok = qlip.create_model(str(tmp_path / "m")), qlip.get_tokenizer(str(tmp_path / "m"))
    ids = loaded_tok(captions)
    assert torch.equal(ids, tokenizer(captions)) and ids.shape == (8, 12)
    assert torch.equal(loaded.encode_text(ids), expected)
    # the tokenizer is the encoder's own (what transformers makes of the folder), cut and padded the same way
    reference = transformers.AutoTokenizer.from_pretrained(str(encoder_dir))(captions, padding="max_length",
                                                                             truncation=True, max_length=12)
    assert ids.tolist() == reference["input_ids"]
    assert loaded_tok.count_truncated(captions) == 1
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["text"]
    assert saved["kind"] == "hf" and saved["hf_config"]["model_type"] == "bert" and saved["pooling"] == "mean"


def test_mean_pooling_ignores_the_padding(encoder_dir):
    model, tokenizer = _in_memory_model(encoder_dir)
    short = tokenizer(["a red circle"])
    n = int((short != tokenizer.pad_token_id).sum())
    alone = model.text.encoder(input_ids=short[:, :n]).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(model.text(short), alone)
    torch.testing.assert_close(model.text(short), model.text(short[:, : n + 2]))


def test_training_keeps_the_frozen_encoder_and_exports_a_working_model(trained, capsys):
    last, source = trained
    model = qlip.create_model(str(last))
    assert isinstance(model.cfg.text, HFTextConfig) and (last / "tokenizer.json").is_file()
    pretrained = transformers.AutoModel.from_pretrained(str(source))
    for name, value in pretrained.state_dict().items():  # the default trains only the projection
        assert torch.equal(model.text.encoder.state_dict()[name], value), name
    tokenizer = qlip.get_tokenizer(str(last))
    embeds = model.encode_text(tokenizer(["a red circle", "a blue square"]), normalize=True)
    assert embeds.shape == (2, model.cfg.embed_dim) and torch.isfinite(embeds).all()
    out = last.parent / "zs"
    assert qlip.cli.main(["eval", "zero-shot", "--model", str(last), "--data", "shapes", "--limit", "8",
                          "--task", "color", "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    assert json.loads((out / "report.json").read_text())["zero_shot"]["color"]["n"] == 8
    # the image side alone needs no text tower (nor transformers)
    assert qlip.create_model(str(last), parts=("vision", "quantizer", "decoder")).text is None


@pytest.mark.parametrize(("spec", "trains"), [("projection", set()), ("last-1", {"layer.1"}),
                                              ("all", {"embeddings", "layer.0", "layer.1"})])  # fmt: skip
def test_what_of_the_encoder_trains(tmp_path, spec, trains):
    folder = save_tiny_hf_text_encoder(tmp_path / "two-layers", wordpiece=True)
    config = json.loads((folder / "config.json").read_text())
    transformers.BertModel(transformers.BertConfig(**{**config, "num_hidden_layers": 2})).save_pretrained(folder)
    model, tokenizer = _in_memory_model(folder, trainable=spec)
    model.train()
    model.encode_text(tokenizer(["a red circle"])).sum().backward()
    assert model.text.proj.weight.grad is not None
    got = {n for n, p in model.text.encoder.named_parameters() if p.grad is not None}
    assert {part for part in ("embeddings", "layer.0", "layer.1") if any(part in n for n in got)} == trains
    assert not any("pooler" in n for n in got)
    assert model.text.encoder.training == (spec != "projection")  # a frozen encoder never drops out


def test_the_config_round_trips_and_the_usual_tower_is_untouched(encoder_dir):
    model, _ = _in_memory_model(encoder_dir)
    again = QLIPConfig.from_dict(json.loads(model.cfg.to_json()))
    assert again == model.cfg and isinstance(again.text, HFTextConfig)
    assert "kind" not in qlip.create_model("qlip-tiny").cfg.to_dict()["text"]
    with pytest.raises(ValueError, match="pooling"):
        QLIPConfig.from_dict({**json.loads(model.cfg.to_json()), "text": {**model.cfg.to_dict()["text"],
                                                                          "pooling": "cls"}})  # fmt: skip


def test_user_errors_are_one_line(encoder_dir, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no-such-folder"
    cfg = write_config(tmp_path / "a.yaml", tmp_path / "run-a", model={"text_tower": f"hf:{missing}"})
    assert qlip.cli.main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.text_tower" in err and "not found" in err and "Traceback" not in err
    cfg = write_config(tmp_path / "b.yaml", tmp_path / "run-b", model={"text_tower": "minilm"})
    assert qlip.cli.main(["train", str(cfg)]) == 2
    assert "hf:minilm" in capsys.readouterr().err
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run-c", model={"text_tower": f"hf:{encoder_dir}",
                                                                       "text_tower_trainable": "some"})  # fmt: skip
    assert qlip.cli.main(["train", str(cfg)]) == 2
    assert "text_tower_trainable" in capsys.readouterr().err

    model, tokenizer = _in_memory_model(encoder_dir)
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    cfg = write_config(tmp_path / "e.yaml", tmp_path / "run-e", model={"text_tower": f"hf:{encoder_dir}"},
                       init=str(tmp_path / "m"))
    assert qlip.cli.main(["train", str(cfg)]) == 2
    assert "brings its own" in capsys.readouterr().err
    with pytest.raises(ValueError, match="its own tokenizer"):
        qlip.get_tokenizer(str(tmp_path / "m"), vocabulary=tmp_path)
    (tmp_path / "m" / "tokenizer.json").unlink()
    with pytest.raises(HFModelError, match="has no tokenizer.json"):
        qlip.get_tokenizer(str(tmp_path / "m"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(HFModelError, match=r'needs the transformers library: pip install "qlip\[hf\]"'):
        qlip.create_model(str(tmp_path / "m"))
    assert qlip.create_model(str(tmp_path / "m"), parts=("vision", "quantizer", "decoder")).text is None
    cfg = write_config(tmp_path / "d.yaml", tmp_path / "run-d", model={"text_tower": f"hf:{encoder_dir}"})
    assert qlip.cli.main(["train", str(cfg)]) == 2
    assert 'pip install "qlip[hf]"' in capsys.readouterr().err


def test_stage2_from_it_carries_the_text_tower_and_its_tokenizer(trained, tmp_path):
    last, _ = trained
    cfg = write_config(tmp_path / "s2.yaml", tmp_path / "run2", stage=2, init=str(last),
                       loss={"lpips_weight": 0.0, "gan_weight": 0.0}, checkpoint={"every": 0, "export": True})
    assert qlip.cli.main(["train", str(cfg)]) == 0
    out = tmp_path / "run2" / "last"
    before, after = qlip.create_model(str(last)).state_dict(), qlip.create_model(str(out)).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("text."))
    captions = ["a red circle", "a small blue square"]
    assert torch.equal(qlip.get_tokenizer(str(out))(captions), qlip.get_tokenizer(str(last))(captions))
    assert "pretrained bert encoder" in (out / "README.md").read_text()


@pytest.mark.slow
def test_minilm_trains_saves_and_loads_with_the_same_text_embeddings(tmp_path):
    from qlip.hf.text_encoder import resolve_text_encoder_source

    try:
        folder = resolve_text_encoder_source("minilm")
    except HFModelError as e:
        pytest.skip(str(e))
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", model={"name": "qlip-tiny", "text_tower": "hf:minilm"},
                       optim={"steps": 2, "warmup_steps": 1, "lr": 1e-3}, checkpoint={"every": 0, "export": True})
    assert qlip.cli.main(["train", str(cfg)]) == 0
    last = tmp_path / "run" / "last"
    model, tokenizer = qlip.create_model(str(last)), qlip.get_tokenizer(str(last))
    assert model.cfg.text.width == 384 and model.cfg.text.layers == 6 and model.cfg.text.source == "minilm"

    captions = ["a large red circle in the top left corner.", "A photo of a dog!", "two cats on a sofa"]
    reference_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(captions)
    length = model.cfg.text.context_length  # the architecture's text context (qlip-tiny: 32)
    assert ids.tolist() == reference_tok(captions, padding="max_length", truncation=True,
                                         max_length=length)["input_ids"]
    # the pooled features are MiniLM's sentence embeddings (mean over the real tokens), untouched by training
    minilm = transformers.AutoModel.from_pretrained(str(folder)).eval()
    batch = reference_tok(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = minilm(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        sentence = (states * mask).sum(1) / mask.sum(1)
        torch.testing.assert_close(model.text(ids), sentence, atol=1e-5, rtol=1e-4)
        # save again and load: the same text embeddings
        expected = model.encode_text(ids, normalize=True)
        model.save_pretrained(tmp_path / "again", tokenizer=tokenizer)
        again = qlip.create_model(str(tmp_path / "again"))
        assert torch.equal(again.encode_text(qlip.get_tokenizer(str(tmp_path / "again"))(captions), normalize=True),
                           expected)
