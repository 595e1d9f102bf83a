"""PSNR / SSIM against scikit-image on real images, and the metric-result convention."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from qlip.eval.metrics import metric_available, metric_unavailable, psnr, ssim
from qlip.transforms import pixels_to_uint8

skimage = pytest.importorskip("skimage")
from skimage import data as skdata  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # noqa: E402

torch.set_num_threads(1)


def _sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1
    )


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def astronaut_pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 256x256 crop of the astronaut, a JPEG-compressed copy and a noised copy (HWC uint8)."""
    img = skdata.astronaut()[100:356, 120:376]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=20)
    jpeg = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    rng = np.random.default_rng(0)
    noisy = np.clip(img.astype(np.float64) + rng.normal(0.0, 15.0, img.shape), 0, 255).astype(np.uint8)
    return img, jpeg, noisy


def test_psnr_matches_skimage_per_image(astronaut_pairs):
    img, jpeg, noisy = astronaut_pairs
    ours = psnr(torch.stack([_chw(img), _chw(img)]), torch.stack([_chw(jpeg), _chw(noisy)]))
    assert ours.shape == (2,)
    assert ours[0].item() == pytest.approx(peak_signal_noise_ratio(img, jpeg, data_range=255), abs=1e-9)
    assert ours[1].item() == pytest.approx(peak_signal_noise_ratio(img, noisy, data_range=255), abs=1e-9)
    # Per image, not pooled: the mean of per-image PSNRs differs from the PSNR of the pooled MSE.
    assert ours[0] != pytest.approx(ours[1].item(), abs=0.1)


def test_psnr_known_value_and_float_convention():
    a = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    b = torch.full((1, 3, 8, 8), 10, dtype=torch.uint8)
    # MSE = 100 -> 10 log10(255^2 / 100)
    expected = 10 * math.log10(255**2 / 100)
    assert psnr(a, b).item() == pytest.approx(expected, abs=1e-12)
    # The same images as floats in [0, 1] give the same number.
    assert psnr(a.float() / 255, b.double() / 255).item() == pytest.approx(expected, abs=1e-9)
    assert math.isinf(psnr(a, a).item())


def test_ssim_matches_skimage_on_real_images(astronaut_pairs):
    img, jpeg, noisy = astronaut_pairs
    ours = ssim(torch.stack([_chw(img), _chw(img)]), torch.stack([_chw(jpeg), _chw(noisy)]))
    assert ours[0].item() == pytest.approx(_sk_ssim(img, jpeg), abs=1e-6)
    assert ours[1].item() == pytest.approx(_sk_ssim(img, noisy), abs=1e-6)
    assert 0.2 < ours[1].item() < ours[0].item() < 1.0


def test_ssim_identity_and_float_input(astronaut_pairs):
    img, jpeg, _ = astronaut_pairs
    x = _chw(img)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)
    as_float = ssim(x.float() / 255, _chw(jpeg).float() / 255).item()
    assert as_float == pytest.approx(_sk_ssim(img, jpeg), abs=1e-5)


def test_ssim_non_square_and_small_image_error():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(23, 31, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, size=a.shape), 0, 255).astype(np.uint8)
    assert ssim(_chw(a), _chw(b)).item() == pytest.approx(_sk_ssim(a, b), abs=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_shape_and_dtype_errors_are_actionable():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(TypeError, match="uint8"):
        psnr(torch.zeros(1, 3, 8, 8, dtype=torch.int32), torch.zeros(1, 3, 8, 8, dtype=torch.int32))


def test_pixels_to_uint8_rounds_and_clamps():
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0])
    assert pixels_to_uint8(x).tolist() == [0, 0, 128, 255, 255]


def test_metric_result_convention():
    assert metric_unavailable("no weights file: pass --inception-weights") == {
        "value": None,
        "available": False,
        "reason": "no weights file: pass --inception-weights",
    }
    assert metric_available(3, num_images=5) == {"value": 3.0, "available": True, "num_images": 5}
    with pytest.raises(ValueError):
        metric_unavailable("")
