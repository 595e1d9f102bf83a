"""Adversarial loss for stage 2: discriminators, GAN losses, R1 penalty, adaptive weight (the paper's stage 2).

Stage 2 adds ``0.1 * GAN`` to the decoder's loss. Two discriminator families are provided, both written from their
papers' descriptions:

* :class:`PatchGANDiscriminator` (Isola et al. 2017, pix2pix): a stack of strided 4x4 convolutions whose output is
  a map of logits, one per overlapping patch. Usually paired with the hinge loss.
* :class:`StyleGANDiscriminator` (Karras et al. 2020, StyleGAN2, "residual" discriminator), simplified: residual
  blocks (two 3x3 convs, 2x average-pool downsampling, a 1x1 skip, sum scaled by 1/sqrt(2)) down to a small
  resolution, minibatch standard deviation, a 3x3 conv and a two-layer linear head giving one logit per image.
  Left out on purpose: equalized learning rate, the blur (FIR) filter before downsampling, and the fused
  bias-activation gain; plain PyTorch initialization and average pooling are used instead. Usually paired with the
  non-saturating loss and the R1 penalty (the BSQ-ViT lineage).

Losses (sums of the real and fake halves, as in the papers; codebases that halve them only rescale the learning rate):

* hinge: ``L_D = E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]``, ``L_G = -E[D(G(z))]``.
* non-saturating: ``L_D = E[softplus(-D(x))] + E[softplus(D(G(z)))]``, ``L_G = E[softplus(-D(G(z)))]``.

The adaptive weight is the VQGAN rule (Esser et al. 2021, eq. 7): ``||grad_last L_rec|| / (||grad_last L_gan|| +
1e-4)`` at the decoder's last layer, detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

GAN_LOSS_KINDS = ("hinge", "non-saturating")
DISCRIMINATOR_KINDS = ("patchgan", "stylegan")


def _maybe_sn(module: nn.Module, enabled: bool) -> nn.Module:
    return _spectral_norm(module) if enabled else module


class PatchGANDiscriminator(nn.Module):
    """PatchGAN: (B, C, H, W) images -> (B, 1, h, w) patch logits.

    Layout: conv 4x4/2 (no norm) -> ``layers - 1`` blocks of conv 4x4/2 + GroupNorm, channels doubling up to
    ``8 * width`` -> conv 4x4/1 + GroupNorm -> conv 4x4/1 to one channel. GroupNorm replaces pix2pix's BatchNorm so
    the logits of one image do not depend on the rest of the batch (which would also leak across the real/fake
    halves and break the per-sample R1 gradient).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        width: int = 64,  # channels of the first conv
        layers: int = 3,  # number of stride-2 convs; the receptive field grows with it (70 px for 3)
        spectral_norm: bool = False,  # spectral normalization on every conv (a Lipschitz bound instead of R1)
    ):
        super().__init__()
        if layers < 1 or width < 1:
            raise ValueError(f"PatchGAN needs layers >= 1 and width >= 1, got layers={layers}, width={width}")
        blocks: list[nn.Module] = [
            _maybe_sn(nn.Conv2d(in_channels, width, 4, stride=2, padding=1), spectral_norm),
            nn.LeakyReLU(0.2),
        ]
        channels = width
        for i in range(1, layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [
                _maybe_sn(nn.Conv2d(channels, out, 4, stride=stride, padding=1, bias=False), spectral_norm),
                nn.GroupNorm(min(32, out), out),
                nn.LeakyReLU(0.2),
            ]
            channels = out
        blocks.append(_maybe_sn(nn.Conv2d(channels, 1, 4, stride=1, padding=1), spectral_norm))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)  # (B, 1, h, w)


class _ResidualDown(nn.Module):
    """StyleGAN2 residual discriminator block: two 3x3 convs and a 2x downsample, plus a 1x1 skip, / sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int, spectral_norm: bool):
        super().__init__()
        self.conv1 = _maybe_sn(nn.Conv2d(in_ch, in_ch, 3, padding=1), spectral_norm)
        self.conv2 = _maybe_sn(nn.Conv2d(in_ch, out_ch, 3, padding=1), spectral_norm)
        self.skip = _maybe_sn(nn.Conv2d(in_ch, out_ch, 1, bias=False), spectral_norm)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.avg_pool2d(F.leaky_relu(self.conv2(h), 0.2), 2)
        # The 1/sqrt(2) keeps the variance of the sum equal to that of each branch (StyleGAN2, appendix B).
        return (h + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2.0)


def minibatch_std(x: Tensor, group_size: int = 4) -> Tensor:
    """Appends one channel holding the mean over features of the std within groups of images (StyleGAN).

    It lets the discriminator see batch statistics, so a generator that collapses to one output is easy to spot.
    Groups are strided (image i belongs to group ``i % (B // G)``); ``G`` is the largest divisor of B not above
    ``group_size``.

    Args:
        x: (B, C, H, W) features.
        group_size: largest group size.

    Returns:
        (B, C + 1, H, W).
    """
    b, c, h, w = x.shape
    g = max(d for d in range(1, min(group_size, b) + 1) if b % d == 0)
    y = x.float().reshape(g, b // g, c, h, w)
    std = torch.sqrt(y.var(dim=0, unbiased=False) + 1e-8)  # (B/G, C, H, W)
    stat = std.mean(dim=(1, 2, 3)).to(x.dtype)  # (B/G,)
    stat = stat.repeat(g).reshape(b, 1, 1, 1).expand(b, 1, h, w)  # image i gets its group's value
    return torch.cat([x, stat], dim=1)


class StyleGANDiscriminator(nn.Module):
    """Simplified StyleGAN2 residual discriminator: (B, C, S, S) images -> (B,) logits (see the module docstring)."""

    def __init__(
        self,
        image_size: int,
        *,
        in_channels: int = 3,
        width: int = 64,  # channels at full resolution
        max_width: int | None = None,  # channel cap (default 8 * width)
        final_size: int = 4,  # downsample while the feature map is at least twice this size
        mbstd_group: int = 4,  # minibatch-std group size
        spectral_norm: bool = False,
    ):
        super().__init__()
        if image_size < 2 * final_size:
            raise ValueError(f"image_size {image_size} is too small for the StyleGAN discriminator (need >= 8)")
        max_width = max_width or 8 * width
        self.image_size = image_size
        self.mbstd_group = mbstd_group
        self.from_rgb = _maybe_sn(nn.Conv2d(in_channels, width, 1), spectral_norm)
        blocks, channels, size = [], width, image_size
        while size >= 2 * final_size:
            out = min(channels * 2, max_width)
            blocks.append(_ResidualDown(channels, out, spectral_norm))
            channels, size = out, size // 2
        self.blocks = nn.ModuleList(blocks)
        self.final_size = size
        self.final_conv = _maybe_sn(nn.Conv2d(channels + 1, channels, 3, padding=1), spectral_norm)
        self.fc = _maybe_sn(nn.Linear(channels * size * size, channels), spectral_norm)
        self.out = _maybe_sn(nn.Linear(channels, 1), spectral_norm)

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"this discriminator was built for {self.image_size}x{self.image_size} images, got "
                f"{tuple(images.shape[-2:])}; build it with the model's image size"
            )
        x = F.leaky_relu(self.from_rgb(images), 0.2)
        for block in self.blocks:
            x = block(x)
        x = minibatch_std(x, self.mbstd_group)
        x = F.leaky_relu(self.final_conv(x), 0.2)  # (B, C, s, s)
        x = F.leaky_relu(self.fc(x.flatten(1)), 0.2)
        return self.out(x).squeeze(-1)  # (B,)


def build_discriminator(kind: str, image_size: int, *, width: int = 64, layers: int = 3) -> nn.Module:
    """Builds a discriminator by name.

    Args:
        kind: ``"patchgan"`` or ``"stylegan"``.
        image_size: side of the (square) images it will see.
        width: channels of the first layer.
        layers: PatchGAN: number of stride-2 convs. StyleGAN: number of channel doublings (channels are capped at
            ``width * 2**layers``); the number of blocks follows from ``image_size``.
    """
    if kind == "patchgan":
        if image_size < 2 ** (layers + 2):
            raise ValueError(
                f"image_size {image_size} is too small for a PatchGAN with {layers} stride-2 layers; use fewer layers"
            )
        return PatchGANDiscriminator(width=width, layers=layers)
    if kind == "stylegan":
        return StyleGANDiscriminator(image_size, width=width, max_width=width * 2**layers)
    raise ValueError(f"unknown discriminator kind {kind!r}; choose one of {DISCRIMINATOR_KINDS}")


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSS_KINDS:
        raise ValueError(f"unknown GAN loss kind {kind!r}; choose one of {GAN_LOSS_KINDS}")


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "hinge") -> Tensor:
    """Discriminator loss on logits of real and (detached) generated images; scalar, fp32.

    Args:
        real_logits: logits of real images, any shape (patch maps are averaged).
        fake_logits: logits of reconstructions (detach them from the generator before the discriminator step).
        kind: ``"hinge"`` or ``"non-saturating"``.
    """
    _check_kind(kind)
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_loss(fake_logits: Tensor, kind: str = "hinge") -> Tensor:
    """Generator (decoder) loss on the discriminator's logits of reconstructions; scalar, fp32."""
    _check_kind(kind)
    fake = fake_logits.float()
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()


def r1_penalty(real_images: Tensor, real_logits: Tensor) -> Tensor:
    """R1 gradient penalty ``E_x ||grad_x D(x)||^2`` on real images (Mescheder et al. 2018).

    Multiply by ``gamma / 2`` yourself (StyleGAN2 uses gamma in [0.1, 10] depending on resolution). The graph is
    kept (``create_graph=True``) so the penalty can be back-propagated into the discriminator.

    Args:
        real_images: (B, ...) real images with ``requires_grad=True``, the tensor fed to the discriminator.
        real_logits: the discriminator's logits for them (any shape with leading B; patch logits are summed per image).

    Returns:
        Scalar fp32 penalty (zero when the logits do not depend on the images).
    """
    if not real_images.requires_grad:
        raise ValueError(
            "r1_penalty needs real_images.requires_grad=True before the discriminator forward: call "
            "real_images.requires_grad_(True) (on a detached copy) and recompute real_logits"
        )
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_images, create_graph=True, allow_unused=True)
    if grad is None:
        return real_logits.new_zeros((), dtype=torch.float32)
    return grad.float().pow(2).flatten(1).sum(dim=1).mean()


def adaptive_weight(
    rec_loss: Tensor, gan_loss: Tensor, last_layer_weight: Tensor, *, max_weight: float = 1e4
) -> Tensor:
    """VQGAN adaptive GAN weight ``||grad L_rec|| / (||grad L_gan|| + 1e-4)`` at the decoder's last layer, detached.

    Costs two extra partial backward passes (to the last layer only), so the caller may compute it every few steps.

    Args:
        rec_loss: scalar reconstruction loss (e.g. MSE + perceptual) with its graph.
        gan_loss: scalar generator loss with its graph.
        last_layer_weight: the decoder's last layer weight both losses depend on.
        max_weight: upper clamp (the weight explodes when the GAN gradient vanishes).

    Returns:
        Scalar detached fp32 weight in ``[0, max_weight]``; multiply it with the configured GAN weight.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True, allow_unused=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True, allow_unused=True)
    if rec_grad is None or gan_grad is None:
        raise ValueError(
            "adaptive_weight: rec_loss and gan_loss must both depend on last_layer_weight; pass the decoder's final "
            "layer weight (the one producing the pixels)"
        )
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
