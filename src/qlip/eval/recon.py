"""Reconstruction evaluation: run a model over a dataset and measure PSNR / SSIM / LPIPS / rFID and code usage.

The paper's reconstruction protocol (pinned, see docs/evaluation.md and docs/metrics.md):

* inputs are the model's eval transform of each image (resize the shorter side to the model size, bicubic, center
  crop): the batches this function receives must come from :func:`qlip.transforms.image_transform` with
  ``train=False`` at ``model.image_size``;
* tokens = ``model.encode(x)``, reconstruction = ``model.decode(tokens)`` (the same image as the full forward pass,
  and the path a user of the tokens takes);
* originals and reconstructions are de-normalized, clamped to [0, 1] and quantized to uint8, i.e. what saved PNGs
  hold; every metric is computed on those;
* PSNR / SSIM per image on 0..255, averaged over images (:mod:`qlip.eval.metrics`);
* LPIPS (VGG, v0.1 heads) per image, averaged, only with both weight files; else "unavailable" with the reason;
* rFID with the FID Inception network only with its weight file; else "unavailable". The reference statistics of
  the originals are cached to ``.npz`` keyed by the dataset name and the preprocessing (:mod:`qlip.eval.fid`);
* code usage over all tokens of the set (:mod:`qlip.eval.codes`) and the compression ratio 24 p^2 / d.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..losses.lpips import LPIPS_HEADS_FILENAME, VGG16_WEIGHTS_FILENAME, LPIPSNetwork, load_lpips_network
from ..transforms import to_uint8
from .codes import CodeUsageAccumulator, compression_ratio
from .fid import (
    FeatureStats,
    FIDNetwork,
    StreamingFeatureStats,
    fid_result,
    load_fid_network,
    load_or_compute_reference_stats,
    reference_stats_path,
    stats_cache_key,
)
from .inception import FID_FEATURE_DIM, FID_WEIGHTS_FILENAME
from .metrics import metric_available, metric_unavailable, psnr, ssim

logger = logging.getLogger(__name__)


@dataclass
class ReconResult:
    """What :func:`evaluate_reconstruction` measured.

    Attributes:
        metrics: JSON-ready dict: ``num_images``, ``psnr``, ``ssim``, ``lpips``, ``rfid`` (each in the
            available / unavailable format), ``usage`` (see :class:`CodeUsageAccumulator`), ``compression_ratio``,
            ``image_size``, ``patch_size``, ``num_bits``, ``preprocessing``.
        originals: (K, 3, S, S) uint8 originals of the first K images (for the reconstruction grid).
        reconstructions: (K, 3, S, S) uint8 reconstructions of the same images.
    """

    metrics: dict[str, Any]
    originals: Tensor = field(default_factory=lambda: torch.zeros(0, 3, 1, 1, dtype=torch.uint8))
    reconstructions: Tensor = field(default_factory=lambda: torch.zeros(0, 3, 1, 1, dtype=torch.uint8))


def resolve_lpips_weights(directory: str | Path | None) -> LPIPSNetwork:
    """LPIPS from a directory holding ``vgg16-397923af.pth`` and ``vgg.pth``, or the reason it is unavailable."""
    if directory is None:
        return load_lpips_network(None, None)
    d = Path(directory).expanduser()
    if not d.is_dir():
        return LPIPSNetwork(
            None, f"--lpips-weights {d} is not a directory; pass the folder holding {VGG16_WEIGHTS_FILENAME} and "
            f"{LPIPS_HEADS_FILENAME}",
        )  # fmt: skip
    return load_lpips_network(d / VGG16_WEIGHTS_FILENAME, d / LPIPS_HEADS_FILENAME)


def eval_preprocessing(image_size: int) -> dict[str, Any]:
    """The preprocessing description that keys the FID reference cache (any change gives new statistics)."""
    return {
        "resize_shorter": image_size, "center_crop": image_size, "interpolation": "bicubic",
        "pixels": "uint8", "feature_net": FID_WEIGHTS_FILENAME,
    }  # fmt: skip


def _cached_reference(cache_dir: Path, dataset: str, preprocessing: Mapping[str, Any]) -> FeatureStats | None:
    """Reference statistics from the cache if present and made for exactly this key (so the pass can skip them)."""
    path = reference_stats_path(cache_dir, dataset, preprocessing)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        stored = str(data["key"]) if "key" in data else ""
    return FeatureStats.load(path) if stored == stats_cache_key(dataset, preprocessing) else None


def _u8_to_pm1(images: Tensor, device: torch.device) -> Tensor:
    return images.to(device, torch.float32) / 127.5 - 1.0


def _mean(values: list[Tensor]) -> float:
    return float(torch.cat(values).mean()) if values else float("nan")


@torch.no_grad()
def evaluate_reconstruction(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    fid_network: FIDNetwork | None = None,
    lpips_network: LPIPSNetwork | None = None,
    dataset_name: str | None = None,
    reference_cache_dir: str | Path | None = None,
    keep_examples: int = 8,
    device: str | torch.device | None = None,
) -> ReconResult:
    """Reconstruct every image of ``batches`` and measure the reconstruction protocol of the module docstring.

    Args:
        model: a :class:`qlip.QLIP` with vision, quantizer and decoder parts.
        batches: collated batches whose "image" is the model's eval transform (CLIP-normalized, (B, 3, S, S)).
        fid_network: from :func:`qlip.eval.fid.load_fid_network`; None means no weights were given.
        lpips_network: from :func:`resolve_lpips_weights`; None means no weights were given.
        dataset_name: names the images for the FID reference cache (include split and sample count).
        reference_cache_dir: directory of cached reference statistics; None computes them without caching.
        keep_examples: how many (original, reconstruction) pairs to return for pictures.
        device: where to run (defaults to the model's device).

    Returns:
        A :class:`ReconResult`.
    """
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    fid_network = fid_network if fid_network is not None else load_fid_network(None)
    lpips_network = lpips_network if lpips_network is not None else load_lpips_network(None, None)
    fid_net = fid_network.net.to(device) if fid_network.net is not None else None
    lpips_net = lpips_network.net.to(device) if lpips_network.net is not None else None
    size = model.image_size
    prep = eval_preprocessing(size)

    reference: FeatureStats | None = None
    if fid_net is not None and reference_cache_dir is not None and dataset_name:
        reference = _cached_reference(Path(reference_cache_dir), dataset_name, prep)
    feature_dim = getattr(fid_net, "feature_dim", FID_FEATURE_DIM)  # a stand-in network may declare a smaller one
    real_acc = StreamingFeatureStats(feature_dim) if fid_net is not None and reference is None else None
    fake_acc = StreamingFeatureStats(feature_dim) if fid_net is not None else None

    usage = CodeUsageAccumulator(model.num_bits)
    psnrs: list[Tensor] = []
    ssims: list[Tensor] = []
    lpipss: list[Tensor] = []
    kept_orig: list[Tensor] = []
    kept_recon: list[Tensor] = []
    num_kept = 0
    for batch in batches:
        images = batch["image"]
        if images.shape[0] == 0:
            continue
        if images.shape[-1] != size or images.shape[-2] != size:
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} but {model.cfg.name} reconstructs {size}x{size}; build the "
                "batches with the model's eval transform (qlip.transforms.image_transform(model.image_size))"
            )
        x = images.to(device, param.dtype)
        tokens = model.encode(x, output="indices")  # (B, h, w)
        recon = model.decode(tokens)  # (B, 3, S, S) CLIP-normalized
        usage.update(tokens)
        orig_u8 = to_uint8(images)  # (B, 3, S, S) uint8, as a PNG would hold
        recon_u8 = to_uint8(recon)
        psnrs.append(psnr(orig_u8, recon_u8))
        ssims.append(ssim(orig_u8, recon_u8))
        if lpips_net is not None:  # on the same uint8 images as PSNR, mapped to LPIPS's [-1, 1]
            lpipss.append(lpips_net(_u8_to_pm1(orig_u8, device), _u8_to_pm1(recon_u8, device)).float().cpu())
        if fake_acc is not None:
            fake_acc.update(fid_net(recon_u8.to(device)))
            if real_acc is not None:
                real_acc.update(fid_net(orig_u8.to(device)))
        if num_kept < keep_examples:
            take = min(keep_examples - num_kept, orig_u8.shape[0])
            kept_orig.append(orig_u8[:take])
            kept_recon.append(recon_u8[:take])
            num_kept += take
    num_images = sum(int(v.numel()) for v in psnrs)
    if num_images == 0:
        raise ValueError("no images to reconstruct: the data gave no readable samples")

    psnr_all = torch.cat(psnrs)
    metrics: dict[str, Any] = {
        "num_images": num_images,
        "psnr": metric_available(_mean(psnrs), std=float(psnr_all.std()) if num_images > 1 else 0.0, unit="dB"),
        "ssim": metric_available(_mean(ssims)),
        "lpips": metric_available(_mean(lpipss), net="vgg16+lpips-v0.1")
        if lpips_net is not None
        else metric_unavailable(lpips_network.reason or "LPIPS network unavailable"),
        "rfid": _rfid(fid_network, real_acc, fake_acc, reference, dataset_name, reference_cache_dir, prep),
        "usage": usage.compute(),
        "compression_ratio": compression_ratio(model.cfg.vision.patch_size, model.num_bits),
        "image_size": size,
        "patch_size": model.cfg.vision.patch_size,
        "num_bits": model.num_bits,
        "preprocessing": prep,
    }
    if math.isinf(metrics["psnr"]["value"]):
        logger.warning("some reconstructions are pixel-identical to their originals: mean PSNR is infinite")
    logger.info("reconstruction over %d images: PSNR %.2f dB, SSIM %.4f", num_images, metrics["psnr"]["value"],
                metrics["ssim"]["value"])  # fmt: skip
    if not kept_orig:
        return ReconResult(metrics)
    return ReconResult(metrics, torch.cat(kept_orig), torch.cat(kept_recon))


def _rfid(
    fid_network: FIDNetwork,
    real_acc: StreamingFeatureStats | None,
    fake_acc: StreamingFeatureStats | None,
    reference: FeatureStats | None,
    dataset_name: str | None,
    cache_dir: str | Path | None,
    prep: Mapping[str, Any],
) -> dict[str, Any]:
    if fake_acc is None:
        return metric_unavailable(fid_network.reason or "FID network unavailable")
    if fake_acc.count < 2:
        return metric_unavailable(f"rFID needs at least 2 images for a covariance, got {fake_acc.count}")
    if reference is None:
        assert real_acc is not None
        if cache_dir is not None and dataset_name:
            reference = load_or_compute_reference_stats(cache_dir, dataset_name, prep, real_acc.compute)
        else:
            reference = real_acc.compute()
    result = fid_result(reference, fake_acc.compute())
    if fake_acc.count < FID_FEATURE_DIM:
        # Fewer images than feature dimensions: the covariances are singular and FID is strongly biased upwards.
        result["note"] = f"only {fake_acc.count} images (< 2048): compare only with rFIDs over the same number"
    return result
