"""Training losses: CLIP InfoNCE (one process), pixel loss, discriminators, GAN losses, R1, adaptive weight."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qlip.losses.adversarial import (
    PatchGANDiscriminator,
    StyleGANDiscriminator,
    adaptive_weight,
    build_discriminator,
    discriminator_loss,
    generator_loss,
    minibatch_std,
    r1_penalty,
)
from qlip.losses.contrastive import ClipLoss, clamp_logit_scale_, info_nce
from qlip.losses.reconstruction import gradient_loss, pixel_loss

torch.set_num_threads(1)


def _pairs(n: int = 12, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img.requires_grad_(), txt.requires_grad_()


def _hand_clip_loss(img, txt, scale):
    logits = scale * img @ txt.t()
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def test_clip_loss_equals_hand_written_symmetric_cross_entropy():
    img, txt = _pairs()
    scale = torch.tensor(14.0, dtype=torch.float64)
    got = ClipLoss()(img, txt, scale)
    want = _hand_clip_loss(img, txt, scale)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    # Perfectly aligned pairs with a large scale: the loss goes to 0; swapped pairs: large.
    eye = torch.eye(8)
    assert ClipLoss()(eye, eye, torch.tensor(100.0)) < 1e-6
    assert ClipLoss()(eye, eye.roll(1, 0), torch.tensor(100.0)) > 50


@pytest.mark.parametrize("chunk", [1, 5, 12, 64])
def test_chunked_loss_equals_unchunked_in_value_and_gradient(chunk):
    img, txt = _pairs(n=12)
    scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    ref = ClipLoss()(img, txt, scale)
    ref_grads = torch.autograd.grad(ref, (img, txt, scale))
    got = ClipLoss(chunk_size=chunk)(img, txt, scale)
    got_grads = torch.autograd.grad(got, (img, txt, scale))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_info_nce_offset_selects_the_positive_column():
    keys = torch.eye(6)
    queries = keys[2:4]  # rows whose positives are columns 2 and 3
    assert info_nce(queries, keys, torch.tensor(50.0), offset=2) < 1e-6
    assert info_nce(queries, keys, torch.tensor(50.0), offset=0) > 10


def test_clip_loss_rejects_bad_shapes_and_chunk():
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(torch.zeros(4, 8), torch.zeros(3, 8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="chunk_size"):
        ClipLoss(chunk_size=0)


def test_clamp_logit_scale_clamps_the_log_parameter_in_place():
    p = nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale_(p, 100.0)
    assert p.item() == pytest.approx(math.log(100.0))
    p.data.fill_(-3.0)
    clamp_logit_scale_(p)
    assert p.item() == 0.0
    p.data.fill_(2.0)
    clamp_logit_scale_(p)
    assert p.item() == 2.0
    with pytest.raises(ValueError, match="> 1"):
        clamp_logit_scale_(p, 0.5)


def test_pixel_losses():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full((2, 3, 4, 4), 0.5)
    assert pixel_loss(a, b).item() == pytest.approx(0.25)
    assert pixel_loss(a, b, "l1").item() == pytest.approx(0.5)
    assert pixel_loss(a.bfloat16(), b.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="same shape"):
        pixel_loss(a, b[:, :, :2])
    with pytest.raises(ValueError, match="unknown pixel loss"):
        pixel_loss(a, b, "huber")


def test_gradient_term_sees_outlines_and_not_flat_offsets():
    flat = torch.zeros(1, 1, 8, 8)
    shifted = flat + 0.5  # a background color error: no edges in either image
    assert gradient_loss(shifted, flat).item() == 0.0
    assert pixel_loss(shifted, flat, gradient_weight=3.0).item() == pytest.approx(0.25)
    square = flat.clone()
    square[..., 2:6, 2:6] = 1.0
    blurred = F.avg_pool2d(F.pad(square, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    # by hand: the mean over both directions of (d recon - d target)^2
    dx = ((blurred.diff(dim=-1) - square.diff(dim=-1)) ** 2).mean()
    dy = ((blurred.diff(dim=-2) - square.diff(dim=-2)) ** 2).mean()
    assert gradient_loss(blurred, square).item() == pytest.approx(0.5 * float(dx + dy))
    assert gradient_loss(blurred, square).item() > 0.01
    assert pixel_loss(blurred, square, gradient_weight=2.0).item() == pytest.approx(
        pixel_loss(blurred, square).item() + 2.0 * gradient_loss(blurred, square).item())


@pytest.mark.parametrize("size,layers", [(32, 2), (64, 3)])
def test_patchgan_shapes_and_gradients(size, layers):
    d = build_discriminator("patchgan", size, width=8, layers=layers)
    assert isinstance(d, PatchGANDiscriminator)
    x = torch.randn(2, 3, size, size, requires_grad=True)
    out = d(x)
    assert out.shape[:2] == (2, 1) and out.shape[-1] == size // 2**layers - 2
    out.mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in d.parameters())
    # GroupNorm, not BatchNorm: one image's logits do not depend on the rest of the batch.
    d.eval()
    torch.testing.assert_close(d(x[:1]), d(x)[:1])


@pytest.mark.parametrize("size", [32, 64, 56])
def test_stylegan_discriminator_shapes(size):
    d = build_discriminator("stylegan", size, width=8, layers=2)
    assert isinstance(d, StyleGANDiscriminator)
    x = torch.randn(4, 3, size, size)
    out = d(x)
    assert out.shape == (4,)
    out.sum().backward()
    assert all(p.grad is not None for p in d.parameters())
    with pytest.raises(ValueError, match="built for"):
        d(torch.randn(4, 3, size * 2, size * 2))


def test_spectral_norm_and_unknown_kind():
    d = PatchGANDiscriminator(width=4, layers=2, spectral_norm=True)
    assert d(torch.randn(1, 3, 32, 32)).isfinite().all()
    with pytest.raises(ValueError, match="unknown discriminator"):
        build_discriminator("biggan", 64)
    with pytest.raises(ValueError, match="too small"):
        build_discriminator("patchgan", 16, layers=3)


def test_minibatch_std_appends_group_std():
    x = torch.zeros(4, 2, 3, 3)
    x[0] = 1.0  # group of 4 (strided): one image differs -> std = sqrt(3)/4 everywhere
    y = minibatch_std(x, group_size=4)
    assert y.shape == (4, 3, 3, 3)
    torch.testing.assert_close(y[:, -1], torch.full((4, 3, 3), math.sqrt(3) / 4), atol=1e-4, rtol=0)
    assert minibatch_std(torch.ones(3, 2, 2, 2), 4)[:, -1].abs().max() < 1e-3  # B=3: groups of 3, all equal


def test_gan_losses_known_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # hinge: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; relu(1-2)=0, relu(1+0)=1 -> 0.5
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.75)
    assert generator_loss(fake, "hinge").item() == pytest.approx(1.0)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    want_d = (sp(-2.0) + sp(-0.5)) / 2 + (sp(-2.0) + sp(0.0)) / 2
    assert discriminator_loss(real, fake, "non-saturating").item() == pytest.approx(want_d, rel=1e-6)
    assert generator_loss(fake, "non-saturating").item() == pytest.approx((sp(2.0) + sp(0.0)) / 2, rel=1e-6)
    # a perfect discriminator under hinge has zero loss
    assert discriminator_loss(torch.ones(3), -torch.ones(3), "hinge").item() == 0.0
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_loss(fake, "wgan")


def test_r1_penalty_matches_analytic_gradient_and_is_zero_for_constant_d():
    # D(x) = sum(w * x): grad_x = w for every image -> R1 = ||w||^2
    w = torch.randn(3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (x * w).flatten(1).sum(1)
    assert r1_penalty(x, logits).item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)
    # a discriminator whose weights are all zero is constant in its input
    d = PatchGANDiscriminator(width=4, layers=2)
    for p in d.parameters():
        nn.init.zeros_(p)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    penalty = r1_penalty(x, d(x))
    assert penalty.isfinite() and penalty.item() == 0.0
    assert r1_penalty(x, torch.zeros(2, requires_grad=True)).item() == 0.0  # not even connected
    # and it is differentiable into the discriminator (create_graph)
    d2 = build_discriminator("stylegan", 32, width=4, layers=1)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    r1_penalty(x, d2(x)).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d2.parameters())
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(torch.randn(2, 3, 32, 32), torch.zeros(2))


def test_adaptive_weight_is_the_gradient_norm_ratio_and_detached():
    last = nn.Parameter(torch.randn(4, 4))
    x = torch.randn(3, 4)
    y = x @ last
    rec = 10.0 * y.pow(2).mean()
    gan = -y.mean()
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0].norm()
    g_gan = torch.autograd.grad(gan, last, retain_graph=True)[0].norm()
    w = adaptive_weight(rec, gan, last)
    assert not w.requires_grad
    assert w.item() == pytest.approx((g_rec / (g_gan + 1e-4)).item(), rel=1e-5)
    assert adaptive_weight(rec, gan * 1e-12, last, max_weight=7.0).item() == 7.0
    with pytest.raises(ValueError, match="depend on last_layer_weight"):
        adaptive_weight(rec, torch.zeros((), requires_grad=True), last)
