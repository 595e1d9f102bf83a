"""Reconstruction evaluation on real images, whole-set code usage, and 'unavailable' instead of made-up numbers."""

from __future__ import annotations

import pytest
import torch

from qlip.eval.codes import CodeUsageAccumulator, compression_ratio
from qlip.eval.fid import FIDNetwork, load_fid_network
from qlip.eval.recon import evaluate_reconstruction, resolve_lpips_weights
from qlip.quantizers.bsq import usage_stats

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model():
    import qlip

    return qlip.create_model("qlip-tiny", parts=("vision", "quantizer", "decoder"))


@pytest.fixture(scope="module")
def photo_batches(image_files):
    from qlip.transforms import image_transform, load_image

    t = image_transform(32, train=False)
    imgs = torch.stack([t(load_image(image_files[k])) for k in ("rgb", "jpeg", "gray", "rgba")])
    return [{"image": imgs[:3], "label": torch.zeros(3)}, {"image": imgs[3:], "label": torch.zeros(1)}]


def test_recon_on_real_images_gives_finite_metrics_and_usage(tiny_model, photo_batches):
    result = evaluate_reconstruction(tiny_model, photo_batches, keep_examples=3)
    m = result.metrics
    assert m["num_images"] == 4
    for key in ("psnr", "ssim"):
        assert m[key]["available"] and torch.isfinite(torch.tensor(m[key]["value"]))
    assert 0 < m["psnr"]["value"] < 60 and -1 <= m["ssim"]["value"] <= 1
    u = m["usage"]
    assert u["num_tokens"] == 4 * 16 and u["num_bits"] == 8 and u["codebook_size"] == 256
    assert 1 <= u["distinct_codes"] <= 64 and len(u["bit_mean"]) == len(u["bit_entropy"]) == 8
    assert u["code_perplexity"] <= u["distinct_codes"] + 1e-6
    assert m["compression_ratio"] == pytest.approx(24 * 64 / 8)
    # the kept examples are uint8 originals / reconstructions of the first images
    assert result.originals.shape == result.reconstructions.shape == (3, 3, 32, 32)
    assert result.originals.dtype == torch.uint8


def test_recon_psnr_matches_decode_of_encode(tiny_model, photo_batches):
    from qlip.eval.metrics import psnr
    from qlip.transforms import denormalize, pixels_to_uint8

    x = photo_batches[0]["image"]
    with torch.no_grad():
        recon = tiny_model.reconstruct(x)
    expected = psnr(pixels_to_uint8(denormalize(x)), pixels_to_uint8(denormalize(recon))).mean()
    got = evaluate_reconstruction(tiny_model, photo_batches[:1]).metrics["psnr"]["value"]
    assert got == pytest.approx(float(expected), abs=1e-6)


def test_missing_or_bad_weights_are_unavailable_not_numbers(tiny_model, photo_batches, tmp_path):
    m = evaluate_reconstruction(tiny_model, photo_batches).metrics
    for key in ("lpips", "rfid"):
        assert m[key]["available"] is False and m[key]["value"] is None
        assert "weights" in m[key]["reason"]
    fid = load_fid_network(tmp_path / "missing.pth")
    lpips = resolve_lpips_weights(tmp_path)  # a directory without the two files
    m = evaluate_reconstruction(tiny_model, photo_batches, fid_network=fid, lpips_network=lpips).metrics
    assert m["rfid"]["value"] is None and "unusable" in m["rfid"]["reason"]
    assert m["lpips"]["value"] is None and "unusable" in m["lpips"]["reason"]
    assert resolve_lpips_weights(tmp_path / "nope").net is None


class StandInFID(torch.nn.Module):
    """A fixed random projection of pixel statistics to 8 features: exercises the rFID plumbing in milliseconds."""

    feature_dim = 8

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.proj = torch.nn.Linear(3 * 4 * 4, 8)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert images.dtype == torch.uint8  # the protocol feeds what a PNG would hold
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return self.proj(x)


def test_rfid_path_caches_reference_statistics(tiny_model, photo_batches, tmp_path):
    net = StandInFID()
    fid = FIDNetwork(net, None)
    kwargs = dict(fid_network=fid, dataset_name="photos|n=4", reference_cache_dir=tmp_path)
    first = evaluate_reconstruction(tiny_model, photo_batches, **kwargs).metrics["rfid"]
    files = list(tmp_path.glob("fid-ref-*.npz"))
    assert first["available"] and first["value"] >= 0 and len(files) == 1
    assert "only 4 images" in first["note"]
    assert net.calls == 4  # 2 batches x (reconstructions + originals)
    second = evaluate_reconstruction(tiny_model, photo_batches, **kwargs).metrics["rfid"]
    assert second["value"] == pytest.approx(first["value"], rel=1e-6)
    assert net.calls == 6  # the originals' statistics came from the cache
    other = dict(kwargs, dataset_name="photos|n=5")  # another dataset key never reuses them
    evaluate_reconstruction(tiny_model, photo_batches, **other)
    assert len(list(tmp_path.glob("fid-ref-*.npz"))) == 2


@pytest.mark.slow
def test_rfid_with_the_inception_network_runs(tiny_model, photo_batches):
    from qlip.eval.inception import FIDInceptionV3

    # Random weights only to exercise the real network's plumbing (2048-d, uint8 input); never reported as FID.
    fid = FIDNetwork(FIDInceptionV3(allow_random_weights=True).eval(), None)
    m = evaluate_reconstruction(tiny_model, photo_batches, fid_network=fid).metrics["rfid"]
    assert m["available"] and m["num_real"] == m["num_fake"] == 4


def test_wrong_image_size_is_refused(tiny_model):
    with pytest.raises(ValueError, match="eval transform"):
        evaluate_reconstruction(tiny_model, [{"image": torch.zeros(1, 3, 64, 64), "label": torch.zeros(1)}])


def test_usage_accumulator_equals_one_big_batch():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2**10, (7, 16), generator=g) % 50  # few codes: repeats across batches
    b = torch.randint(0, 2**10, (5, 16), generator=g)
    acc = CodeUsageAccumulator(10)
    acc.update(a)
    acc.update(b)
    got = acc.compute()
    ref = usage_stats(torch.cat([a.flatten(), b.flatten()]), 10)
    assert got["distinct_codes"] == int(ref["distinct_codes"])
    assert got["num_tokens"] == int(ref["num_tokens"])
    assert got["code_entropy"] == pytest.approx(float(ref["code_entropy"]), abs=1e-5)
    assert got["code_perplexity"] == pytest.approx(float(ref["code_perplexity"]), rel=1e-5)
    torch.testing.assert_close(torch.tensor(got["bit_mean"]).float(), ref["bit_mean"])
    assert got["mean_bit_entropy"] == pytest.approx(float(ref["mean_bit_entropy"]), abs=1e-5)
    with pytest.raises(ValueError, match="must lie in"):
        acc.update(torch.tensor([2**10]))


def test_compression_ratios_of_the_released_models():
    import qlip.config
    from qlip.factory import get_model_config, list_models

    assert compression_ratio is qlip.config.compression_ratio  # one formula, for the model config and the report
    for name in list_models():
        cfg = get_model_config(name)
        assert cfg.compression_ratio == compression_ratio(cfg.vision.patch_size, cfg.quantizer.dim)
    assert compression_ratio(16, 28) == pytest.approx(219.4, abs=0.05)
    assert compression_ratio(8, 28) == pytest.approx(54.86, abs=0.01)
    assert compression_ratio(14, 28) == pytest.approx(168.0)


def test_lpips_path_runs_with_a_network(tiny_model, photo_batches):
    from qlip.losses.lpips import LPIPS, LPIPSNetwork

    # Random weights only to exercise the plumbing; load_lpips_network never returns such a network.
    net = LPIPSNetwork(LPIPS(allow_random_weights=True), None)
    m = evaluate_reconstruction(tiny_model, photo_batches, lpips_network=net).metrics["lpips"]
    assert m["available"] and m["value"] >= 0 and m["net"] == "vgg16+lpips-v0.1"
