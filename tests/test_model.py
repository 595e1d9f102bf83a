"""The model: attention paths, RoPE, every registered config, gradients, token API, precision, parts."""

from __future__ import annotations

import pytest
import torch

from qlip.factory import create_model, get_model_config, list_models
from qlip.models.qlip import QLIP
from qlip.nn.attention import Attention, reference_attention
from qlip.nn.rope import Rope2D, apply_rope, rope_2d_tables
from qlip_testing import randomize_


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return randomize_(create_model("qlip-tiny"), seed=1)


def test_registry_lists_released_and_small_models():
    names = list_models()
    for n in ("QLIP-B-16-256", "QLIP-B-8-256", "QLIP-L-14-392", "qlip-tiny"):
        assert n in names
    b16 = get_model_config("QLIP-B-16-256")
    assert (b16.vision.width, b16.vision.layers, b16.vision.heads, b16.vision.mlp_hidden) == (768, 12, 12, 2048)
    assert b16.quantizer.dim == 28 and b16.vision.grid_size == 16
    assert round(b16.compression_ratio, 1) == 219.4
    assert round(get_model_config("QLIP-L-14-392").compression_ratio, 1) == 168.0


@pytest.mark.parametrize("name", list_models())
def test_every_registered_config_builds(name):
    cfg = get_model_config(name)
    with torch.device("meta"):
        model = QLIP(cfg)
    n = cfg.vision.grid_size**2
    x = torch.empty(1, 3, cfg.vision.image_size, cfg.vision.image_size, device="meta")
    out = model.visual(x)
    assert out.patches.shape == (1, n, cfg.vision.width)
    assert model.decoder(torch.empty(1, n, cfg.decoder.width, device="meta")).shape == x.shape


def _shrunk(name: str):
    """A registered config with its widths and depths shrunk (two heads of 8, one block), everything else kept:
    image size, patch size, grid, bits, RoPE, sub-LN, biases, vocabulary and context length."""
    import dataclasses

    cfg = get_model_config(name)
    small = {"width": 16, "heads": 2, "layers": 1, "mlp_hidden": 24}
    parts = {
        "vision": dataclasses.replace(cfg.vision, **small) if cfg.vision else None,
        "decoder": dataclasses.replace(cfg.decoder, **small, head_hidden=24) if cfg.decoder else None,
        "text": dataclasses.replace(cfg.text, **small) if cfg.text else None,
        "quantizer": dataclasses.replace(cfg.quantizer, post_width=None) if cfg.quantizer else None,
    }
    return cfg.replace(embed_dim=16, **parts)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_config_goes_forward_and_backward(name):
    """timm's model test: each registered architecture (shrunk in width) runs the training forward on real-sized
    images and captions, and every parameter receives a finite, non-zero gradient from the training losses."""
    torch.manual_seed(0)
    cfg = _shrunk(name)
    model = randomize_(QLIP(cfg), seed=1).train()
    size, ctx = cfg.vision.image_size, cfg.text.context_length
    x = torch.randn(2, 3, size, size)
    text = torch.randint(1, cfg.text.vocab_size - 1, (2, ctx))
    text[:, ctx // 2] = cfg.text.vocab_size - 1  # the EOT token: the largest id, pooled by argmax
    out = model(x, text)
    assert out["reconstruction"].shape == x.shape
    assert out["quantizer"].indices.shape == (2, cfg.vision.grid_size**2)
    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
    labels = torch.arange(2)
    ce = torch.nn.functional.cross_entropy
    align = (ce(logits, labels) + ce(logits.T, labels)) / 2
    (align + torch.nn.functional.mse_loss(out["reconstruction"], x) + out["quantizer"].loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"{name}: parameters without a finite gradient: {missing}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"{name}: parameters with an all-zero gradient: {zero}"


@pytest.mark.parametrize("k_bias", [False, True])
def test_fused_projections_compute_the_same(k_bias):
    """fuse_projections (inference copies) keeps the math of separate q/k/v and w1/w2, k-bias-free heads included."""
    import copy

    from qlip.nn.mlp import SwiGLU

    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    attn, mlp = Attention(32, 2, k_bias=k_bias, subln=True), SwiGLU(32, 48)
    for module, args in ((attn, (x, Rope2D(16, 2, shift=1))), (mlp, (x,))):
        randomize_(module)
        fused = copy.deepcopy(module)
        fused.fuse_projections()
        assert not hasattr(fused, "q") and not hasattr(fused, "w1")  # the separate layers are gone
        torch.testing.assert_close(fused(*args), module(*args), atol=1e-5, rtol=1e-5)


def test_sdpa_equals_reference_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 10, 16).unbind(0)
    for causal in (False, True):
        fast = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(fast, reference_attention(q, k, v, causal=causal), atol=1e-5, rtol=1e-5)
    attn = Attention(32, 2, k_bias=False, subln=True)
    x = torch.randn(2, 5, 32)
    rope = Rope2D(16, 2, shift=1)
    ref = (attn.__setattr__("impl", "reference"), attn(x, rope))[1]
    attn.impl = "sdpa"
    torch.testing.assert_close(attn(x, rope), ref, atol=1e-5, rtol=1e-5)


def test_model_reference_path_matches_fast_path(tiny):
    x = torch.randn(2, 3, 32, 32)
    fast = tiny.reconstruct(x)
    ref = tiny.set_attention_impl("reference").reconstruct(x)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_rope_is_relative_in_1d_shifts():
    """Shifting q and k positions together leaves q.k unchanged (rotation by angle differences only)."""
    torch.manual_seed(0)
    head_dim, grid = 16, 8
    cos, sin = rope_2d_tables(head_dim, grid)
    q, k = torch.randn(2, head_dim)

    def score(pq, pk):
        qi, ki = pq[0] * grid + pq[1], pk[0] * grid + pk[1]
        qr = apply_rope(q.view(1, 1, 1, -1), cos[qi : qi + 1], sin[qi : qi + 1])
        kr = apply_rope(k.view(1, 1, 1, -1), cos[ki : ki + 1], sin[ki : ki + 1])
        return (qr * kr).sum()

    base = score((1, 2), (3, 1))
    for dr, dc in ((1, 0), (0, 3), (2, 2), (4, 1)):
        torch.testing.assert_close(score((1 + dr, 2 + dc), (3 + dr, 1 + dc)), base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score((1, 2), (3, 2)), base)  # a different relative offset changes it


def test_rope_leaves_cls_unrotated_and_preserves_norm():
    rope = Rope2D(16, 4, shift=1)
    x = torch.randn(2, 2, 17, 16)
    y = rope(x)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_every_parameter_gets_a_gradient_from_the_training_losses(tiny):
    tiny.train()
    x = torch.randn(4, 3, 32, 32)
    text = torch.randint(1, 500, (4, 12))
    text[:, 5] = 599  # the EOT token: the largest id
    out = tiny(x, text)
    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
    labels = torch.arange(4)
    ce = torch.nn.functional.cross_entropy
    align = (ce(logits, labels) + ce(logits.T, labels)) / 2
    loss = align + torch.nn.functional.mse_loss(out["reconstruction"], x) + out["quantizer"].loss
    loss.backward()
    # the text side receives gradients only through the contrastive loss, vision through all three
    missing = [n for n, p in tiny.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    zero = [n for n, p in tiny.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters with an all-zero gradient: {zero}"


def test_decode_of_encode_equals_reconstruct_and_forward(tiny):
    x = torch.randn(3, 3, 32, 32)
    tokens = tiny.encode(x)
    assert tokens.shape == (3, 4, 4) and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 2**8
    recon = tiny.reconstruct(x)
    torch.testing.assert_close(tiny.decode(tokens), recon, atol=0, rtol=0)
    with torch.no_grad():
        out = tiny(x)
    torch.testing.assert_close(out["reconstruction"], recon, atol=1e-5, rtol=1e-5)
    assert torch.equal(out["quantizer"].indices.view(3, 4, 4), tokens)


def test_token_output_kinds_round_trip(tiny):
    x = torch.randn(2, 3, 32, 32)
    idx = tiny.encode(x)
    bits = tiny.encode(x, output="bits")
    groups = tiny.encode(x, output="group_indices", group_size=4)
    codes = tiny.encode(x, output="codes")
    assert bits.shape == (2, 4, 4, 8) and groups.shape == (2, 4, 4, 2) and codes.shape == (2, 4, 4, 8)
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(2, 4, 4))
    ref = tiny.decode(idx)
    torch.testing.assert_close(tiny.decode(bits, kind="bits"), ref, atol=0, rtol=0)
    torch.testing.assert_close(tiny.decode(groups, kind="group_indices", group_size=4), ref, atol=0, rtol=0)
    torch.testing.assert_close(tiny.decode(idx.flatten(1)), ref, atol=0, rtol=0)


def test_decode_rejects_bad_tokens(tiny):
    with pytest.raises(ValueError, match="lie in"):
        tiny.decode(torch.full((1, 4, 4), 256))
    with pytest.raises(ValueError, match="shape"):
        tiny.decode(torch.zeros(1, 5, 5, dtype=torch.long))
    with pytest.raises(TypeError):
        tiny.decode(torch.zeros(1, 4, 4))


def test_bf16_autocast_forward_keeps_quantizer_in_float32(tiny):
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(x)
    q = out["quantizer"]
    assert q.codes.dtype == torch.float32
    assert torch.isfinite(q.loss) and torch.isfinite(q.per_sample_entropy) and torch.isfinite(q.codebook_entropy)
    assert torch.isfinite(out["reconstruction"]).all()
    agree = (q.indices.view(2, 4, 4) == tiny.encode(x)).float().mean()
    assert agree > 0.8  # bf16 may flip bits that are near zero, most tokens agree


def test_grad_checkpointing_gives_the_same_gradients(tiny):
    x = torch.randn(2, 3, 32, 32)

    def grads():
        tiny.zero_grad()
        out = tiny(x)
        (out["reconstruction"].square().mean() + out["image_embeds"].sum()).backward()
        return {n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None}

    tiny.train()
    plain = grads()
    tiny.set_grad_checkpointing(True)
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-5, rtol=1e-4)


def test_parts_can_be_built_alone(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    tokens = tiny.encode(x)
    tok_only = create_model(str(tmp_path / "m"), parts=("vision", "quantizer", "decoder"))
    assert tok_only.text is None
    torch.testing.assert_close(tok_only.reconstruct(x), tiny.reconstruct(x))
    enc = create_model(str(tmp_path / "m"), parts=("vision",))
    assert enc.decoder is None and enc.quantizer is None
    torch.testing.assert_close(enc.encode_image(x), tiny.encode_image(x))
    feats = enc.encode_image_features(x)  # second-to-last block, continuous, no CLS
    assert feats.shape == (2, 16, 32)
    dec = create_model(str(tmp_path / "m"), parts=("quantizer", "decoder"))
    assert dec.visual is None
    torch.testing.assert_close(dec.decode(tokens), tiny.decode(tokens))
    with pytest.raises(RuntimeError, match="without its vision part"):
        dec.encode(x)


def test_save_pretrained_then_load_gives_identical_outputs(tiny, tmp_path, tiny_tokenizer):
    path = tiny.save_pretrained(tmp_path / "ckpt", tokenizer=tiny_tokenizer)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    loaded = create_model(str(path))
    x = torch.randn(2, 3, 32, 32)
    text = tiny_tokenizer(["a photo of a dog", "a cat"])[:, :32]
    torch.testing.assert_close(loaded.reconstruct(x), tiny.reconstruct(x), atol=0, rtol=0)
    torch.testing.assert_close(loaded.encode_text(text), tiny.encode_text(text), atol=0, rtol=0)
    assert loaded.cfg == tiny.cfg
    # saving again over an existing directory replaces it atomically
    tiny.save_pretrained(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_quantizer_bypass_feeds_continuous_latents_to_the_decoder(tiny):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        quantized = tiny(x)
        bypassed = tiny.set_quantizer_bypass(True)(x)
    q = bypassed["quantizer"]
    assert q.loss == 0 and q.commit_loss == 0
    torch.testing.assert_close(q.codes, torch.nn.functional.normalize(bypassed["latents"], dim=-1))
    assert torch.equal(q.indices, quantized["quantizer"].indices)  # tokens are still reported
    assert not torch.allclose(bypassed["reconstruction"], quantized["reconstruction"])
    tiny.set_quantizer_bypass(False)
    torch.testing.assert_close(tiny(x)["reconstruction"], quantized["reconstruction"])


def test_the_model_does_not_import_its_factory():
    """factory builds models; a model that imported the factory back would close an import circle."""
    import ast
    from pathlib import Path

    import qlip.models

    for path in Path(qlip.models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "factory" not in (node.module or ""), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert not any("factory" in a.name for a in node.names), f"{path.name} imports the factory"
