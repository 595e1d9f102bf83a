"""The autoregressive core: cache equivalence, causality, SDPA vs reference, checkpointing; sampling utilities."""

from __future__ import annotations

import pytest
import torch

from qlip.ar import ARConfig, ARTransformer, cfg_logits, decode, filter_logits, sample, set_ar_attention_impl
from qlip.ar.sampling import Chooser


def _model(**kw) -> ARTransformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, width=32, depth=2, heads=2, max_seq_len=24)
    cfg.update(kw)
    return ARTransformer(ARConfig(**cfg)).eval()


def test_config_round_trip_and_defaults():
    cfg = ARConfig(vocab_size=10, width=96, heads=3)
    assert cfg.mlp_hidden == 256 and cfg.mlp_hidden % 64 == 0  # 8/3 * 96 = 256
    assert ARConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field.*section 'ARConfig'"):
        ARConfig.from_dict({"widht": 3})


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cached_decoding_equals_full_recomputation(qk_norm):
    m = _model(qk_norm=qk_norm)
    x = torch.randint(0, 50, (3, 12))
    pad = torch.ones(3, 12, dtype=torch.bool)
    pad[1, 2:4] = False  # padded prefix slots of one row
    with torch.no_grad():
        full = m(x, key_padding_mask=pad)
        cache = m.new_cache(3, max_len=16)
        steps = [m(x[:, :5], cache=cache, key_padding_mask=pad[:, :5])]
        for i in range(5, 12):
            steps.append(m(x[:, i : i + 1], cache=cache))
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat(steps, 1).argmax(-1), full.argmax(-1))


def test_causal_mask_holds():
    m = _model()
    x = torch.randint(0, 50, (2, 10))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 50
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_sdpa_equals_reference_path():
    m = _model(qk_norm=True)
    x = torch.randint(0, 50, (2, 10))
    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[0, 1] = False
    with torch.no_grad():
        fast = [m(x), m(x, key_padding_mask=pad)]
        set_ar_attention_impl(m, "reference")
        ref = [m(x), m(x, key_padding_mask=pad)]
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast[0], fast[1])  # the padding mask does something


def test_gradient_checkpointing_same_gradients():
    x = torch.randint(0, 50, (2, 10))
    grads = []
    for ckpt in (False, True):
        m = _model(grad_checkpointing=ckpt, tie_embeddings=True).train()
        m(x).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_bf16_autocast_runs():
    m = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randint(0, 50, (2, 8)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_too_long_sequence_raises():
    m = _model()
    with pytest.raises(ValueError, match="exceeds the limit"):
        m(torch.zeros(1, 25, dtype=torch.long))


def test_top_k_keeps_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, False, True]]


def test_top_p_keeps_smallest_set_with_enough_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits[:, [3, 2, 1, 0]], top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=1e-6)).sum() == 1


def test_greedy_and_seeded_sampling():
    logits = torch.randn(4, 7, 30)
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))
    a = sample(logits, generator=torch.Generator().manual_seed(3), top_k=5)
    b = sample(logits, generator=torch.Generator().manual_seed(3), top_k=5)
    assert torch.equal(a, b) and a.shape == (4, 7)
    assert (torch.topk(logits, 5).indices == a.unsqueeze(-1)).any(-1).all()
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, top_p=0)


def test_cfg_arithmetic_and_chooser():
    cond, uncond = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(cfg_logits(cond, uncond, 3.0), torch.tensor([4.0, -5.0]))
    torch.testing.assert_close(cfg_logits(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg_logits(cond, uncond, 0.0), uncond)
    logits = torch.randn(6, 9)
    guided = Chooser(guided=True, cfg_scale=1.0, temperature=0)(logits)
    assert torch.equal(guided, logits[:3].argmax(-1))
    with pytest.raises(ValueError, match="cfg_scale"):
        Chooser(guided=True, cfg_scale=float("nan"))


@pytest.mark.parametrize("guided", [False, True])
def test_decode_cached_equals_recomputed(guided):
    m = _model()
    prompt = torch.randint(0, 50, (4 if guided else 2, 5))
    mask = torch.ones_like(prompt, dtype=torch.bool)
    mask[:, 1] = False
    runs = []
    for use_cache in (True, False):
        chooser = Chooser(guided=guided, cfg_scale=2.0, top_k=10, generator=torch.Generator().manual_seed(0))
        runs.append(decode(m, prompt, 8, chooser, prompt_mask=mask, use_cache=use_cache))
    assert runs[0].shape == (2, 8) and torch.equal(runs[0], runs[1])
    greedy = decode(m, prompt[:2], 3, Chooser(guided=False, temperature=0))
    with torch.no_grad():
        assert torch.equal(greedy[:, 0], m(prompt[:2]).argmax(-1)[:, -1])


def test_decode_logits_processor_and_stop_id():
    m = _model()
    prompt = torch.randint(0, 50, (3, 4))
    seen = []

    def only_evens_then_seven(logits, step):  # step 2 may only choose id 7, the others even ids
        seen.append(step)
        out = torch.full_like(logits, float("-inf"))
        if step == 2:
            out[:, 7] = 0.0
        else:
            out[:, ::2] = logits[:, ::2]
        return out

    chooser = Chooser(guided=False, generator=torch.Generator().manual_seed(0))
    ids = decode(m, prompt, 6, chooser, logits_processor=only_evens_then_seven, stop_id=7)
    assert ids.shape == (3, 3) and seen == [0, 1, 2]  # every row chose the stop id at step 2: decoding ended
    assert (ids[:, :2] % 2 == 0).all() and (ids[:, 2] == 7).all()
    full = decode(m, prompt, 6, Chooser(guided=False, generator=torch.Generator().manual_seed(0)),
                  logits_processor=only_evens_then_seven)  # fmt: skip
    assert full.shape == (3, 6) and torch.equal(full[:, :3], ids)
