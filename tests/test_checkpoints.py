"""Loading the released checkpoint layout and our own format."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlip
import reference_qlip as ref
from qlip.checkpoints import ModelDirectoryError, save_released_layout
from qlip.config import QLIPConfig, config_from_released
from qlip.factory import create_model, get_model_config, get_tokenizer
from qlip.models.qlip import QLIP
from qlip.weights import WeightsMismatchError, qlip_to_released_key, released_to_qlip_key
from qlip_testing import TINY_RELEASED_CONFIG

# The released key names, for one layer of each tower.
SPEC_KEYS_ONE_LAYER = """
logit_scale visual_projection.weight visual_projection.bias text_projection.weight
vision_model.embeddings.class_embedding vision_model.embeddings.patch_embedding.weight
vision_model.embeddings.patch_embedding.bias vision_model.embeddings.position_embedding.weight
vision_model.encoder.layers.0.self_attn.q_proj.weight vision_model.encoder.layers.0.self_attn.q_proj.bias
vision_model.encoder.layers.0.self_attn.v_proj.weight vision_model.encoder.layers.0.self_attn.v_proj.bias
vision_model.encoder.layers.0.self_attn.out_proj.weight vision_model.encoder.layers.0.self_attn.out_proj.bias
vision_model.encoder.layers.0.self_attn.k_proj.weight
vision_model.encoder.layers.0.self_attn.inner_attn_ln.weight vision_model.encoder.layers.0.self_attn.inner_attn_ln.bias
vision_model.encoder.layers.0.layer_norm1.weight vision_model.encoder.layers.0.layer_norm1.bias
vision_model.encoder.layers.0.layer_norm2.weight vision_model.encoder.layers.0.layer_norm2.bias
vision_model.encoder.layers.0.mlp.w1.weight vision_model.encoder.layers.0.mlp.w1.bias
vision_model.encoder.layers.0.mlp.w2.weight vision_model.encoder.layers.0.mlp.w2.bias
vision_model.encoder.layers.0.mlp.w3.weight vision_model.encoder.layers.0.mlp.w3.bias
vision_model.encoder.layers.0.mlp.ffn_ln.weight vision_model.encoder.layers.0.mlp.ffn_ln.bias
vision_model.post_layernorm.weight vision_model.post_layernorm.bias
vision_model.quant_embed.c_fc.weight vision_model.quant_embed.c_fc.bias
vision_model.quant_embed.c_proj.weight vision_model.quant_embed.c_proj.bias
vision_model.quant_embed_post.c_fc.weight vision_model.quant_embed_post.c_fc.bias
vision_model.quant_embed_post.c_proj.weight vision_model.quant_embed_post.c_proj.bias
vision_decoder.position_embeddings
vision_decoder.encoder.layers.0.self_attn.q_proj.weight vision_decoder.encoder.layers.0.self_attn.q_proj.bias
vision_decoder.encoder.layers.0.self_attn.v_proj.weight vision_decoder.encoder.layers.0.self_attn.v_proj.bias
vision_decoder.encoder.layers.0.self_attn.out_proj.weight vision_decoder.encoder.layers.0.self_attn.out_proj.bias
vision_decoder.encoder.layers.0.self_attn.k_proj.weight
vision_decoder.encoder.layers.0.self_attn.inner_attn_ln.weight
vision_decoder.encoder.layers.0.self_attn.inner_attn_ln.bias
vision_decoder.encoder.layers.0.layer_norm1.weight vision_decoder.encoder.layers.0.layer_norm1.bias
vision_decoder.encoder.layers.0.layer_norm2.weight vision_decoder.encoder.layers.0.layer_norm2.bias
vision_decoder.encoder.layers.0.mlp.w1.weight vision_decoder.encoder.layers.0.mlp.w1.bias
vision_decoder.encoder.layers.0.mlp.w2.weight vision_decoder.encoder.layers.0.mlp.w2.bias
vision_decoder.encoder.layers.0.mlp.w3.weight vision_decoder.encoder.layers.0.mlp.w3.bias
vision_decoder.encoder.layers.0.mlp.ffn_ln.weight vision_decoder.encoder.layers.0.mlp.ffn_ln.bias
vision_decoder.norm.weight vision_decoder.norm.bias vision_decoder.ffn.0.weight vision_decoder.ffn.0.bias
vision_decoder.conv_out.weight vision_decoder.conv_out.bias
text_model.embeddings.token_embedding.weight text_model.embeddings.position_embedding.weight
text_model.encoder.layers.0.self_attn.q_proj.weight text_model.encoder.layers.0.self_attn.q_proj.bias
text_model.encoder.layers.0.self_attn.k_proj.weight text_model.encoder.layers.0.self_attn.k_proj.bias
text_model.encoder.layers.0.self_attn.v_proj.weight text_model.encoder.layers.0.self_attn.v_proj.bias
text_model.encoder.layers.0.self_attn.out_proj.weight text_model.encoder.layers.0.self_attn.out_proj.bias
text_model.encoder.layers.0.layer_norm1.weight text_model.encoder.layers.0.layer_norm1.bias
text_model.encoder.layers.0.layer_norm2.weight text_model.encoder.layers.0.layer_norm2.bias
text_model.encoder.layers.0.mlp.fc1.weight text_model.encoder.layers.0.mlp.fc1.bias
text_model.encoder.layers.0.mlp.fc2.weight text_model.encoder.layers.0.mlp.fc2.bias
text_model.final_layer_norm.weight text_model.final_layer_norm.bias
""".split()


def test_every_parameter_has_exactly_the_spec_released_name():
    cfg = config_from_released(TINY_RELEASED_CONFIG)
    for part in ("vision", "decoder"):
        getattr(cfg, part).layers = 1
    cfg.text.layers = 1
    model = QLIP(cfg)
    released = {qlip_to_released_key(k) for k in model.state_dict()}
    assert released == set(SPEC_KEYS_ONE_LAYER)
    for k in model.state_dict():
        assert released_to_qlip_key(qlip_to_released_key(k)) == k


def test_absent_config_fields_take_the_documented_defaults():
    minimal = {"vision_config": {"quantizer_cfg": {"embed_dim": 28}}, "decoder_config": {}, "text_config": {}}
    cfg = config_from_released(minimal, name="QLIP-B-16-256")
    expected = get_model_config("QLIP-B-16-256")
    assert cfg.vision == expected.vision and cfg.decoder == expected.decoder and cfg.text == expected.text
    assert cfg.quantizer.dim == 28 and cfg.quantizer.group_size == 1 and cfg.embed_dim == 512


def test_released_directory_loads_with_nothing_unplaced_or_unfilled(released_dir):
    model = create_model(str(released_dir))
    report = model.load_report
    assert report.ok and not report.unplaced and not report.unfilled
    assert sorted(report.skipped) == ["vision_decoder.encoder.rope.freqs_sin", "vision_model.encoder.rope.freqs_cos"]


def test_released_directory_reproduces_the_reference_forward_math(released_dir):
    """Same weights, same math: our model vs. an independent statement of the architecture on released keys."""
    cfg = json.loads((released_dir / "config.json").read_text())
    sd = load_file(str(released_dir / "model.safetensors"))
    model = create_model(str(released_dir))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        emb_ref, u_ref = ref.encode(sd, cfg, x)
        codes_ref, idx_ref = ref.quantize(u_ref)
        pix_ref = ref.decode(sd, cfg, codes_ref)
        emb = model.encode_image(x)
        out = model(x)
    torch.testing.assert_close(emb, emb_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["latents"], u_ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(model.encode(x).flatten(1), idx_ref)
    torch.testing.assert_close(model.reconstruct(x), pix_ref, atol=1e-5, rtol=1e-4)
    tok = get_tokenizer(str(released_dir))
    ids = tok(["a photo of a dog", "a small blue circle at the bottom"])
    assert ids.shape == (2, 77)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), ref.encode_text(sd, cfg, ids), atol=1e-5, rtol=1e-4)


def _copy_with(released_dir, tmp_path, edit):
    path = tmp_path / "edited"
    shutil.copytree(released_dir, path)
    sd = load_file(str(path / "model.safetensors"))
    edit(sd)
    save_file(sd, str(path / "model.safetensors"))
    return path


def test_missing_extra_and_misshapen_keys_are_reported_by_name(released_dir, tmp_path):
    def edit(sd):
        del sd["vision_model.encoder.layers.1.mlp.w2.bias"]
        sd["vision_model.some_new_head.weight"] = torch.zeros(3)
        sd["text_projection.weight"] = torch.zeros(4, 4)

    path = _copy_with(released_dir, tmp_path, edit)
    with pytest.raises(WeightsMismatchError) as e:
        create_model(str(path))
    msg = str(e.value)
    assert "vision_model.some_new_head.weight" in msg  # unplaced
    assert "visual.transformer.blocks.1.mlp.w2.bias" in msg  # unfilled
    assert "text_projection.weight" in msg and "(4, 4)" in msg  # shape mismatch
    report = create_model(str(path), strict=False).load_report
    assert report.unplaced == ["vision_model.some_new_head.weight"]
    assert "text.proj.weight" in report.unfilled


def test_tokenizer_only_model_skips_the_text_tower(released_dir):
    model = create_model(str(released_dir), parts=("vision", "quantizer", "decoder"))
    assert model.text is None
    assert any(k.startswith("text_model.") for k in model.load_report.skipped)


def test_missing_weights_never_fall_back_to_random(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_RELEASED_CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pickled weights are not loaded"):
        create_model(str(tmp_path))
    with pytest.raises(ValueError, match="neither a model directory nor a registered model"):
        create_model(str(tmp_path / "nope"))


def test_hf_hub_offline_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("huggingface_hub")
    with pytest.raises(RuntimeError, match="offline"):
        create_model("hf-hub:nvidia/QLIP-B-16-256")


def test_our_config_json_round_trip():
    cfg = get_model_config("QLIP-L-14-392")
    assert QLIPConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        QLIPConfig.from_dict({**cfg.to_dict(), "vision": {**cfg.to_dict()["vision"], "widht": 3}})


# ---------------------------------------------------------------------------------------------------------------------
# save_pretrained: only the model's own files, never a folder or file it was not given
# ---------------------------------------------------------------------------------------------------------------------


def test_save_pretrained_keeps_other_files_of_a_model_directory(tmp_path, tiny_tokenizer):
    model = qlip.create_model("qlip-tiny")
    path = model.save_pretrained(tmp_path / "m", tokenizer=tiny_tokenizer)
    (path / "README.md").write_text("my notes")
    (path / "eval").mkdir()
    (path / "eval" / "scores.json").write_text("{}")
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    model.save_pretrained(path)  # a model directory: its files are replaced, the rest stays
    assert (path / "README.md").read_text() == "my notes" and (path / "eval" / "scores.json").read_text() == "{}"
    assert (path / "vocab.json").is_file()  # the tokenizer saved earlier is not the save's to remove
    assert torch.equal(qlip.create_model(str(path)).logit_scale, model.logit_scale)
    assert not [p.name for p in path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    save_released_layout(model, path)  # the released layout owns the same names
    assert (path / "README.md").read_text() == "my notes"


def test_save_pretrained_refuses_a_foreign_directory_and_a_file(tmp_path, monkeypatch):
    model = qlip.create_model("qlip-tiny")
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("four years")
    monkeypatch.chdir(work)
    refused = r"not a qlip model directory \(it holds thesis.tex\).*overwrite=True"
    with pytest.raises(ModelDirectoryError, match=refused):
        model.save_pretrained(".")
    assert sorted(p.name for p in work.iterdir()) == ["thesis.tex"]
    assert (work / "thesis.tex").read_text() == "four years"
    with pytest.raises(FileExistsError):  # the class a caller catches without knowing ours
        save_released_layout(model, work)
    model.save_pretrained(".", overwrite=True)  # asked for: the model files go in, the rest stays
    assert (work / "thesis.tex").read_text() == "four years" and qlip.create_model(str(work)).cfg == model.cfg

    target = tmp_path / "weights.bin"
    target.write_bytes(b"not a directory")
    for overwrite in (False, True):
        with pytest.raises(ModelDirectoryError, match="is a file, not a directory"):
            model.save_pretrained(target, overwrite=overwrite)
    assert target.read_bytes() == b"not a directory"


def test_model_directory_follows_the_umask(tmp_path, tiny_tokenizer):
    old = os.umask(0o022)
    try:
        path = qlip.create_model("qlip-tiny").save_pretrained(tmp_path / "m", tokenizer=tiny_tokenizer)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755  # mkdtemp alone gives 0700
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in path.iterdir()}
    # the five model files, the tokenizer's special tokens map and the generated model card
    assert sorted(modes) == ["README.md", "config.json", "merges.txt", "model.safetensors", "special_tokens_map.json",
                             "tokenizer_config.json", "vocab.json"], modes  # fmt: skip
    assert len(modes) == 7 and set(modes.values()) == {0o644}, modes
