"""Image-text retrieval: Recall@K, mean and median rank in both directions (docs/evaluation.md).

Protocol (the one of CLIP / COCO retrieval, with several captions per image):

* every distinct image (by its sample key) and every caption is embedded and L2-normalized; the score of a pair
  is the cosine similarity;
* image -> text: an image query is answered by all captions; its rank is that of its best-ranked own caption, so
  an image is right at K when any of its captions is among the K best;
* text -> image: a caption query is answered by all images; its rank is that of its one image;
* ties count against the model: a wrong candidate that scores exactly as high as the right one ranks before it,
  so a model whose embeddings are all equal gets the lowest rank, not the first.

Recall@K is the share of queries whose rank is at most K (K larger than the candidates is left out), the mean and
median rank are over queries (1 = first). Chance levels are those of a random ranking: for a caption query
K / N; for an image with c of M captions, 1 - C(M - c, K) / C(M, K), averaged over images; mean ranks (N + 1) / 2
and (M + 1) / (c + 1).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)


def _ranks_of_best(scores: Tensor, correct: Tensor) -> Tensor:
    """Per row, 1 + the number of wrong candidates scoring at least as high as the best correct one.

    Args:
        scores: (Q, C) query x candidate similarities.
        correct: (Q, C) bool, at least one True per row.
    """
    best = scores.masked_fill(~correct, -math.inf).amax(dim=1, keepdim=True)  # (Q, 1)
    return 1 + ((scores >= best) & ~correct).sum(dim=1)


def retrieval_ranks(image_emb: Tensor, text_emb: Tensor, caption_image: Tensor, *,
                    chunk: int = 1024) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The rank of the right answer for every image query and every caption query.

    Args:
        image_emb: (N, D) image embeddings (unit rows for cosine similarity).
        text_emb: (M, D) caption embeddings.
        caption_image: (M,) int64, the image each caption describes (every image needs at least one caption).
        chunk: queries scored at once (memory stays at chunk x max(N, M)).

    Returns:
        ``(image_ranks (N,), caption_ranks (M,))``, int64, 1 = ranked first.
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    if caption_image.shape != (m,):
        raise ValueError(f"caption_image must have shape ({m},), got {tuple(caption_image.shape)}")
    if m and (int(caption_image.min()) < 0 or int(caption_image.max()) >= n):
        raise ValueError(f"caption_image must lie in [0, {n}) for {n} images")
    counts = torch.bincount(caption_image, minlength=n)
    if n and int(counts.min()) == 0:
        raise ValueError(f"{int((counts == 0).sum())} of {n} images have no caption; every image needs one")
    image_emb, text_emb = image_emb.float(), text_emb.float()
    image_ranks = []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        scores = image_emb[rows] @ text_emb.T  # (q, M)
        image_ranks.append(_ranks_of_best(scores, caption_image.unsqueeze(0) == rows.unsqueeze(1)))
    caption_ranks = []
    for start in range(0, m, chunk):
        owners = caption_image[start : start + chunk]
        scores = text_emb[start : start + chunk] @ image_emb.T  # (q, N)
        caption_ranks.append(_ranks_of_best(scores, torch.arange(n).unsqueeze(0) == owners.unsqueeze(1)))
    empty = torch.zeros(0, dtype=torch.long)
    return (torch.cat(image_ranks) if image_ranks else empty), (torch.cat(caption_ranks) if caption_ranks else empty)


def _chance_recall_any(total: int, correct: int, k: int) -> float:
    """Probability that a random ranking of ``total`` candidates puts one of ``correct`` of them in the top ``k``."""
    if k >= total:
        return 1.0
    return 1.0 - math.comb(total - correct, k) / math.comb(total, k)


def _direction(ranks: Tensor, ks: Sequence[int], candidates: int) -> dict[str, float]:
    out = {f"R@{k}": float((ranks <= k).float().mean()) for k in ks if k <= candidates}
    out["mean_rank"] = float(ranks.float().mean())
    out["median_rank"] = float(ranks.float().median())
    return out


def retrieval_summary(image_emb: Tensor, text_emb: Tensor, caption_image: Tensor, *,
                      ks: Sequence[int] = RECALL_KS) -> dict[str, Any]:  # fmt: skip
    """Recall@K (shares in [0, 1]), mean and median rank in both directions, with the chance levels.

    Returns:
        ``{"i2t": {"R@1", ..., "mean_rank", "median_rank"}, "t2i": {...}, "chance": {"i2t": {...}, "t2i": {...}},
        "num_images", "num_captions"}``; a K larger than the candidates of a direction is left out.
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    if n < 1 or m < 1:
        raise ValueError(f"retrieval needs images and captions, got {n} images and {m} captions")
    image_ranks, caption_ranks = retrieval_ranks(image_emb, text_emb, caption_image)
    counts = torch.bincount(caption_image, minlength=n).tolist()
    i2t, t2i = _direction(image_ranks, ks, m), _direction(caption_ranks, ks, n)
    chance_i2t = {f"R@{k}": sum(_chance_recall_any(m, c, k) for c in counts) / n for k in ks if k <= m}
    chance_i2t["mean_rank"] = sum((m + 1) / (c + 1) for c in counts) / n
    chance_t2i = {f"R@{k}": min(k, n) / n for k in ks if k <= n}
    chance_t2i["mean_rank"] = (n + 1) / 2
    return {"i2t": i2t, "t2i": t2i, "chance": {"i2t": chance_i2t, "t2i": chance_t2i}, "num_images": n,
            "num_captions": m}  # fmt: skip


@torch.no_grad()
def retrieval_embeddings(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], *, tokenizer: Any = None,
                         device: str | torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Embeddings of the distinct images and of every caption of collated batches, and which image each caption has.

    Samples with the same key (one image listed with several captions) are one image: it is encoded once and owns
    all their captions. Captions come tokenized in ``batch["text"]`` or are tokenized here with ``tokenizer``; then
    the captions cut to the text context are counted and logged once.

    Returns:
        ``(image_emb (N, D), text_emb (M, D), caption_image (M,))``, float32 / int64 on the CPU.
    """
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    index: dict[str, int] = {}
    images: list[Tensor] = []
    texts: list[Tensor] = []
    owners: list[int] = []
    truncated, context = 0, 0
    for batch in batches:
        keys, captions = list(batch["key"]), list(batch["caption"])
        if not keys:
            continue
        if any(c is None for c in captions):
            raise ValueError("retrieval needs a caption for every image; this data has images without one")
        new = [i for i, k in enumerate(keys) if k not in index and keys.index(k) == i]
        if new:
            x = batch["image"][new].to(device, param.dtype)
            images.append(model.encode_image(x, normalize=True).float().cpu())
            for i in new:
                index[keys[i]] = len(index)
        if "text" in batch:
            ids = batch["text"]
        else:
            ids = tokenizer(captions)
            if hasattr(tokenizer, "count_truncated"):
                truncated += tokenizer.count_truncated(captions, ids.shape[1])
                context = ids.shape[1]
        texts.append(model.encode_text(ids.to(device), normalize=True).float().cpu())
        owners.extend(index[k] for k in keys)
    if not images:
        raise ValueError("no images to evaluate: the data gave no readable samples")
    if truncated:
        logger.warning("%d of %d captions were longer than the %d-token context and were truncated", truncated,
                       len(owners), context)  # fmt: skip
    return torch.cat(images), torch.cat(texts), torch.tensor(owners, dtype=torch.long)


def evaluate_retrieval(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], *, tokenizer: Any = None,
                       ks: Sequence[int] = RECALL_KS,
                       device: str | torch.device | None = None) -> dict[str, Any]:  # fmt: skip
    """Image <-> text retrieval over collated batches with captions (see the module docstring)."""
    image_emb, text_emb, owners = retrieval_embeddings(model, batches, tokenizer=tokenizer, device=device)
    summary = retrieval_summary(image_emb, text_emb, owners, ks=ks)
    logger.info("retrieval: %d images, %d captions, image->text R@1 %.4f, text->image R@1 %.4f",
                summary["num_images"], summary["num_captions"], summary["i2t"].get("R@1", float("nan")),
                summary["t2i"].get("R@1", float("nan")))  # fmt: skip
    return summary
