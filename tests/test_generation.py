"""The text-to-image model: training step, sampling (cache, CFG, seeds), saving, the Generator, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

import qlip
from qlip.ar.sampling import Chooser
from qlip.generation import (
    CaptionTruncatedWarning,
    CodecConfig,
    EmptyCaptionError,
    GenerationInputError,
    GeneratorDirectoryError,
    T2IConfig,
    T2IModel,
    TokenizerMismatchError,
    load,
    save_generator,
)
from qlip.tokenfile import TokenSpec

KINDS = ["subtoken", "depth", "bits"]


@pytest.fixture(scope="module")
def tiny_qlip():
    torch.manual_seed(0)
    return qlip.create_model("qlip-tiny")


def _t2i(tiny_qlip, kind="subtoken", seed=0, **kw) -> T2IModel:
    torch.manual_seed(seed)
    cfg = T2IConfig.for_tokenizer(TokenSpec.of(tiny_qlip), text=tiny_qlip.cfg.text, width=32, depth=2, heads=2,
                                  codec=CodecConfig(kind=kind), **kw)  # fmt: skip
    return T2IModel(cfg, tiny_qlip.text)


def _ids(tokenizer, captions=("a red circle", "a blue square at the top")):
    return tokenizer(list(captions), context_length=32)


def test_text_tower_token_states(tiny_qlip, tiny_tokenizer):
    text = tiny_qlip.text
    ids = _ids(tiny_tokenizer)
    states = text.token_states(ids)
    assert states.shape == (2, 32, 32)
    eot = ids.argmax(-1)
    torch.testing.assert_close(text(ids), states[torch.arange(2), eot])
    mask = text.text_mask(ids)
    assert mask.sum(-1).tolist() == (eot + 1).tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_three_training_steps(tiny_qlip, tiny_tokenizer, kind):
    model = _t2i(tiny_qlip, kind).train()
    frozen = {n: p.detach().clone() for n, p in model.text_encoder.named_parameters()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    ids = _ids(tiny_tokenizer)
    for step in range(3):
        tokens = torch.randint(0, 256, (2, 4, 4), generator=torch.Generator().manual_seed(step))
        out = model(tokens, ids)
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.core.parameters())
        assert all(p.grad is None for p in model.text_encoder.parameters())
        opt.step()
    assert not model.text_encoder.encoder.training
    for n, p in model.text_encoder.named_parameters():
        assert torch.equal(p, frozen[n]), n


def test_caption_dropout_uses_the_null_condition(tiny_qlip, tiny_tokenizer):
    model = _t2i(tiny_qlip).eval()
    tokens = torch.randint(0, 256, (2, 4, 4))
    drop = torch.tensor([True, True])
    a = model(tokens, _ids(tiny_tokenizer), drop=drop)["loss"]
    b = model(tokens, _ids(tiny_tokenizer, ["a green star", "something else entirely"]), drop=drop)["loss"]
    c = model(tokens, _ids(tiny_tokenizer, ["a green star", "something else entirely"]))["loss"]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(b, c)
    assert model.train()(tokens, _ids(tiny_tokenizer))["drop_rate"] >= 0  # drawn in training


@pytest.mark.parametrize("kind", KINDS)
def test_generate_valid_tokens_and_cache_equals_recomputation(tiny_qlip, tiny_tokenizer, kind):
    model = _t2i(tiny_qlip, kind)
    ids = _ids(tiny_tokenizer)
    cached = model.generate(ids, cfg_scale=3.0, top_k=50, seed=1)
    full = model.generate(ids, cfg_scale=3.0, top_k=50, seed=1, use_cache=False)
    assert cached.shape == (2, 4, 4) and cached.dtype == torch.int64
    assert int(cached.min()) >= 0 and int(cached.max()) < 256
    assert torch.equal(cached, full)
    assert torch.equal(cached, model.generate(ids, cfg_scale=3.0, top_k=50, seed=1))  # seeded
    assert not torch.equal(cached, model.generate(ids, cfg_scale=3.0, top_k=50, seed=2))


@pytest.mark.parametrize("kind", KINDS)
def test_cfg_scale_one_equals_unguided(tiny_qlip, tiny_tokenizer, kind):
    model = _t2i(tiny_qlip, kind)
    ids = _ids(tiny_tokenizer)
    guided = model.sample_tokens(ids, Chooser(guided=True, cfg_scale=1.0, generator=torch.Generator().manual_seed(0)))
    plain = model.sample_tokens(ids, Chooser(guided=False, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(guided, plain)


def test_save_load_round_trip(tiny_qlip, tiny_tokenizer, tmp_path):
    model = _t2i(tiny_qlip, "depth").eval()
    model.save_pretrained(tmp_path / "gen")
    again = T2IModel.from_pretrained(tmp_path / "gen", text_encoder=tiny_qlip.text)
    assert again.cfg.to_dict() == model.cfg.to_dict()
    assert not any(k.startswith("text_encoder.") for k in again.state_dict_to_save())
    ids, tokens = _ids(tiny_tokenizer), torch.randint(0, 256, (2, 4, 4))
    torch.testing.assert_close(again(tokens, ids)["loss"], model(tokens, ids)["loss"], rtol=0, atol=0)
    assert torch.equal(again.generate(ids, cfg_scale=2.0, seed=3), model.generate(ids, cfg_scale=2.0, seed=3))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(GeneratorDirectoryError, match="not a generator directory"):
        model.save_pretrained(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def generator_dir(tiny_qlip, tiny_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("generator") / "t2i"
    save_generator(path, _t2i(tiny_qlip), tiny_qlip, tiny_tokenizer)
    return path


def test_generator_directory_generates_images(generator_dir):
    gen = load(generator_dir)
    images = gen.generate(["a red circle", "a blue square"], cfg_scale=3.0, seed=0, n=2)
    assert len(images) == 4 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in images)
    again = gen.generate(["a red circle", "a blue square"], cfg_scale=3.0, seed=0, n=2)
    assert [im.tobytes() for im in images] == [im.tobytes() for im in again]


def test_bad_inputs_raise(generator_dir, tiny_qlip, tiny_tokenizer):
    gen = load(generator_dir)
    with pytest.raises(EmptyCaptionError, match="prompt 1 is empty"):
        gen.generate(["a circle", "  "])
    for kwargs, what in [({"cfg_scale": -1.0}, "cfg_scale"), ({"cfg_scale": float("inf")}, "cfg_scale"),
                         ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"),
                         ({"top_p": 1.5}, "top_p"), ({"n": 0}, "n ")]:  # fmt: skip
        with pytest.raises(GenerationInputError, match=what):
            gen.generate(["a circle"], **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen.generate_tokens(["red " * 40], seed=0)
    msgs = [str(w.message) for w in caught if issubclass(w.category, CaptionTruncatedWarning)]
    assert len(msgs) == 1 and "42 tokens" in msgs[0] and "the last 10 were dropped" in msgs[0]
    model = gen.model
    with pytest.raises(GenerationInputError, match=r"shape \(B, 4, 4\)"):
        model(torch.zeros(2, 3, 3, dtype=torch.long), _ids(tiny_tokenizer))
    other = qlip.create_model("qlip-tiny")
    other.cfg.quantizer.dim = 6  # a tokenizer of 6-bit tokens
    with pytest.raises(TokenizerMismatchError, match="bits=6"):
        type(gen)(model, other, tiny_tokenizer)
    other.cfg.quantizer.dim, other.cfg.quantizer.beta = 8, 0.5  # same bits, different quantizer
    with pytest.raises(TokenizerMismatchError, match="fingerprint"):
        type(gen)(model, other, tiny_tokenizer)


@pytest.mark.parametrize("kind", KINDS)
def test_learns_caption_to_grid_mapping(tiny_qlip, tiny_tokenizer, kind, seed=0):
    """250 steps on three captions with three fixed grids: greedy decoding then gives each caption its grid."""
    torch.manual_seed(seed)
    model = T2IModel(
        T2IConfig.for_tokenizer(TokenSpec.of(tiny_qlip), text=tiny_qlip.cfg.text, width=64, depth=2, heads=2,
                                codec=CodecConfig(kind=kind), dropout=0.0), tiny_qlip.text).train()  # fmt: skip
    ids = _ids(tiny_tokenizer, ["a red circle", "a blue square", "a green star"])
    targets = torch.randint(0, 256, (3, 4, 4), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    for _ in range(250):
        loss = model(targets, ids)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(model.generate(ids, temperature=0), targets)
