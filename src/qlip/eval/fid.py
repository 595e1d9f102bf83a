"""Frechet Inception Distance: feature statistics, a streaming accumulator, the distance, a reference-stats cache.

rFID (docs/metrics.md). FID (Heusel et al. 2017) fits a Gaussian to the 2048-d pool features of each image set and
measures ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``. Everything here is float64: float32 covariances of
50k x 2048 features lose digits that show up in the second decimal of the FID.

* :class:`FeatureStats` (mean, covariance, count) and :func:`feature_stats` for features held in memory;
  covariance with the unbiased 1/(N-1) normalization, as the reference implementations use.
* :class:`StreamingFeatureStats` accumulates sums and sums of outer products batch by batch (shifted by the first
  batch's mean so the subtraction at the end does not cancel catastrophically), so features need not be kept.
* :func:`frechet_distance` with a numerically safe matrix square root.
* :func:`reference_stats_path` / :func:`load_or_compute_reference_stats`: reference statistics cached to ``.npz``
  under a name derived from a hash of the dataset and the preprocessing, so a different crop never reuses them.
* :func:`load_fid_network` returns the FID network or the reason it is unavailable (report it with
  :func:`qlip.eval.metrics.metric_unavailable`); never a random network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.linalg
import torch

from qlip.eval.inception import FID_WEIGHTS_FILENAME, FIDInceptionV3
from qlip.eval.metrics import metric_available
from qlip.fileio import atomic_write
from qlip.weights import WeightFileError, WeightsMismatchError

logger = logging.getLogger(__name__)

# Relative error above which a computed matrix square root is not trusted and the eps*I offset is tried.
_SQRTM_MAX_REL_ERROR = 1e-5
# Imaginary parts of sqrt(S1 S2) come from round-off; above this on the diagonal something is wrong with the inputs.
_MAX_IMAGINARY = 1e-3


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian statistics of a feature set.

    Attributes:
        mean: (D,) float64 mean.
        cov: (D, D) float64 covariance (unbiased, 1/(N-1)).
        count: number of feature vectors.
    """

    mean: np.ndarray
    cov: np.ndarray
    count: int

    def save(self, path: str | Path, key: str = "") -> None:
        """Write ``mu``, ``sigma`` (the names other FID tools use), ``count`` and the cache ``key`` to ``.npz``."""
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
                np.savez(f, mu=self.mean, sigma=self.cov, count=np.int64(self.count), key=np.str_(key))

        atomic_write(path, write)  # a killed run never leaves a half-written cache that looks valid

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read statistics written by :meth:`save` (or any ``.npz`` with ``mu`` and ``sigma``)."""
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{path} has no 'mu'/'sigma' arrays (found {sorted(data.files)}); not FID statistics")
            count = int(data["count"]) if "count" in data else 0
            return cls(mean=data["mu"].astype(np.float64), cov=data["sigma"].astype(np.float64), count=count)


def _as_float64_2d(features: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D array (N, D), got shape {features.shape}")
    return features


def feature_stats(features: torch.Tensor | np.ndarray) -> FeatureStats:
    """Mean and covariance of features held in memory.

    Args:
        features: (N, D) features, N >= 2.

    Returns:
        float64 :class:`FeatureStats`.
    """
    x = _as_float64_2d(features)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    return FeatureStats(mean=x.mean(axis=0), cov=np.cov(x, rowvar=False), count=x.shape[0])


class StreamingFeatureStats:
    """Accumulate FID statistics batch by batch in float64 without keeping the features.

    Args:
        dim: feature dimension (2048 for the FID network).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self._shift: np.ndarray | None = None  # first batch's mean; centring makes the final subtraction stable
        self._sum = np.zeros(dim, dtype=np.float64)
        self._outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of (N, dim) features."""
        x = _as_float64_2d(features)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have dimension {x.shape[1]}, this accumulator was made for {self.dim}")
        if x.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
        centred = x - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.count += x.shape[0]

    def compute(self) -> FeatureStats:
        """The statistics of everything seen so far (unbiased covariance, like :func:`feature_stats`)."""
        if self.count < 2 or self._shift is None:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        mean_centred = self._sum / self.count
        cov = (self._outer - self.count * np.outer(mean_centred, mean_centred)) / (self.count - 1)
        cov = (cov + cov.T) / 2.0  # exact symmetry despite round-off
        return FeatureStats(mean=self._shift + mean_centred, cov=cov, count=self.count)


def _sqrtm_rel_error(root: np.ndarray, target: np.ndarray) -> float:
    scale = np.linalg.norm(target)
    return float(np.linalg.norm(root @ root - target) / scale) if scale > 0 else 0.0


def _sqrtm_quiet(a: np.ndarray) -> np.ndarray:
    # scipy warns on singular input; the caller measures the actual error and retries, so the warning is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(a)


def frechet_distance(stats1: FeatureStats, stats2: FeatureStats, eps: float = 1e-6) -> float:
    """Frechet distance between two Gaussians, in float64 (FID when the stats are Inception pool features).

    The matrix square root of S1 S2 is computed with ``scipy.linalg.sqrtm``; when the product is (near) singular,
    which happens when there are fewer samples than dimensions, the result is not finite or inaccurate, and the
    computation is repeated with ``eps * I`` added to both covariances. Tiny imaginary parts from round-off are
    discarded; large ones raise.

    Args:
        stats1: statistics of the first set.
        stats2: statistics of the second set.
        eps: diagonal offset used only when the plain square root fails.

    Returns:
        The distance (>= 0 up to round-off).
    """
    mu1, mu2 = np.asarray(stats1.mean, np.float64), np.asarray(stats2.mean, np.float64)
    s1, s2 = np.asarray(stats1.cov, np.float64), np.asarray(stats2.cov, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"statistics do not match: means {mu1.shape} / {mu2.shape}, covariances {s1.shape} / {s2.shape}; "
            "were they computed with the same feature network?"
        )
    diff = mu1 - mu2
    product = s1 @ s2
    covmean = _sqrtm_quiet(product)
    if not np.isfinite(covmean).all() or _sqrtm_rel_error(covmean, product) > _SQRTM_MAX_REL_ERROR:
        logger.warning("sqrt(S1 S2) is singular or inaccurate; adding %g * I to both covariances", eps)
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm_quiet((s1 + offset) @ (s2 + offset))
    if not np.isfinite(covmean).all():
        raise FloatingPointError("the matrix square root of S1 S2 is not finite even with an eps*I offset")
    if np.iscomplexobj(covmean):
        largest = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if largest > _MAX_IMAGINARY:
            raise ValueError(
                f"sqrt(S1 S2) has an imaginary component of {largest:.3g} on its diagonal; the covariances are not "
                "valid (non-symmetric or not positive semi-definite) - check the feature statistics"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_result(real: FeatureStats, fake: FeatureStats) -> dict[str, Any]:
    """FID in the shared metric-result format (see :func:`qlip.eval.metrics.metric_unavailable`)."""
    return metric_available(frechet_distance(real, fake), num_real=real.count, num_fake=fake.count)


# ---------------------------------------------------------------------------------------------- reference cache


def stats_cache_key(dataset: str, preprocessing: Mapping[str, Any] | str) -> str:
    """A canonical string naming what the statistics were computed from.

    Args:
        dataset: a name that identifies the images, e.g. ``"imagenet-val"`` or a resolved folder path.
        preprocessing: the transform that produced the network input, e.g.
            ``{"resize": 256, "crop": 256, "interpolation": "bicubic", "feature_net": "pt_inception-2015-12-05"}``;
            dicts are serialized with sorted keys so the order of fields does not matter.

    Returns:
        The key string stored in the ``.npz`` and hashed into its file name.
    """
    if not dataset:
        raise ValueError("stats_cache_key needs a non-empty dataset name")
    prep = preprocessing if isinstance(preprocessing, str) else json.dumps(dict(preprocessing), sort_keys=True)
    return f"dataset={dataset}|preprocessing={prep}"


def reference_stats_path(cache_dir: str | Path, dataset: str, preprocessing: Mapping[str, Any] | str) -> Path:
    """The cache file for a dataset + preprocessing: ``<cache_dir>/fid-ref-<safe name>-<hash16>.npz``."""
    key = stats_cache_key(dataset, preprocessing)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset)[-40:]
    return Path(cache_dir) / f"fid-ref-{safe}-{digest}.npz"


def load_or_compute_reference_stats(
    cache_dir: str | Path,
    dataset: str,
    preprocessing: Mapping[str, Any] | str,
    compute: Callable[[], FeatureStats],
) -> FeatureStats:
    """Return cached reference statistics, computing and caching them on a miss.

    A cache file whose stored key differs from the requested one (a hash collision or a hand-copied file) is
    recomputed rather than trusted.

    Args:
        cache_dir: directory of ``.npz`` files.
        dataset: see :func:`stats_cache_key`.
        preprocessing: see :func:`stats_cache_key`.
        compute: called on a miss to produce the statistics.

    Returns:
        The statistics.
    """
    key = stats_cache_key(dataset, preprocessing)
    path = reference_stats_path(cache_dir, dataset, preprocessing)
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            stored = str(data["key"]) if "key" in data else ""
        if stored == key:
            logger.info("using cached FID reference statistics %s", path)
            return FeatureStats.load(path)
        logger.warning("cache file %s was made for %r, not %r; recomputing", path, stored, key)
    stats = compute()
    stats.save(path, key=key)
    logger.info("wrote FID reference statistics %s (%d images)", path, stats.count)
    return stats


# ---------------------------------------------------------------------------------------------- network glue


class FIDNetwork(NamedTuple):
    """The FID network, or ``None`` with the reason it is unavailable (to report via ``metric_unavailable``)."""

    net: FIDInceptionV3 | None
    reason: str | None


def load_fid_network(weights_path: str | Path | None) -> FIDNetwork:
    """Load the FID InceptionV3 if a weights file is given and valid; otherwise say why FID is unavailable.

    Args:
        weights_path: local path of the standard weights file, or ``None``.

    Returns:
        ``FIDNetwork(net, None)`` or ``FIDNetwork(None, reason)``.
    """
    if weights_path is None:
        return FIDNetwork(
            None,
            f"no FID Inception weights given: download {FID_WEIGHTS_FILENAME} (see docs/metrics.md) "
            "and pass its path with --inception-weights",
        )
    try:
        return FIDNetwork(FIDInceptionV3.from_file(weights_path), None)
    except (FileNotFoundError, WeightFileError, WeightsMismatchError) as err:
        return FIDNetwork(None, f"FID Inception weights unusable: {err}")


@torch.no_grad()
def accumulate_inception_stats(
    net: FIDInceptionV3,
    batches: Iterable[torch.Tensor],
    accumulator: StreamingFeatureStats | None = None,
) -> StreamingFeatureStats:
    """Run image batches through the FID network and accumulate their feature statistics.

    Args:
        net: a loaded :class:`FIDInceptionV3`.
        batches: (B, 3, H, W) images in [0, 1] (uint8 0..255 is converted).
        accumulator: continue an existing accumulator (e.g. across data shards).

    Returns:
        The accumulator; call ``.compute()`` for :class:`FeatureStats`.
    """
    acc = accumulator if accumulator is not None else StreamingFeatureStats(2048)
    device = net.fc.weight.device
    for images in batches:
        acc.update(net(images.to(device)))
    return acc
