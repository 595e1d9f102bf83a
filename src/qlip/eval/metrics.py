"""Pixel reconstruction metrics (PSNR, SSIM) and the shared metric-result convention.

Implements the paper's reconstruction protocol (rFID, PSNR, SSIM on ImageNet-1k val; see docs/metrics.md), with
the choices pinned here so that numbers reproduce:

* Inputs are batches of RGB images ``(B, 3, H, W)`` (a single ``(3, H, W)`` image is accepted too), either ``uint8``
  in 0..255 or floating point in [0, 1]. Floats are clamped to [0, 1] and multiplied by 255 *without* rounding;
  call :func:`qlip.transforms.pixels_to_uint8` first to measure what a saved PNG would give (the usual protocol
  for reconstructions).
* PSNR is computed on the 0..255 scale **per image** (MSE over all channels and pixels of that image), then the
  caller averages the per-image values. Identical images give ``inf``.
* SSIM (Wang et al. 2004) uses an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, population
  (not sample) statistics, is computed per RGB channel and averaged over channels and over the "valid" window
  positions (windows that fit inside the image). This equals ``skimage.metrics.structural_similarity(a, b,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1)``, which crops the
  borders where its padded filter would reach outside the image. Computing on RGB (not on luma Y as some papers do)
  is a deliberate, documented choice: it is what scikit-image and most tokenizer papers' code report.

Every metric in qlip reports as a dict: ``{"value": float, "available": True, ...}`` or, when it cannot be computed
honestly (e.g. no weights for a feature network), :func:`metric_unavailable` with the reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 255.0


def metric_unavailable(reason: str) -> dict[str, Any]:
    """The one way a metric says it could not be computed.

    Args:
        reason: a sentence a user can act on, e.g. which weights file is missing and how to pass it.

    Returns:
        ``{"value": None, "available": False, "reason": reason}``.
    """
    if not reason:
        raise ValueError("metric_unavailable needs a non-empty reason so the report can say why the metric is missing")
    return {"value": None, "available": False, "reason": reason}


def metric_available(value: float, **extra: Any) -> dict[str, Any]:
    """The counterpart of :func:`metric_unavailable` for a computed value.

    Args:
        value: the metric value.
        **extra: further fields to record next to it (e.g. ``num_images``).

    Returns:
        ``{"value": float(value), "available": True, **extra}``.
    """
    return {"value": float(value), "available": True, **extra}


def _as_float255(images: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Bring uint8 0..255 or float [0, 1] images to float64 on the 0..255 scale, shape (B, C, H, W)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"{name} must be (B, C, H, W) or (C, H, W) images, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.detach().to(torch.float64)
    if not images.is_floating_point():
        raise TypeError(f"{name} must be uint8 (0..255) or float (0..1), got dtype {images.dtype}")
    # Float inputs are the [0, 1] pixel convention; values outside would inflate errors, so clamp like a PNG writer.
    return images.detach().to(torch.float64).clamp(0.0, 1.0) * DATA_RANGE


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images to compare must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Peak signal-to-noise ratio per image on the 0..255 scale (docs/metrics.md).

    Args:
        a: reference images, (B, C, H, W) or (C, H, W), uint8 0..255 or float in [0, 1].
        b: images to compare, same shape and convention.

    Returns:
        float64 tensor (B,) of PSNR in dB, ``inf`` where the images are identical. Average it over the dataset.
    """
    x, y = _as_float255(a, "a"), _as_float255(b, "b")
    _check_pair(x, y)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse)  # mse == 0 -> inf, as scikit-image reports


def gaussian_window_1d(size: int = SSIM_WINDOW_SIZE, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalized 1-D Gaussian window (float64) used separably for SSIM."""
    if size % 2 != 1 or size < 1:
        raise ValueError(f"SSIM window size must be a positive odd number, got {size}")
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return window / window.sum()


def _gaussian_filter_valid(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over (H, W) of a (B, C, H, W) tensor, only where the window fits (no padding)."""
    channels = x.shape[1]
    k = window.numel()
    horizontal = window.view(1, 1, 1, k).expand(channels, 1, 1, k)
    vertical = window.view(1, 1, k, 1).expand(channels, 1, k, 1)
    x = F.conv2d(x, horizontal, groups=channels)
    return F.conv2d(x, vertical, groups=channels)


def ssim(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Structural similarity per image (Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03, L 255; docs/metrics.md).

    Computed per RGB channel and averaged over channels and valid window positions (see the module docstring for
    the exact equivalence with scikit-image).

    Args:
        a: reference images, (B, C, H, W) or (C, H, W), uint8 0..255 or float in [0, 1]; H and W at least 11.
        b: images to compare, same shape and convention.

    Returns:
        float64 tensor (B,) of SSIM values in [-1, 1] (1 for identical images).
    """
    x, y = _as_float255(a, "a"), _as_float255(b, "b")
    _check_pair(x, y)
    if min(x.shape[-2:]) < SSIM_WINDOW_SIZE:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW_SIZE}x{SSIM_WINDOW_SIZE} pixels (its window size), "
            f"got {tuple(x.shape[-2:])}; compare larger images or skip SSIM for them"
        )
    window = gaussian_window_1d().to(x.device)
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2

    mu_x = _gaussian_filter_valid(x, window)
    mu_y = _gaussian_filter_valid(y, window)
    # Population (biased) local moments, as in the SSIM paper; scikit-image's use_sample_covariance=False.
    var_x = _gaussian_filter_valid(x * x, window) - mu_x**2
    var_y = _gaussian_filter_valid(y * y, window) - mu_y**2
    cov_xy = _gaussian_filter_valid(x * y, window) - mu_x * mu_y

    numerator = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (numerator / denominator).flatten(1).mean(dim=1)  # (B,)

