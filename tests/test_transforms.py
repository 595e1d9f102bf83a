"""Tests for qlip.transforms: image loading of every mode, bad files, eval/train transforms and their inverse."""

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from qlip.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageLoadError,
    denormalize,
    image_transform,
    load_image,
    pixels_to_uint8,
    to_pil_images,
    to_rgb,
    to_uint8,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut()).resize((128, 128))


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_load_real_images_from_path_bytes_and_file(tmp_path):
    for name, arr in [("coffee", skdata.coffee()), ("chelsea", skdata.chelsea()), ("camera", skdata.camera())]:
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(arr).save(path, quality=95)
        from_path = load_image(path)
        from_bytes = load_image(path.read_bytes())
        with open(path, "rb") as fh:
            from_file = load_image(fh)
        assert from_path.mode == "RGB"
        assert from_path.size == (arr.shape[1], arr.shape[0])
        assert np.array_equal(np.asarray(from_path), np.asarray(from_bytes))
        assert np.array_equal(np.asarray(from_path), np.asarray(from_file))
    gray = np.asarray(load_image(tmp_path / "camera.jpg"))
    # A grayscale source gives three equal channels close to the original values.
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    assert np.abs(gray[..., 0].astype(int) - skdata.camera().astype(int)).mean() < 3


def test_every_mode_becomes_rgb(astronaut, tmp_path):
    rgba_logo = Image.fromarray(skdata.logo())  # a real RGBA image
    assert rgba_logo.mode == "RGBA"
    images = {
        "1": astronaut.convert("1"),
        "L": astronaut.convert("L"),
        "LA": astronaut.convert("LA"),
        "P": astronaut.convert("P"),
        "PA": astronaut.convert("PA"),
        "RGBA": rgba_logo,
        "CMYK": astronaut.convert("CMYK"),
        "I": astronaut.convert("I"),
        "I;16": Image.fromarray(skdata.camera().astype(np.uint16) * 257),
        "F": Image.fromarray(skdata.camera().astype(np.float32) / 255.0),
        "YCbCr": astronaut.convert("YCbCr"),
    }
    for mode, img in images.items():
        assert img.mode == mode
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == img.size, mode
    # Formats that store these modes on disk go through load_image too.
    for mode, fmt in [("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("1", "PNG")]:
        path = tmp_path / f"{mode.replace(';', '_')}.{fmt.lower()}"
        images[mode].save(path, fmt)
        assert load_image(path).mode == "RGB"


def test_sixteen_bit_is_scaled_not_clipped():
    camera = skdata.camera()
    img16 = Image.fromarray(camera.astype(np.uint16) * 257)
    back = load_image(_encode(img16))
    assert np.array_equal(np.asarray(back)[..., 0], camera)
    # Mode "I" holding 16-bit values (as some TIFF/PNG readers produce) is scaled the same way.
    img32 = Image.fromarray(camera.astype(np.int32) * 257)
    assert img32.mode == "I"
    assert np.array_equal(np.asarray(to_rgb(img32))[..., 0], camera)
    # Floats in [0, 1] use the full 8-bit range.
    imgf = Image.fromarray(camera.astype(np.float32) / 255.0)
    assert np.abs(np.asarray(to_rgb(imgf))[..., 0].astype(int) - camera).max() <= 1


def test_alpha_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:2, :, 3] = 0  # top half fully transparent
    rgba[2:, :, 3] = 255  # bottom half opaque
    out = np.asarray(to_rgb(Image.fromarray(rgba)))
    assert (out[:2] == 255).all()
    assert (out[2:] == [255, 0, 0]).all()
    la = np.stack([np.zeros((2, 2), np.uint8), np.full((2, 2), 128, np.uint8)], axis=-1)
    out_la = np.asarray(to_rgb(Image.fromarray(la, "LA")))
    assert np.abs(out_la.astype(int) - 127).max() <= 1  # half-transparent black over white is mid gray


def test_bad_files_raise_image_load_error_naming_the_file(astronaut, tmp_path):
    good = _encode(astronaut, "JPEG")
    cases = {
        "empty.jpg": b"",
        "truncated.jpg": good[: len(good) // 2],
        "garbage.png": b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10,
        "text.webp": b"hello, this is not an image at all",
    }
    for name, payload in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(ImageLoadError, match=name):
            load_image(path)
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match="my-sample"):
        load_image(good[:100], name="my-sample")


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (2000, 2000)).save(path)  # compresses to a few KB
    with pytest.raises(ImageLoadError, match="bomb.png.*decompression bomb"):
        load_image(path, max_pixels=1_000_000)
    assert load_image(path).size == (2000, 2000)


def test_eval_transform_shape_range_and_center_crop():
    t = image_transform(64)
    x = t(Image.fromarray(skdata.coffee()))  # 600x400 landscape
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    lo = (0 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    hi = (1 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert (x.amin(dim=(1, 2)) >= lo - 1e-5).all() and (x.amax(dim=(1, 2)) <= hi + 1e-5).all()
    # Center crop offsets: a 10x6 image at size 6 keeps columns 2..7 (round((10 - 6) / 2) = 2).
    arr = np.zeros((6, 10, 3), dtype=np.uint8)
    arr[:, :, 0] = np.arange(10, dtype=np.uint8)[None, :] * 20
    out = to_uint8(image_transform(6)(Image.fromarray(arr)).unsqueeze(0))[0].permute(1, 2, 0)
    assert out[0, :, 0].tolist() == [40, 60, 80, 100, 120, 140]
    # Portrait: 5 wide x 9 tall at 5 -> rows 2..6.
    arr = np.zeros((9, 5, 3), dtype=np.uint8)
    arr[:, :, 1] = np.arange(9, dtype=np.uint8)[:, None] * 25
    out = to_uint8(image_transform(5)(Image.fromarray(arr)).unsqueeze(0))[0].permute(1, 2, 0)
    assert out[:, 0, 1].tolist() == [50, 75, 100, 125, 150]


def test_eval_resize_matches_pil_bicubic_shorter_side():
    img = Image.fromarray(skdata.chelsea())  # 451x300
    x = image_transform(100)(img)
    ref = img.resize((150, 100), Image.Resampling.BICUBIC).crop((25, 0, 125, 100))
    assert np.array_equal(to_uint8(x.unsqueeze(0))[0].permute(1, 2, 0).numpy(), np.asarray(ref))


def test_to_uint8_is_pixels_to_uint8_of_the_denormalized_image():
    """One rounding for both input ranges: normalized images and pixels in [0, 1] land on the same levels."""
    x = torch.randn(2, 3, 8, 8) * 2  # normalized, with values beyond [0, 1] once denormalized (clamped)
    pixels = denormalize(x)
    assert torch.equal(to_uint8(x), pixels_to_uint8(pixels))
    assert pixels_to_uint8(pixels.double()).dtype == torch.uint8
    assert torch.equal(pixels_to_uint8(to_uint8(x)), to_uint8(x))  # uint8 passes through
    with pytest.raises(TypeError, match="pixels_to_uint8"):
        pixels_to_uint8(torch.zeros(2, dtype=torch.int32))


def test_denormalize_inverts_normalize():
    pixels = torch.rand(2, 3, 8, 8)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    assert torch.allclose(denormalize((pixels - mean) / std), pixels, atol=1e-6)
    levels = torch.randint(0, 256, (2, 3, 8, 8))
    x = (levels.float() / 255 - mean) / std
    assert torch.equal(to_uint8(x), levels.to(torch.uint8))
    assert denormalize(torch.full((3, 2, 2), 100.0)).max() == 1.0
    images = to_pil_images(x)
    assert len(images) == 2 and images[0].mode == "RGB"
    assert np.array_equal(np.asarray(images[1]), levels[1].permute(1, 2, 0).numpy())


def test_train_transform_is_random_flips_and_is_picklable():
    # Left half black, right half white: a flip moves the bright side.
    arr = np.zeros((40, 40, 3), dtype=np.uint8)
    arr[:, 20:] = 255
    img = Image.fromarray(arr)
    t = image_transform(32, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.manual_seed(0)
    sides = {bool(t(img)[0, :, -1].mean() > t(img)[0, :, 0].mean()) for _ in range(20)}
    assert sides == {True, False}
    no_flip = image_transform(32, train=True, hflip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert all(no_flip(img)[0, :, -1].mean() > no_flip(img)[0, :, 0].mean() for _ in range(10))
    crops = image_transform(32, train=True, hflip=False, scale=(0.2, 0.5))
    x = crops(Image.fromarray(skdata.astronaut()))
    assert x.shape == (3, 32, 32)
    assert not torch.equal(x, crops(Image.fromarray(skdata.astronaut())))
    clone = pickle.loads(pickle.dumps(crops))
    assert clone(img).shape == (3, 32, 32)


def test_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        image_transform(0)
    with pytest.raises(ValueError, match="scale"):
        image_transform(32, train=True, scale=(0.5, 2.0))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        denormalize(torch.zeros(4, 8, 8))


def _sides_flipped(t, img: Image.Image, caption: str | None, n: int) -> int:
    """How many of ``n`` transforms of a dark-left / bright-right image came out mirrored."""
    outputs = [t(img, caption=caption) for _ in range(n)]
    return sum(bool(x[0, :, 0].mean() > x[0, :, -1].mean()) for x in outputs)


def test_caption_aware_flip_never_mirrors_a_caption_that_names_a_side():
    arr = np.zeros((40, 40, 3), dtype=np.uint8)
    arr[:, 20:] = 255
    img = Image.fromarray(arr)
    t = image_transform(32, train=True, hflip="caption", scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert t.uses_caption and not image_transform(32, train=True).uses_caption
    torch.manual_seed(0)
    for caption in ("a dog facing left.", "Right arrow", "a sign on the top-right", "LEFT", "turn clockwise.", None):
        assert _sides_flipped(t, img, caption, 40) == 0, caption
    # Whole words only: "bright" and "lefty" say nothing about sides, so these are flipped about half the time.
    torch.manual_seed(0)
    flipped = sum(_sides_flipped(t, img, caption, 100) for caption in ("a bright star.", "a cat named lefty."))
    assert 70 <= flipped <= 130  # 200 fair coin tosses: 100 +- 30 is beyond 4 standard deviations
    with pytest.raises(ValueError, match="caption"):
        image_transform(32, train=True, hflip="sometimes")


def test_crop_scale_bounds_the_area_of_the_random_crop():
    torch.manual_seed(0)
    for scale in ((0.6, 1.0), (0.2, 0.3)):
        t = image_transform(32, train=True, scale=scale, ratio=(1.0, 1.0))
        areas = [w * h / (100 * 100) for _, _, w, h in (t._random_box(100, 100) for _ in range(200))]
        assert scale[0] - 0.02 <= min(areas) and max(areas) <= scale[1] + 0.02
        assert max(areas) - min(areas) > 0.5 * (scale[1] - scale[0])  # the range is used, not one value
