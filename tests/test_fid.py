"""FID: the Inception network's weight layout, the Frechet distance, streaming statistics and the stats cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlip.eval.fid import (
    FeatureStats,
    StreamingFeatureStats,
    accumulate_inception_stats,
    feature_stats,
    fid_result,
    frechet_distance,
    load_fid_network,
    load_or_compute_reference_stats,
    reference_stats_path,
    stats_cache_key,
)
from qlip.eval.inception import FIDInceptionV3
from qlip.weights import WeightsMismatchError

torch.set_num_threads(1)

# Every convolution of the standard FID weights file pt_inception-2015-12-05-6726825d.pth (the TF 2015-12-05 graph
# as ported for pytorch-fid: torchvision's Inception3 layout with num_classes=1008 and no AuxLogits):
# name, then the conv weight shape (out, in, kh, kw). Each contributes 5 keys: NAME.conv.weight (bias-free conv)
# and NAME.bn.{weight,bias,running_mean,running_var} of shape (out,).
EXPECTED_CONVS = """
    Conv2d_1a_3x3              32 3 3 3
    Conv2d_2a_3x3              32 32 3 3
    Conv2d_2b_3x3              64 32 3 3
    Conv2d_3b_1x1              80 64 1 1
    Conv2d_4a_3x3              192 80 3 3
    Mixed_5b.branch1x1         64 192 1 1
    Mixed_5b.branch5x5_1       48 192 1 1
    Mixed_5b.branch5x5_2       64 48 5 5
    Mixed_5b.branch3x3dbl_1    64 192 1 1
    Mixed_5b.branch3x3dbl_2    96 64 3 3
    Mixed_5b.branch3x3dbl_3    96 96 3 3
    Mixed_5b.branch_pool       32 192 1 1
    Mixed_5c.branch1x1         64 256 1 1
    Mixed_5c.branch5x5_1       48 256 1 1
    Mixed_5c.branch5x5_2       64 48 5 5
    Mixed_5c.branch3x3dbl_1    64 256 1 1
    Mixed_5c.branch3x3dbl_2    96 64 3 3
    Mixed_5c.branch3x3dbl_3    96 96 3 3
    Mixed_5c.branch_pool       64 256 1 1
    Mixed_5d.branch1x1         64 288 1 1
    Mixed_5d.branch5x5_1       48 288 1 1
    Mixed_5d.branch5x5_2       64 48 5 5
    Mixed_5d.branch3x3dbl_1    64 288 1 1
    Mixed_5d.branch3x3dbl_2    96 64 3 3
    Mixed_5d.branch3x3dbl_3    96 96 3 3
    Mixed_5d.branch_pool       64 288 1 1
    Mixed_6a.branch3x3         384 288 3 3
    Mixed_6a.branch3x3dbl_1    64 288 1 1
    Mixed_6a.branch3x3dbl_2    96 64 3 3
    Mixed_6a.branch3x3dbl_3    96 96 3 3
    Mixed_6b.branch1x1         192 768 1 1
    Mixed_6b.branch7x7_1       128 768 1 1
    Mixed_6b.branch7x7_2       128 128 1 7
    Mixed_6b.branch7x7_3       192 128 7 1
    Mixed_6b.branch7x7dbl_1    128 768 1 1
    Mixed_6b.branch7x7dbl_2    128 128 7 1
    Mixed_6b.branch7x7dbl_3    128 128 1 7
    Mixed_6b.branch7x7dbl_4    128 128 7 1
    Mixed_6b.branch7x7dbl_5    192 128 1 7
    Mixed_6b.branch_pool       192 768 1 1
    Mixed_6c.branch1x1         192 768 1 1
    Mixed_6c.branch7x7_1       160 768 1 1
    Mixed_6c.branch7x7_2       160 160 1 7
    Mixed_6c.branch7x7_3       192 160 7 1
    Mixed_6c.branch7x7dbl_1    160 768 1 1
    Mixed_6c.branch7x7dbl_2    160 160 7 1
    Mixed_6c.branch7x7dbl_3    160 160 1 7
    Mixed_6c.branch7x7dbl_4    160 160 7 1
    Mixed_6c.branch7x7dbl_5    192 160 1 7
    Mixed_6c.branch_pool       192 768 1 1
    Mixed_6d.branch1x1         192 768 1 1
    Mixed_6d.branch7x7_1       160 768 1 1
    Mixed_6d.branch7x7_2       160 160 1 7
    Mixed_6d.branch7x7_3       192 160 7 1
    Mixed_6d.branch7x7dbl_1    160 768 1 1
    Mixed_6d.branch7x7dbl_2    160 160 7 1
    Mixed_6d.branch7x7dbl_3    160 160 1 7
    Mixed_6d.branch7x7dbl_4    160 160 7 1
    Mixed_6d.branch7x7dbl_5    192 160 1 7
    Mixed_6d.branch_pool       192 768 1 1
    Mixed_6e.branch1x1         192 768 1 1
    Mixed_6e.branch7x7_1       192 768 1 1
    Mixed_6e.branch7x7_2       192 192 1 7
    Mixed_6e.branch7x7_3       192 192 7 1
    Mixed_6e.branch7x7dbl_1    192 768 1 1
    Mixed_6e.branch7x7dbl_2    192 192 7 1
    Mixed_6e.branch7x7dbl_3    192 192 1 7
    Mixed_6e.branch7x7dbl_4    192 192 7 1
    Mixed_6e.branch7x7dbl_5    192 192 1 7
    Mixed_6e.branch_pool       192 768 1 1
    Mixed_7a.branch3x3_1       192 768 1 1
    Mixed_7a.branch3x3_2       320 192 3 3
    Mixed_7a.branch7x7x3_1     192 768 1 1
    Mixed_7a.branch7x7x3_2     192 192 1 7
    Mixed_7a.branch7x7x3_3     192 192 7 1
    Mixed_7a.branch7x7x3_4     192 192 3 3
    Mixed_7b.branch1x1         320 1280 1 1
    Mixed_7b.branch3x3_1       384 1280 1 1
    Mixed_7b.branch3x3_2a      384 384 1 3
    Mixed_7b.branch3x3_2b      384 384 3 1
    Mixed_7b.branch3x3dbl_1    448 1280 1 1
    Mixed_7b.branch3x3dbl_2    384 448 3 3
    Mixed_7b.branch3x3dbl_3a   384 384 1 3
    Mixed_7b.branch3x3dbl_3b   384 384 3 1
    Mixed_7b.branch_pool       192 1280 1 1
    Mixed_7c.branch1x1         320 2048 1 1
    Mixed_7c.branch3x3_1       384 2048 1 1
    Mixed_7c.branch3x3_2a      384 384 1 3
    Mixed_7c.branch3x3_2b      384 384 3 1
    Mixed_7c.branch3x3dbl_1    448 2048 1 1
    Mixed_7c.branch3x3dbl_2    384 448 3 3
    Mixed_7c.branch3x3dbl_3a   384 384 1 3
    Mixed_7c.branch3x3dbl_3b   384 384 3 1
    Mixed_7c.branch_pool       192 2048 1 1
"""
# The classifier in the file: 1008 classes (1000 ImageNet classes + 8 unused in the TF graph).
EXPECTED_FC = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}


def _expected_inception_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for line in EXPECTED_CONVS.strip().splitlines():
        name, *dims = line.split()
        out, inp, kh, kw = (int(d) for d in dims)
        shapes[f"{name}.conv.weight"] = (out, inp, kh, kw)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{leaf}"] = (out,)
    shapes.update(EXPECTED_FC)
    return shapes


@pytest.fixture(scope="module")
def random_net() -> FIDInceptionV3:
    torch.manual_seed(0)
    return FIDInceptionV3(allow_random_weights=True)


def test_inception_state_dict_matches_standard_file_layout(random_net):
    expected = _expected_inception_shapes()
    assert len(expected) == 94 * 5 + 2
    ours = {k: tuple(v.shape) for k, v in random_net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: ours[k] for k in expected} == expected
    # Independent cross-check: torchvision documents 27,161,264 parameters for inception_v3 (1000 classes, with the
    # auxiliary classifier). Minus the aux head (3,326,696) plus 8 more classes (8 * 2049) = 23,850,960.
    trainable = sum(p.numel() for p in random_net.parameters())
    assert trainable == 27_161_264 - 3_326_696 + 8 * 2049


def test_inception_fid_specific_pools_and_eps(random_net):
    assert random_net.Mixed_7b.pool == "avg"
    assert random_net.Mixed_7c.pool == "max"
    assert all(m.eps == 1e-3 for m in random_net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not any(p.requires_grad for p in random_net.parameters())


def test_inception_forward_shape_and_refuses_random_weights(random_net):
    x = torch.rand(2, 3, 64, 64)
    feats = random_net(x)
    assert feats.shape == (2, 2048)
    assert torch.isfinite(feats).all()
    with pytest.raises(RuntimeError, match="from_file"):
        FIDInceptionV3()(x)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        random_net(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        random_net(torch.rand(2, 3, 64, 64) * 255)


def test_avg_pool_excludes_padding():
    # The FID graph divides border windows by the number of real pixels: a constant map stays constant.
    from qlip.eval.inception import _avg_pool_same

    x = torch.ones(1, 1, 5, 5)
    assert torch.allclose(_avg_pool_same(x), x)


@pytest.mark.parametrize("with_counter", [True, False])
def test_from_file_round_trip_with_or_without_num_batches_tracked(tmp_path, random_net, with_counter):
    state = random_net.state_dict()
    if not with_counter:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    loaded = FIDInceptionV3.from_file(path)
    assert loaded.weights_loaded and not loaded.training
    x = torch.rand(1, 3, 40, 40)
    torch.testing.assert_close(loaded(x), random_net(x))


def test_from_file_reports_missing_and_unexpected_keys_by_name(tmp_path, random_net):
    state = dict(random_net.state_dict())
    del state["Mixed_6c.branch7x7_2.bn.running_var"]
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError) as err:
        FIDInceptionV3.from_file(path)
    message = str(err.value)
    assert "Mixed_6c.branch7x7_2.bn.running_var" in message
    assert "AuxLogits.fc.weight" in message
    assert "fc.bias: file (1000,) vs network (1008,)" in message


def test_missing_weights_make_fid_unavailable(tmp_path):
    net, reason = load_fid_network(None)
    assert net is None and "pt_inception-2015-12-05-6726825d.pth" in reason
    net, reason = load_fid_network(tmp_path / "nope.pth")
    assert net is None and "does not exist" in reason
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    net, reason = load_fid_network(tmp_path / "list.pth")
    assert net is None and "not a plain state dict" in reason
    (tmp_path / "truncated.pth").write_bytes(b"PK\x03\x04 not really a zip")
    net, reason = load_fid_network(tmp_path / "truncated.pth")
    assert net is None and "could not be read" in reason


# ------------------------------------------------------------------------------------------------ Frechet distance


def test_fid_of_a_set_against_itself_is_zero():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64))
    stats = feature_stats(feats)
    assert abs(frechet_distance(stats, stats)) < 1e-6


def test_fid_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    s1 = FeatureStats(mean=mu1, cov=np.diag(v1), count=100)
    s2 = FeatureStats(mean=mu2, cov=np.diag(v2), count=100)
    # Diagonal covariances commute, so (S1 S2)^(1/2) is the elementwise sqrt(v1 v2).
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(s1, s2) == pytest.approx(closed, rel=1e-10)
    assert fid_result(s1, s2)["value"] == pytest.approx(closed, rel=1e-10)


def test_fid_full_covariances_match_symmetric_formula():
    rng = np.random.default_rng(2)
    d = 16
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    c1, c2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    s1 = FeatureStats(mean=np.zeros(d), cov=c1, count=10)
    s2 = FeatureStats(mean=np.ones(d), cov=c2, count=10)
    # Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), computed here with eigendecompositions only.
    w, v = np.linalg.eigh(c1)
    root1 = (v * np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ c2 @ root1)
    expected = d + np.trace(c1) + np.trace(c2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
    assert frechet_distance(s1, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_with_singular_covariances_is_finite():
    rng = np.random.default_rng(3)
    # Fewer samples than dimensions: rank-deficient covariances, the case the eps*I retry exists for.
    x, y = rng.normal(size=(10, 40)), rng.normal(size=(10, 40)) + 0.5
    value = frechet_distance(feature_stats(x), feature_stats(y))
    assert np.isfinite(value) and value > 0


def test_fid_retries_with_eps_offset_when_sqrtm_fails(monkeypatch, caplog):
    import qlip.eval.fid as fid_module

    real_sqrtm = fid_module.scipy.linalg.sqrtm
    seen: list[np.ndarray] = []

    def flaky_sqrtm(a):
        seen.append(a)
        return np.full_like(a, np.nan) if len(seen) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid_module.scipy.linalg, "sqrtm", flaky_sqrtm)
    v1, v2 = np.array([1.0, 2.0, 0.0]), np.array([3.0, 0.5, 4.0])
    s1 = FeatureStats(mean=np.zeros(3), cov=np.diag(v1), count=5)
    s2 = FeatureStats(mean=np.zeros(3), cov=np.diag(v2), count=5)
    eps = 1e-6
    with caplog.at_level("WARNING"):
        value = frechet_distance(s1, s2, eps=eps)
    assert len(seen) == 2 and "singular" in caplog.text
    np.testing.assert_allclose(seen[1], np.diag((v1 + eps) * (v2 + eps)))
    closed = np.sum(v1 + v2 - 2 * np.sqrt((v1 + eps) * (v2 + eps)))
    assert value == pytest.approx(closed, rel=1e-12)


def test_fid_large_imaginary_part_is_an_error(monkeypatch):
    import qlip.eval.fid as fid_module

    monkeypatch.setattr(fid_module.scipy.linalg, "sqrtm", lambda a: np.eye(a.shape[0]) * (1 + 0.5j))
    stats = FeatureStats(mean=np.zeros(2), cov=np.eye(2), count=5)
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(stats, stats)
    monkeypatch.setattr(fid_module.scipy.linalg, "sqrtm", lambda a: np.eye(a.shape[0]) * (1 + 1e-9j))
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-12)


def test_fid_rejects_mismatched_dimensions():
    s1 = FeatureStats(mean=np.zeros(3), cov=np.eye(3), count=3)
    s2 = FeatureStats(mean=np.zeros(4), cov=np.eye(4), count=3)
    with pytest.raises(ValueError, match="same feature network"):
        frechet_distance(s1, s2)


def test_streaming_stats_equal_one_shot_stats():
    rng = np.random.default_rng(4)
    # A large common offset is where naive sum / sum-of-squares accumulation loses digits.
    feats = 1e4 + rng.normal(size=(257, 24)) * rng.uniform(0.01, 5.0, size=24)
    acc = StreamingFeatureStats(24)
    for start, stop in [(0, 1), (1, 60), (60, 60), (60, 200), (200, 257)]:
        acc.update(torch.from_numpy(feats[start:stop]) if start % 2 else feats[start:stop])
    streamed, direct = acc.compute(), feature_stats(feats)
    assert streamed.count == direct.count == 257
    np.testing.assert_allclose(streamed.mean, direct.mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(streamed.cov, direct.cov, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="dimension"):
        acc.update(np.zeros((2, 5)))


def test_accumulate_inception_stats_runs_the_network(random_net):
    torch.manual_seed(1)
    batches = [torch.rand(2, 3, 32, 32), (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8)]
    stats = accumulate_inception_stats(random_net, batches).compute()
    assert stats.count == 3 and stats.mean.shape == (2048,) and stats.cov.shape == (2048, 2048)


# ------------------------------------------------------------------------------------------------ reference cache


def test_reference_stats_cache_round_trip_and_key_sensitivity(tmp_path):
    rng = np.random.default_rng(5)
    calls: list[int] = []

    def compute() -> FeatureStats:
        calls.append(1)
        return feature_stats(rng.normal(size=(20, 8)))

    prep = {"resize": 256, "crop": 256, "interpolation": "bicubic"}
    first = load_or_compute_reference_stats(tmp_path, "imagenet-val", prep, compute)
    again = load_or_compute_reference_stats(tmp_path, "imagenet-val", dict(reversed(prep.items())), compute)
    assert len(calls) == 1  # second call hit the cache; the order of the preprocessing fields does not matter
    np.testing.assert_array_equal(first.mean, again.mean)
    np.testing.assert_array_equal(first.cov, again.cov)
    assert again.count == 20 and again.mean.dtype == np.float64

    other_crop = {**prep, "crop": 224}
    assert reference_stats_path(tmp_path, "imagenet-val", other_crop) != reference_stats_path(
        tmp_path, "imagenet-val", prep
    )
    val_path = reference_stats_path(tmp_path, "imagenet-val", prep)
    assert reference_stats_path(tmp_path, "imagenet-train", prep) != val_path
    load_or_compute_reference_stats(tmp_path, "imagenet-val", other_crop, compute)
    assert len(calls) == 2


def test_cache_file_with_foreign_key_is_recomputed(tmp_path):
    prep = "resize256-crop256"
    path = reference_stats_path(tmp_path, "ds", prep)
    FeatureStats(mean=np.zeros(4), cov=np.eye(4), count=2).save(path, key=stats_cache_key("other", prep))
    fresh = FeatureStats(mean=np.ones(4), cov=np.eye(4), count=5)
    got = load_or_compute_reference_stats(tmp_path, "ds", prep, lambda: fresh)
    np.testing.assert_array_equal(got.mean, np.ones(4))
    assert FeatureStats.load(path).count == 5
