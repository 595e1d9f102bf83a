"""The fast inference paths (qlip.inference): exactness in fp32, agreement in reduced precision, no side effects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qlip
from qlip.inference import (
    FastQLIP,
    indices_to_signs,
    latents_to_indices,
    optimize_for_inference,
    resolve_mode,
)
from qlip.quantizers.bsq import BSQuantizer
from qlip.transforms import image_transform

torch.set_num_threads(1)


def _shapes_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Real (procedural) images, not noise: shapes on textured backgrounds."""
    from qlip.data.shapes import ShapesConfig, ShapesDataset

    ds = ShapesDataset(ShapesConfig.preset("hard", image_size=size), split="val", seed=seed, length=n)
    transform = image_transform(size, train=False)
    return torch.stack([transform(s["image"]) for s in ds])


@pytest.fixture(scope="module")
def model() -> qlip.QLIP:
    torch.manual_seed(0)
    return qlip.create_model("qlip-tiny")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return _shapes_images(16)


@pytest.mark.parametrize("d", [1, 8, 28, 31, 40])
def test_fused_indices_equal_quantizer(d: int) -> None:
    torch.manual_seed(d)
    u = torch.randn(3, 5, d)
    u[0, 0, 0] = 0.0  # sign(0) = -1: a zero is a 0 bit
    u[1, 2] = 0.0
    _, expected = BSQuantizer(d).quantize(u)
    got = latents_to_indices(u)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)


@pytest.mark.parametrize("d", [8, 28, 40])
def test_indices_to_signs_equal_quantizer(d: int) -> None:
    q = BSQuantizer(d)
    indices = torch.randint(0, 2**d, (4, 6), dtype=torch.int64)
    indices[0, 0] = 2**d - 1
    indices[0, 1] = 0
    assert torch.equal(indices_to_signs(indices, d), q.indices_to_codes(indices))


@pytest.mark.parametrize("output", ["indices", "bits", "group_indices", "codes"])
def test_fp32_fast_path_equals_model(model: qlip.QLIP, images: torch.Tensor, output: str) -> None:
    fast = optimize_for_inference(model, mode="fp32")
    assert fast.plan.encoder_mode == "fp32"
    assert torch.equal(fast.encode(images, output=output), model.encode(images, output=output))


def test_fp32_decode_and_reconstruct_match_model(model: qlip.QLIP, images: torch.Tensor) -> None:
    fast = optimize_for_inference(model, mode="fp32")
    tokens = model.encode(images)
    torch.testing.assert_close(fast.decode(tokens), model.decode(tokens), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.reconstruct(images), model.reconstruct(images), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        fast.decode_indices_unchecked(tokens.flatten(1)), model.decode(tokens), rtol=1e-4, atol=1e-4
    )


def test_reference_attention_path_agrees(model: qlip.QLIP, images: torch.Tensor) -> None:
    """The fast path (SDPA) gives the same tokens as the explicit-attention reference on real images."""
    import copy

    reference = copy.deepcopy(model).set_attention_impl("reference")
    fast = optimize_for_inference(model, mode="fp32")
    agree = (fast.encode(images) == reference.encode(images)).float().mean().item()
    assert agree >= 0.99


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_reduced_precision_with_refine_agrees(model: qlip.QLIP, images: torch.Tensor, mode: str) -> None:
    """With refine_margin, images holding near-zero bits are redone in fp32: >= 99% of tokens as in fp32."""
    reference = model.encode(images)
    fast = optimize_for_inference(model, mode=mode, refine_margin=0.05)
    agree = (fast.encode(images) == reference).float().mean().item()
    assert agree >= 0.99
    assert fast.last_refined > 0  # random weights put some bits near zero: the refinement did work


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_refine_redoes_exactly_the_images_near_zero(model: qlip.QLIP, images: torch.Tensor, mode: str) -> None:
    """A margin that catches a few images: those come out of the float32 encoder, the others keep their reduced
    precision tokens, and the float32 encoder sees nothing else."""
    import torch.nn.functional as F

    plain = optimize_for_inference(model, mode=mode)
    reduced, exact = plain.encode(images), model.encode(images)
    closest = F.normalize(plain.latents(images), dim=-1).abs().flatten(1).amin(dim=1)  # (B,)
    differ = (reduced != exact).flatten(1).any(dim=1)
    assert differ.any()  # random weights put some bits near zero: reduced precision flips a token somewhere
    margin = closest[differ].min().item() * 1.01  # just wide enough to catch the closest image with a flipped token
    refined = closest < margin
    assert 0 < int(refined.sum()) < len(images) // 2  # a few refined, most not

    fast = optimize_for_inference(model, mode=mode, refine_margin=margin)
    seen = []
    hook = fast._reference.visual.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    tokens = fast.encode(images)
    hook.remove()
    assert fast.last_refined == int(refined.sum())
    assert len(seen) == 1 and torch.equal(seen[0], images[refined])
    assert torch.equal(tokens[refined], model.encode(images[refined]))  # float32 tokens for the refined ones
    assert not torch.equal(reduced[refined], tokens[refined])  # ... which the reduced precision had wrong
    assert torch.equal(tokens[~refined], reduced[~refined])  # the others are the reduced-precision tokens


def test_native_bf16_is_read_from_torch_or_cpuinfo(monkeypatch) -> None:
    import qlip.inference as inference

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not inference.cpu_has_native_bf16()
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert inference.cpu_has_native_bf16()
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset())
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert inference.cpu_has_native_bf16()


def test_bf16_on_a_cpu_without_native_bf16_warns_once(model: qlip.QLIP, monkeypatch) -> None:
    """bf16 is emulated (slower than float32) without AVX512-BF16 / AMX: say so once, name the CPU, point to fp32."""
    import warnings

    import qlip.inference as inference

    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(inference, "cpu_capability", lambda: "AVX2")
    with pytest.warns(RuntimeWarning) as record:
        optimize_for_inference(model, mode="bf16")  # encoder and decoder both bf16: still one warning
    assert len(record) == 1
    message = str(record[0].message)
    assert "AVX2" in message and "fp32" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimize_for_inference(model, mode="fp32")
        optimize_for_inference(model, mode="auto")  # auto stays float32 on CPU, so nothing to warn about
        monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
        optimize_for_inference(model, mode="bf16")


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_reduced_precision_flips_few_bits(model: qlip.QLIP, images: torch.Tensor, mode: str) -> None:
    """Without refinement, reduced precision flips only bits near zero: per-bit agreement stays high."""
    reference = model.encode(images, output="bits")
    fast = optimize_for_inference(model, mode=mode)
    bits = fast.encode(images, output="bits")
    assert (bits == reference).float().mean().item() >= 0.97
    pixels = fast.decode(model.encode(images))
    assert pixels.dtype == torch.float32 and pixels.shape == images.shape
    assert (pixels - model.decode(model.encode(images))).abs().max().item() < 0.5


def test_bf16_keeps_float32_where_bits_are_decided(model: qlip.QLIP, images: torch.Tensor) -> None:
    """bf16 runs the matmuls in bf16 but keeps the residual streams in float32, and the fast encoder's patch
    embedding (raw pixels) fully in float32: the two largest sources of flipped bits (docs/benchmarks.md 2.5)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.visual(images).patches.dtype == torch.float32
        seen = []
        hook = model.decoder.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        model.decode(model.encode(images))
        hook.remove()
    assert seen == [torch.float32]
    fast = optimize_for_inference(model, mode="bf16")
    embedded = []
    hook = fast.model.visual.patch_embed.register_forward_hook(lambda m, args, out: embedded.append(out))
    fast.encode(images)
    hook.remove()
    with torch.no_grad():
        expected = model.visual.patch_embed(images)
    assert embedded[0].dtype == torch.float32 and torch.equal(embedded[0], expected)


def test_model_left_untouched(model: qlip.QLIP, images: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model, mode="int8", decoder_mode="int8")
    assert isinstance(fast, FastQLIP)
    assert model.text is not None and fast.model.text is None  # the copy drops the text tower
    assert not any(type(m) is nn.Linear for m in fast.model.visual.transformer.modules())  # all int8 now
    assert any(type(m) is nn.Linear for m in model.visual.transformer.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.impl == "sdpa" for m in model.modules() if hasattr(m, "impl"))


def test_decode_without_encoder(model: qlip.QLIP, images: torch.Tensor, tmp_path) -> None:
    """A model built with parts=("quantizer", "decoder") decodes indices exactly like the full model."""
    model.save_pretrained(tmp_path / "m")
    decoder_only = qlip.create_model(str(tmp_path / "m"), parts=("quantizer", "decoder"))
    assert decoder_only.visual is None
    fast = optimize_for_inference(decoder_only, mode="fp32")
    tokens = model.encode(images)
    torch.testing.assert_close(fast.decode(tokens), model.decode(tokens), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="without its vision part"):
        fast.encode(images)


def test_bad_arguments(model: qlip.QLIP) -> None:
    with pytest.raises(ValueError, match="unknown inference mode"):
        optimize_for_inference(model, mode="fp8")
    with pytest.raises(ValueError, match="compile=True does not support int8"):
        optimize_for_inference(model, mode="int8", compile=True)
    with pytest.raises(ValueError, match="refine_margin"):
        optimize_for_inference(model, mode="bf16", refine_margin=2.0)
    with pytest.raises(ValueError, match="CPU only"):
        resolve_mode("int8", torch.device("cuda"))
    with pytest.raises(TypeError, match="QLIP model"):
        optimize_for_inference(nn.Linear(2, 2))
    fast = optimize_for_inference(model, mode="fp32")
    with pytest.raises(ValueError, match="unknown output"):
        fast.encode(torch.zeros(1, 3, 32, 32), output="logits")
    with pytest.raises(ValueError, match="must lie in"):
        fast.decode(torch.full((1, 4, 4), 2**8, dtype=torch.int64))


def test_auto_mode_resolution() -> None:
    assert resolve_mode("auto", torch.device("cuda")) == "bf16"
    assert resolve_mode("auto", torch.device("cpu")) == "fp32"  # exact tokens by default, like qlip encode
    assert resolve_mode("fp32", torch.device("cpu")) == "fp32"


# --- the encoder's runtime: PyTorch or onnxruntime ------------------------------------------------------------------


def test_auto_runtime_takes_onnxruntime_only_where_it_is_exact_and_pays() -> None:
    from qlip.export import onnx_available
    from qlip.inference import ONNXRUNTIME_MIN_IMAGES, resolve_runtime

    cpu = torch.device("cpu")
    assert resolve_runtime("auto", cpu, "fp32", False, expected_images=ONNXRUNTIME_MIN_IMAGES - 1) == "torch"
    assert resolve_runtime("auto", cpu, "bf16", False) == "torch"  # onnxruntime runs the float32 graph only
    assert resolve_runtime("auto", cpu, "fp32", True) == "torch"  # torch.compile asked for
    assert resolve_runtime("auto", torch.device("cuda"), "fp32", False) == "torch"
    big = resolve_runtime("auto", cpu, "fp32", False, expected_images=ONNXRUNTIME_MIN_IMAGES)
    assert big == ("onnxruntime" if onnx_available() else "torch")
    assert resolve_runtime("torch", cpu, "fp32", False) == "torch"
    with pytest.raises(ValueError, match="float32 encoder on CPU"):
        resolve_runtime("onnxruntime", cpu, "int8", False)
    with pytest.raises(ValueError, match="unknown runtime"):
        resolve_runtime("tensorrt", cpu, "fp32", False)


@pytest.mark.slow
def test_encode_with_onnxruntime_writes_the_eager_tokens(released_dir, image_files, tmp_path) -> None:
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from qlip.cli import main
    from qlip.tokenfile import read_token_file

    images = [str(image_files[k]) for k in ("rgb", "jpeg", "gray", "rgba")]
    files = {}
    for runtime in ("torch", "onnxruntime"):
        files[runtime] = tmp_path / f"{runtime}.safetensors"
        argv = ["encode", *images, "--model", str(released_dir), "--out", str(files[runtime]), "--runtime", runtime,
                "--device", "cpu", "--output", "bits"]  # fmt: skip
        assert main(argv) == 0
    torch_tokens, ort_tokens = (read_token_file(files[r]) for r in ("torch", "onnxruntime"))
    assert torch.equal(torch_tokens.tokens, ort_tokens.tokens) and ort_tokens.tokens.shape[0] == 4
    model = qlip.create_model(str(released_dir))
    fast = optimize_for_inference(model, mode="fp32", runtime="onnxruntime")
    x = _shapes_images(3)
    assert fast.plan.runtime == "onnxruntime"
    assert torch.equal(fast.encode(x), model.encode(x))
    assert torch.equal(fast.encode(x, output="codes"), model.encode(x, output="codes"))
