"""The FID InceptionV3: the TensorFlow "2015-12-05" Inception graph used by every FID number in the literature.

Used for rFID (docs/metrics.md) with the standard FID InceptionV3's 2048-d pool features. The network differs from the
ImageNet-classification InceptionV3 in a few places, which matter for reproducing reported numbers:

* the 3x3 average pools inside Mixed_5b/5c/5d, Mixed_6b..6e and Mixed_7b ignore the zero padding
  (``count_include_pad=False``, TensorFlow's "SAME" average pooling);
* Mixed_7c's pool branch uses a 3x3 *max* pool (a quirk of the released graph, kept for fidelity);
* the classifier has 1008 outputs; it is loaded (it is in the weights file) but FID never uses it;
* BatchNorm eps is 0.001 and convolutions have no bias.

Input: images in [0, 1], (B, 3, H, W), resized to 299x299 with bilinear interpolation (align_corners=False) and
scaled to [-1, 1]. Output: the 2048-d global-average-pool features.

Weights: the standard PyTorch port ``pt_inception-2015-12-05-6726825d.pth`` (a plain state dict) is loaded
unchanged with :meth:`FIDInceptionV3.from_file`. There is deliberately no random-weight FID: the network refuses to
run until weights are loaded, unless it was built with ``allow_random_weights=True`` (tests only).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from qlip.weights import check_state_dict, read_weight_file

logger = logging.getLogger(__name__)

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_INPUT_SIZE = 299
FID_FEATURE_DIM = 2048
FID_NUM_CLASSES = 1008
_BN_EPS = 1e-3


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; submodule names ``conv`` / ``bn`` match the weights file."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's SAME average pooling divides by the number of real (unpadded) pixels under the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): 1x1, 5x5, double 3x3 and pool branches -> 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_same(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class ReductionB(nn.Module):
    """35 -> 17 grid reduction (Mixed_6a): strided 3x3, strided double 3x3 and max pool -> 480 + in channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3dbl, bp], dim=1)


class MixedC(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorized 7x7 convolutions -> 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = layer(b7dbl)
        bp = self.branch_pool(_avg_pool_same(x))
        return torch.cat([b1, b7, b7dbl, bp], dim=1)


class ReductionD(nn.Module):
    """17 -> 8 grid reduction (Mixed_7a) -> 512 + in channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class MixedE(nn.Module):
    """8x8 block (Mixed_7b / Mixed_7c) with split 1x3 / 3x1 branches -> 2048 channels.

    ``pool`` is ``"avg"`` (padding-excluding average) for Mixed_7b and ``"max"`` for Mixed_7c, as in the FID graph.
    """

    def __init__(self, in_channels: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"MixedE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], dim=1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_same(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3dbl, bp], dim=1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 as in the FID reference graph, returning 2048-d pool features (for rFID).

    Build it with :meth:`from_file`. Direct construction gives random weights, which :meth:`forward` refuses to
    use unless ``allow_random_weights=True`` (for shape tests only: random features are never an FID).

    Args:
        allow_random_weights: let :meth:`forward` run before weights are loaded (tests only).
        resize_input: bilinearly resize inputs to 299x299 (align_corners=False), as the standard protocol does.
    """

    def __init__(self, *, allow_random_weights: bool = False, resize_input: bool = True) -> None:
        super().__init__()
        self.allow_random_weights = allow_random_weights
        self.resize_input = resize_input
        self.weights_loaded = False
        # Stem: 299 -> 149 -> 147 -> 147 -> (max pool) 73 -> 73 -> 71 -> (max pool) 35.
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, pool_features=32)  # -> 256
        self.Mixed_5c = MixedA(256, pool_features=64)  # -> 288
        self.Mixed_5d = MixedA(288, pool_features=64)  # -> 288
        self.Mixed_6a = ReductionB(288)  # -> 768, 17x17
        self.Mixed_6b = MixedC(768, channels_7x7=128)
        self.Mixed_6c = MixedC(768, channels_7x7=160)
        self.Mixed_6d = MixedC(768, channels_7x7=160)
        self.Mixed_6e = MixedC(768, channels_7x7=192)
        self.Mixed_7a = ReductionD(768)  # -> 1280, 8x8
        self.Mixed_7b = MixedE(1280, pool="avg")  # -> 2048
        self.Mixed_7c = MixedE(2048, pool="max")  # -> 2048
        # In the weights file; unused for FID but kept so the file loads unchanged (and for logits if wanted).
        self.fc = nn.Linear(FID_FEATURE_DIM, FID_NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path, *, resize_input: bool = True) -> FIDInceptionV3:
        """Load the standard FID weights file unchanged.

        Args:
            path: local path of ``pt_inception-2015-12-05-6726825d.pth`` (see docs/metrics.md).
            resize_input: see the class docstring.

        Returns:
            The network in eval mode, frozen, with weights loaded.

        Raises:
            FileNotFoundError: the file does not exist.
            WeightFileError: the file is truncated, corrupt or not a plain state dict.
            WeightsMismatchError: keys are missing, unexpected or misshaped (all listed by name).
        """
        state = read_weight_file(path)
        # Files saved by older PyTorch lack BatchNorm's num_batches_tracked counter, newer ones have it;
        # it never affects eval-mode outputs, so accept both.
        state = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
        net = cls(resize_input=resize_input)
        expected = {k: v for k, v in net.state_dict().items() if not k.endswith(".num_batches_tracked")}
        check_state_dict(expected, state, "FID InceptionV3", path)
        net.load_state_dict(state, strict=False)
        net.weights_loaded = True
        logger.info("loaded FID InceptionV3 weights from %s (%d tensors)", path, len(state))
        return net

    def train(self, mode: bool = True) -> FIDInceptionV3:
        # Frozen feature network: BatchNorm must always use the stored statistics, even inside a training model.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pool features of images in [0, 1].

        Args:
            images: (B, 3, H, W) float images in [0, 1] (the caller clamps reconstructions) or uint8 0..255.

        Returns:
            (B, 2048) features.
        """
        if not (self.weights_loaded or self.allow_random_weights):
            raise RuntimeError(
                "FIDInceptionV3 has random weights; FID from random features is meaningless. "
                f"Build it with FIDInceptionV3.from_file('{FID_WEIGHTS_FILENAME}') (see docs/metrics.md)."
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            # A 0..255 float or a [-1, 1] / CLIP-normalized batch would silently give wrong features and a wrong FID.
            raise ValueError(
                f"FID Inception expects images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; divide 0..255 images by "
                "255, de-normalize model outputs, and clamp reconstructions to [0, 1]"
            )
        x = images.to(self.fc.weight.dtype)
        if self.resize_input:
            x = F.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0  # the TF graph expects [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # (B, 2048) global average pool

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The 1008-way classifier on pool features (not used by FID; e.g. for an Inception Score)."""
        return self.fc(features)
