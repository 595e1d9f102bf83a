"""Image-token codecs: exact round trips for every bit count and split, and the shared interface."""

from __future__ import annotations

import pytest
import torch

from qlip.ar.sampling import Chooser
from qlip.generation.codec import (
    BitCodec,
    CodecConfig,
    CodecConfigError,
    DepthHeadCodec,
    SubTokenCodec,
    join_tokens,
    make_codec,
    split_tokens,
)


def _tokens(bits: int, shape=(3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(bits)
    t = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64)
    t[0, 0], t[0, 1] = 0, (1 << bits) - 1  # both extremes
    return t


@pytest.mark.parametrize("bits", range(1, 63))
def test_split_join_round_trip_every_bits_and_split(bits):
    tokens = _tokens(bits)
    for parts in (p for p in range(1, bits + 1) if bits % p == 0):
        sub = split_tokens(tokens, bits, parts)
        assert sub.shape == (*tokens.shape, parts)
        assert int(sub.min()) >= 0 and int(sub.max()) < 1 << (bits // parts)
        assert torch.equal(join_tokens(sub, bits, parts), tokens)
    assert torch.equal(BitCodec(bits, 4).from_sequence(BitCodec(bits, 4).to_sequence(tokens)), tokens)


def test_split_is_msb_first():
    assert split_tokens(torch.tensor([0b1011_0001]), 8, 2).tolist() == [[0b1011, 0b0001]]


@pytest.mark.parametrize("bits", [1, 6, 8, 20])
def test_codec_modules_round_trip(bits):
    tokens = _tokens(bits)
    for parts in (p for p in range(1, bits + 1) if bits % p == 0 and bits // p <= 10):
        for codec in (SubTokenCodec(bits, 8, parts), DepthHeadCodec(bits, 8, parts)):
            seq = codec.to_sequence(tokens)
            assert seq.shape[1] == codec.seq_len(tokens.shape[1])
            assert torch.equal(codec.from_sequence(seq), tokens)


def test_bad_splits_raise():
    with pytest.raises(CodecConfigError, match="cannot split into 3"):
        SubTokenCodec(20, 8, parts=3)
    with pytest.raises(CodecConfigError, match="softmax"):
        SubTokenCodec(28, 8, parts=1)
    with pytest.raises(CodecConfigError, match="unknown codec kind"):
        make_codec(CodecConfig(kind="nope"), 8, 8)
    with pytest.raises(CodecConfigError, match="unknown field.*section 'codec'"):
        CodecConfig.from_dict({"kind": "bits", "flip": 0.1})


@pytest.mark.parametrize("kind", ["subtoken", "depth", "bits"])
def test_codec_loss_and_sampling_shapes(kind):
    torch.manual_seed(0)
    codec = make_codec(CodecConfig(kind=kind, parts=2, bit_flip=0.1), 8, 16)
    tokens = _tokens(8, (2, 6))
    seq = codec.to_sequence(tokens)
    hidden = torch.randn(2, seq.shape[1], 16, requires_grad=True)
    loss, metrics = codec.loss(hidden, seq)
    loss.backward()
    assert torch.isfinite(loss) and hidden.grad.abs().sum() > 0 and metrics
    assert codec.embed(seq).shape == (2, seq.shape[1], 16)
    value = codec.sample_step(torch.randn(4, 16), 1, Chooser(guided=True, cfg_scale=2.0))
    assert value.shape == (2, *codec.value_shape)


def test_bit_flips_only_in_training():
    codec = BitCodec(8, 16, bit_flip=0.4)
    seq = codec.to_sequence(_tokens(8, (2, 50)))
    torch.manual_seed(0)
    assert not torch.equal(codec.train().embed(seq), codec.embed(seq))
    assert torch.equal(codec.eval().embed(seq), codec.embed(seq))


def test_depth_head_guidance_feeds_the_same_choices_to_both_halves():
    torch.manual_seed(0)
    codec = DepthHeadCodec(8, 16, parts=2).eval()
    hidden = torch.randn(2 * 32, 16)
    chooser = Chooser(guided=True, cfg_scale=3.0, temperature=0)
    with torch.no_grad():
        got = codec.sample_step(hidden, 0, chooser)  # (32, 2)
        h0 = codec.depth.forward_embeds(hidden[:, None])[:, -1]
        c0 = chooser(codec.tables.logits(h0, 0))
        x = torch.cat([hidden[:, None], codec.tables.embed(c0.repeat(2)[:, None], torch.zeros(1, dtype=torch.long))], 1)
        c1 = chooser(codec.tables.logits(codec.depth.forward_embeds(x)[:, -1], 1))
    assert torch.equal(got, torch.stack([c0, c1], dim=1))
