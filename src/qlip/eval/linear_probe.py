"""Linear probing on frozen features: multinomial logistic regression with an L2 strength chosen on held-out data.

The paper probes frozen features (the CLS token, the average of patch features); see docs/evaluation.md. The paper
trains its probe with AdamW for 10 epochs on ImageNet; we pin a protocol that has no learning-rate schedule to tune
and gives the same answer on every run (the one CLIP's paper used for its probes):

1. Features (:func:`extract_features`), one of
   * ``cls``: the visual CLS token after the final LayerNorm (``post_norm``), i.e. the input of the visual
     projection: "the CLS token" of the paper, before the projection into the text-aligned space;
   * ``patch-mean``: the mean over patch tokens of the last encoder block's output (what feeds the bottleneck);
   * ``codes``: the BSQ codes of all tokens, flattened in patch order (N x d values in {+-1/sqrt(d)}), so the
     probe sees where each code sits, as a decoder would.
2. Features are standardized with the mean / std of the training split (so one L2 grid fits every feature kind).
3. A held-out part of the training split (``val_fraction``, a seeded random subset) picks the L2 strength from a
   log-spaced grid (highest held-out top-1; ties go to the stronger regularization).
4. The classifier is refitted on the whole training split with that strength and scored on the evaluation split.

The fit is full-batch L-BFGS (strong-Wolfe line search) on mean cross-entropy + l2 * ||W||^2 (bias not penalized).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .zero_shot import accuracy_summary, batch_labels

logger = logging.getLogger(__name__)

FEATURE_KINDS = ("cls", "patch-mean", "codes")
# Below this many feature values a fit runs single-threaded: L-BFGS makes thousands of tiny calls, and intra-op
# thread hand-offs then cost ~100x the arithmetic (measured 15 ms vs 0.1 ms per step on a loaded 2-core machine).
_SINGLE_THREAD_NUMEL = 1 << 22
DEFAULT_L2_GRID = tuple(float(v) for v in np.logspace(-6, 1, 8))


@dataclass
class LinearClassifier:
    """A fitted multinomial logistic regression on standardized features.

    Attributes:
        weight: (F, C) float32.
        bias: (C,) float32.
        mean: (F,) feature mean used for standardization.
        std: (F,) feature std used for standardization.
        l2: the L2 strength it was fitted with.
    """

    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor
    l2: float

    def logits(self, features: Tensor) -> Tensor:
        """(N, F) raw features -> (N, C) logits."""
        return ((features.float() - self.mean) / self.std) @ self.weight + self.bias


@torch.no_grad()
def extract_features_multi(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    kind: str = "cls",
    *,
    label_keys: Sequence[str | None] = (None,),
    device: str | torch.device | None = None,
) -> tuple[Tensor, dict[str | None, Tensor]]:
    """Frozen features of every batch, with the labels of several tasks (one pass over the images).

    Args:
        model: a :class:`qlip.QLIP` with its vision part (and quantizer for ``codes``).
        batches: collated batches with "image" and "label" (or ``labels[key]`` for shapes tasks).
        kind: one of :data:`FEATURE_KINDS` (see the module docstring).
        label_keys: None for ``batch["label"]``, or shapes task names.
        device: where to run (defaults to the model's device).

    Returns:
        float32 features (N, F) and, per key, int64 labels (N,), on the CPU.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; choose one of {FEATURE_KINDS}")
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    feats: list[Tensor] = []
    labels: dict[str | None, list[Tensor]] = {k: [] for k in label_keys}
    for batch in batches:
        images = batch["image"]
        if images.shape[0] == 0:
            continue
        x = images.to(device, param.dtype)
        if kind == "codes":
            f = rearrange(model.encode(x, output="codes"), "b h w d -> b (h w d)")
        else:
            out = model.visual(x)
            f = model.visual.post_norm(out.cls) if kind == "cls" else out.patches.mean(dim=1)
        feats.append(f.float().cpu())
        for k in label_keys:
            labels[k].append(batch_labels(batch, k).cpu())
    if not feats:
        raise ValueError("no images to extract features from: the data gave no readable samples")
    return torch.cat(feats), {k: torch.cat(v).long() for k, v in labels.items()}


def extract_features(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    kind: str = "cls",
    *,
    label_key: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Frozen features (N, F) and labels (N,) of every batch (see :func:`extract_features_multi`)."""
    x, labels = extract_features_multi(model, batches, kind, label_keys=(label_key,), device=device)
    return x, labels[label_key]


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None or n == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _standardizer(x: Tensor) -> tuple[Tensor, Tensor]:
    mean = x.mean(dim=0)
    # Constant features (std 0) would divide by zero; leaving them unscaled makes them exactly 0 after centring.
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
    return mean, std


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    l2: float,
    *,
    max_iter: int = 200,
    standardize: tuple[Tensor, Tensor] | None = None,
    init: LinearClassifier | None = None,
) -> LinearClassifier:
    """Full-batch L-BFGS fit of mean cross-entropy + ``l2`` * ||W||^2.

    Args:
        features: (N, F) raw features.
        labels: (N,) int64 in [0, num_classes).
        num_classes: C.
        l2: L2 strength on the weights (>= 0).
        max_iter: L-BFGS iterations.
        standardize: (mean, std) to use; defaults to those of ``features``.
        init: start from this classifier's weights (warm start along an L2 grid); zeros otherwise.

    Returns:
        The fitted :class:`LinearClassifier`.
    """
    if l2 < 0:
        raise ValueError(f"l2 strength must be >= 0, got {l2}")
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"need features (N, F) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    mean, std = standardize if standardize is not None else _standardizer(features.float())
    x = ((features.float() - mean) / std).double()  # float64: L-BFGS curvature pairs are sensitive to round-off
    y = labels.long()
    if init is not None:
        weight = init.weight.double().clone().requires_grad_(True)
        bias = init.bias.double().clone().requires_grad_(True)
    else:
        weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7, tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _threads(1 if x.numel() < _SINGLE_THREAD_NUMEL else None):
        opt.step(closure)
    return LinearClassifier(weight.detach().float(), bias.detach().float(), mean, std, float(l2))


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 2:
        raise ValueError(f"need at least 3 training samples to hold some out for choosing the L2 strength, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
) -> dict[str, Any]:
    """The pinned probe: choose L2 on a held-out part of the training split, refit on all of it, score the test split.

    Args:
        train_features: (N, F) features of the training split.
        train_labels: (N,) labels.
        test_features: (M, F) features of the evaluation split.
        test_labels: (M,) labels.
        num_classes: C (defaults to 1 + the largest label seen).
        l2_grid: candidate L2 strengths.
        val_fraction: share of the training split held out for choosing the strength.
        seed: seed of the held-out split.
        max_iter: L-BFGS iterations per fit.

    Returns:
        ``{"top1", "top5" (C >= 5), "majority" (share of the test split's most frequent class), "l2",
        "val_top1" {l2: acc}, "train_top1", "n_train", "n_test", "num_classes", "feature_dim"}``.
    """
    if not l2_grid:
        raise ValueError("l2_grid is empty; give at least one L2 strength")
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    fit_idx, val_idx = _split_indices(train_features.shape[0], val_fraction, seed)
    fit_x, fit_y = train_features[fit_idx], train_labels[fit_idx]
    val_scores: dict[float, float] = {}
    clf = None
    for l2 in sorted(l2_grid, reverse=True):  # strong to weak: each fit warm-starts from the smoother solution
        clf = fit_logistic_regression(fit_x, fit_y, num_classes, l2, max_iter=max_iter, init=clf)
        pred = clf.logits(train_features[val_idx]).argmax(dim=-1)
        val_scores[float(l2)] = float((pred == train_labels[val_idx]).float().mean())
        logger.info("linear probe: l2=%g held-out top-1 %.4f", l2, val_scores[float(l2)])
    best = max(val_scores.values())
    chosen = max(l2 for l2, acc in val_scores.items() if acc == best)  # ties: the stronger regularization
    clf = fit_logistic_regression(train_features, train_labels, num_classes, chosen, max_iter=max_iter)
    summary = accuracy_summary(clf.logits(test_features), test_labels.long(), topk=(1, 5), confusion=False)
    train_acc = float((clf.logits(train_features).argmax(dim=-1) == train_labels).float().mean())
    return {
        **{k: v for k, v in summary.items() if k.startswith("top")},
        "majority": summary["majority"],
        "l2": chosen,
        "val_top1": {f"{k:g}": v for k, v in val_scores.items()},
        "train_top1": train_acc,
        "n_train": int(train_features.shape[0]),
        "n_test": int(test_features.shape[0]),
        "num_classes": int(num_classes),
        "feature_dim": int(train_features.shape[1]),
    }
