"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), VGG variant.

The paper's stage-2 loss (``0.1 * LPIPS``) and the reconstruction metric (docs/metrics.md). One implementation serves as
the training loss and as the evaluation metric:

    x, y in [-1, 1]  ->  (x - shift) / scale                        (LPIPS input scaling layer)
                     ->  VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
                     ->  unit-normalize each feature vector over channels (eps 1e-10)
                     ->  squared difference -> 1x1 linear head (no bias, non-negative weights)
                     ->  spatial mean -> sum over the five layers  = distance per image

with shift = (-0.030, -0.088, -0.188) and scale = (0.458, 0.448, 0.450) (the ImageNet mean/std mapped to the
[-1, 1] range). Weights come from two standard files, loaded unchanged from local paths (nothing is downloaded):

* ``vgg16-397923af.pth``: the ImageNet VGG16 in torchvision layout; only ``features.*`` is used.
* ``vgg.pth`` of LPIPS v0.1: keys ``lin{k}.model.1.weight``, shapes (1, C, 1, 1) for C in 64, 128, 256, 512, 512;
  mapped here to ``heads.{k}.weight``.

The network is frozen (``requires_grad`` False) but differentiable with respect to its inputs. Without weights it
refuses to run (:meth:`LPIPS.forward` raises); the metric path reports "unavailable" via :func:`load_lpips_network`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from qlip.nn.vgg import VGG16_TAP_CHANNELS, VGG16Features
from qlip.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from qlip.weights import WeightFileError, WeightsMismatchError, check_state_dict, read_weight_file

logger = logging.getLogger(__name__)

VGG16_WEIGHTS_FILENAME = "vgg16-397923af.pth"
LPIPS_HEADS_FILENAME = "vgg.pth"
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10


def lpips_head_file_key(layer: int) -> str:
    """Name of head ``layer``'s weight in the standard LPIPS ``vgg.pth`` file (a Dropout sits at ``model.0``)."""
    return f"lin{layer}.model.1.weight"


def clip_normalized_to_lpips_input(pixel_values: torch.Tensor) -> torch.Tensor:
    """Map CLIP-normalized images (the model's input/reconstruction space) to LPIPS's [-1, 1].

    Args:
        pixel_values: (B, 3, H, W) images normalized with the OpenAI CLIP mean/std.

    Returns:
        (B, 3, H, W) images in [-1, 1] (not clamped, so gradients flow everywhere; reconstructions slightly out of
        range stay slightly out of range).
    """
    mean = pixel_values.new_tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = pixel_values.new_tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (pixel_values * std + mean) * 2.0 - 1.0


def _unit_normalize(features: torch.Tensor) -> torch.Tensor:
    # Each spatial position's feature vector is scaled to unit length, so layers with large activations do not
    # dominate; eps keeps all-zero vectors (dead ReLUs) finite.
    norm = features.pow(2).sum(dim=1, keepdim=True).sqrt()
    return features / (norm + _NORM_EPS)


class LPIPS(nn.Module):
    """LPIPS distance with VGG16 features and the v0.1 linear heads.

    Build it with :meth:`from_files`. Direct construction gives random weights, which :meth:`forward` refuses to
    use unless ``allow_random_weights=True`` (tests only: a random network is not LPIPS).

    Args:
        allow_random_weights: let :meth:`forward` run before weights are loaded (tests only).
    """

    def __init__(self, *, allow_random_weights: bool = False) -> None:
        super().__init__()
        self.allow_random_weights = allow_random_weights
        self.vgg_loaded = False
        self.heads_loaded = False
        # Constants, not state: kept out of the state dict so it holds exactly the two files' tensors.
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in VGG16_TAP_CHANNELS)
        with torch.no_grad():
            for head in self.heads:
                # The released heads are non-negative (the paper clamps them); random test heads follow suit so
                # that the distance of different images is positive.
                head.weight.uniform_(0.0, 1.0 / head.in_channels)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, vgg_path: str | Path, lin_path: str | Path) -> LPIPS:
        """Load the ImageNet VGG16 trunk and the LPIPS v0.1 heads from local files, unchanged.

        Args:
            vgg_path: ``vgg16-397923af.pth`` (torchvision layout; ``classifier.*`` keys are ignored).
            lin_path: LPIPS v0.1 ``vgg.pth`` (keys ``lin0.model.1.weight`` ... ``lin4.model.1.weight``).

        Returns:
            The frozen network in eval mode.

        Raises:
            FileNotFoundError: a file does not exist.
            WeightFileError: a file is truncated, corrupt or not a plain state dict.
            WeightsMismatchError: keys are missing, unexpected or misshaped (all listed by name).
        """
        net = cls()
        net.load_vgg(vgg_path)
        net.load_heads(lin_path)
        return net

    def load_vgg(self, path: str | Path) -> None:
        """Load ``features.*`` of a torchvision-layout VGG16 state dict into the trunk."""
        state = read_weight_file(path)
        features = {k: v for k, v in state.items() if k.startswith("features.")}
        # The classifier is part of the standard file but not of LPIPS; anything else means a different network.
        other = {k: v for k, v in state.items() if not k.startswith(("features.", "classifier."))}
        check_state_dict(self.net.state_dict(), {**features, **other}, "VGG16 (LPIPS trunk)", path)
        self.net.load_state_dict(features)
        self.vgg_loaded = True
        logger.info("loaded VGG16 features for LPIPS from %s", path)

    def load_heads(self, path: str | Path) -> None:
        """Load the five linear heads from the standard LPIPS ``vgg.pth`` (``lin{k}.model.1.weight``)."""
        state = read_weight_file(path)
        expected = {lpips_head_file_key(k): head.weight for k, head in enumerate(self.heads)}
        check_state_dict(expected, state, "LPIPS linear heads", path)
        with torch.no_grad():
            for k, head in enumerate(self.heads):
                head.weight.copy_(state[lpips_head_file_key(k)])
        self.heads_loaded = True
        logger.info("loaded LPIPS v0.1 linear heads from %s", path)

    def train(self, mode: bool = True) -> LPIPS:
        # A frozen perceptual network: keep it in eval mode even when the model around it trains.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image.

        Args:
            x: (B, 3, H, W) images in [-1, 1] (use :func:`clip_normalized_to_lpips_input` for CLIP-normalized ones).
            y: images of the same shape and range.

        Returns:
            (B,) distances (0 for identical images); differentiable with respect to ``x`` and ``y``.
        """
        if not ((self.vgg_loaded and self.heads_loaded) or self.allow_random_weights):
            raise RuntimeError(
                "LPIPS has no weights: build it with LPIPS.from_files(vgg_path, lin_path) using "
                f"{VGG16_WEIGHTS_FILENAME} and the LPIPS v0.1 {LPIPS_HEADS_FILENAME} (see docs/metrics.md), "
                "or disable the LPIPS loss"
            )
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS compares two RGB batches of the same shape (B, 3, H, W), got {tuple(x.shape)} and "
                f"{tuple(y.shape)}"
            )
        batch = x.shape[0]
        # One trunk pass over both inputs: half the kernel launches of two passes.
        taps = self.net((torch.cat([x, y], dim=0) - self.shift) / self.scale)
        distance = x.new_zeros(batch, dtype=torch.float32)
        for head, feats in zip(self.heads, taps):
            feats = _unit_normalize(feats.float())  # normalize in float32 even under autocast
            diff = (feats[:batch] - feats[batch:]).pow(2)  # (B, C, h, w)
            distance = distance + head(diff.to(head.weight.dtype)).float().mean(dim=(1, 2, 3))
        return distance


class LPIPSNetwork(NamedTuple):
    """The LPIPS network, or ``None`` with the reason it is unavailable (for ``metric_unavailable``)."""

    net: LPIPS | None
    reason: str | None


def load_lpips_network(vgg_path: str | Path | None, lin_path: str | Path | None) -> LPIPSNetwork:
    """Load LPIPS for evaluation if both weight files are given and valid; otherwise say why it is unavailable.

    Args:
        vgg_path: local ``vgg16-397923af.pth`` or ``None``.
        lin_path: local LPIPS v0.1 ``vgg.pth`` or ``None``.

    Returns:
        ``LPIPSNetwork(net, None)`` or ``LPIPSNetwork(None, reason)``.
    """
    if vgg_path is None or lin_path is None:
        given = ((VGG16_WEIGHTS_FILENAME, vgg_path), (LPIPS_HEADS_FILENAME, lin_path))
        missing = [name for name, path in given if path is None]
        return LPIPSNetwork(
            None,
            f"no LPIPS weights given (missing {', '.join(missing)}): download them (see docs/metrics.md) "
            "and pass their directory with --lpips-weights",
        )
    try:
        return LPIPSNetwork(LPIPS.from_files(vgg_path, lin_path), None)
    except (FileNotFoundError, WeightFileError, WeightsMismatchError) as err:
        return LPIPSNetwork(None, f"LPIPS weights unusable: {err}")
