"""Image-text retrieval: ranks and Recall@K against a brute-force reference, ties and several captions per image."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from qlip.eval.retrieval import retrieval_ranks, retrieval_summary

torch.set_num_threads(1)


def _brute_force(image_emb, text_emb, owners):
    """Rank of the right answer per query, by sorting every candidate list (ties: wrong candidates first)."""
    n, m = image_emb.shape[0], text_emb.shape[0]
    sim = (image_emb @ text_emb.T).tolist()
    image_ranks = []
    for i in range(n):
        # Sort by score descending; among equal scores the wrong captions come first (ties count against the model).
        order = sorted(range(m), key=lambda j: (-sim[i][j], owners[j] == i))
        image_ranks.append(1 + next(pos for pos, j in enumerate(order) if owners[j] == i))
    caption_ranks = []
    for j in range(m):
        order = sorted(range(n), key=lambda i: (-sim[i][j], i == owners[j]))
        caption_ranks.append(1 + order.index(owners[j]))
    return image_ranks, caption_ranks


def _random_pairs(seed, n, captions_per_image, dim=6, levels=None):
    g = torch.Generator().manual_seed(seed)
    owners = torch.tensor([i for i in range(n) for _ in range(captions_per_image[i])], dtype=torch.long)
    owners = owners[torch.randperm(len(owners), generator=g)]  # captions in any order
    image_emb = torch.randn(n, dim, generator=g)
    text_emb = image_emb[owners] + 1.5 * torch.randn(len(owners), dim, generator=g)
    if levels:  # few distinct values: many exactly tied scores
        image_emb = torch.randint(-levels, levels + 1, (n, dim), generator=g).float()
        text_emb = torch.randint(-levels, levels + 1, (len(owners), dim), generator=g).float()
    return image_emb, text_emb, owners


@pytest.mark.parametrize("seed,levels", [(0, None), (1, None), (2, 1), (3, 2)])
def test_ranks_match_brute_force_with_ties_and_several_captions(seed, levels):
    counts = [1 + (i * 7 + seed) % 4 for i in range(23)]  # 1 to 4 captions per image
    image_emb, text_emb, owners = _random_pairs(seed, 23, counts, levels=levels)
    image_ranks, caption_ranks = retrieval_ranks(image_emb, text_emb, owners, chunk=5)
    ref_images, ref_captions = _brute_force(image_emb, text_emb, owners.tolist())
    assert image_ranks.tolist() == ref_images
    assert caption_ranks.tolist() == ref_captions
    summary = retrieval_summary(image_emb, text_emb, owners)
    for k in (1, 5, 10):
        assert summary["i2t"][f"R@{k}"] == pytest.approx(sum(r <= k for r in ref_images) / len(ref_images))
        assert summary["t2i"][f"R@{k}"] == pytest.approx(sum(r <= k for r in ref_captions) / len(ref_captions))
    assert summary["i2t"]["mean_rank"] == pytest.approx(statistics.fmean(ref_images))
    assert summary["t2i"]["median_rank"] == pytest.approx(sorted(ref_captions)[(len(ref_captions) - 1) // 2])
    assert summary["num_images"] == 23 and summary["num_captions"] == sum(counts)


def test_equal_embeddings_rank_last_and_perfect_ones_first():
    owners = torch.tensor([0, 0, 1, 2, 2, 2])
    flat = retrieval_summary(torch.ones(3, 4), torch.ones(6, 4), owners)
    assert flat["t2i"]["R@1"] == 0.0 and flat["t2i"]["mean_rank"] == 3.0  # every tie counted against the model
    assert flat["i2t"]["R@1"] == 0.0
    eye = torch.eye(3)
    perfect = retrieval_summary(eye, eye[owners], owners)
    assert perfect["i2t"]["R@1"] == 1.0 and perfect["t2i"]["R@1"] == 1.0 and perfect["t2i"]["median_rank"] == 1.0
    assert "R@5" not in perfect["t2i"]  # only 3 images to rank: R@5 would be trivially 1


def test_chance_levels():
    owners = torch.tensor([0, 1, 1, 2, 2, 2] + list(range(3, 20)))
    s = retrieval_summary(torch.randn(20, 3), torch.randn(23, 3), owners)
    assert s["chance"]["t2i"]["R@1"] == pytest.approx(1 / 20) and s["chance"]["t2i"]["mean_rank"] == 10.5
    counts = [1, 2, 3] + [1] * 17
    expect = sum(1 - math.comb(23 - c, 5) / math.comb(23, 5) for c in counts) / 20
    assert s["chance"]["i2t"]["R@5"] == pytest.approx(expect)


def test_an_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_ranks(torch.randn(3, 2), torch.randn(2, 2), torch.tensor([0, 2]))
