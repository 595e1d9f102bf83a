"""VGG16 convolutional trunk (no classifier) with the five ReLU taps LPIPS compares.

Used by LPIPS (the paper's stage-2 perceptual loss, and the metric). The layer indices follow the ``features``
Sequential of the standard ImageNet VGG16 weights file (``vgg16-397923af.pth``, torchvision layout), so that file's
``features.{i}.weight/bias`` tensors load unchanged:

    conv  0,  2            64 ch   -> tap relu1_2 (after index 3)
    conv  5,  7           128 ch   -> tap relu2_2 (after index 8)
    conv 10, 12, 14       256 ch   -> tap relu3_3 (after index 15)
    conv 17, 19, 21       512 ch   -> tap relu4_3 (after index 22)
    conv 24, 26, 28       512 ch   -> tap relu5_3 (after index 29)

with 2x2 max pools at indices 4, 9, 16, 23 and ReLUs after every convolution. The final pool (index 30) and the
classifier are not needed and are not built; their keys in the file are ignored.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# "M" is a 2x2 max pool; numbers are 3x3 convolution widths (VGG16, configuration "D" of Simonyan & Zisserman).
_VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512
)  # fmt: skip
# Indices in ``features`` of the ReLUs whose outputs LPIPS uses.
VGG16_TAP_INDICES = (3, 8, 15, 22, 29)
VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)


def _build_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1))
            # Not in-place: the tapped activations must survive the next layer for the backward pass.
            layers.append(nn.ReLU(inplace=False))
            in_channels = int(item)
    return nn.Sequential(*layers)


class VGG16Features(nn.Module):
    """VGG16 ``features`` up to relu5_3, returning the five tapped activations.

    The state dict keys are ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = _build_features()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args:
            x: (B, 3, H, W) input, already normalized the way the weights expect.

        Returns:
            [relu1_2 (B, 64, H, W), relu2_2 (B, 128, H/2, W/2), relu3_3, relu4_3, relu5_3 (B, 512, H/16, W/16)].
        """
        taps: list[torch.Tensor] = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in VGG16_TAP_INDICES:
                taps.append(x)
        return taps
