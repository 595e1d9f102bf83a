"""Fast inference paths for tokenizing and decoding (encoder, BSQ bottleneck, decoder; measured in docs/benchmarks.md).

:func:`optimize_for_inference` wraps a :class:`~qlip.models.qlip.QLIP` in a :class:`FastQLIP` with the same
``encode`` / ``decode`` / ``reconstruct`` calls, built for throughput instead of training:

* ``torch.inference_mode`` and fused SDPA attention (flash / memory-efficient kernels on GPU);
* only what tokens need: the CLS head (post-norm + projection) and the text tower are never run or copied;
* a fused BSQ sign + index computation whose only intermediate is an int32 tensor the size of the codes
  (the l2 normalisation is skipped: dividing by a positive norm never changes a sign);
* reduced precision: ``"bf16"`` (autocast; native on GPUs and on CPUs with AVX512-BF16 or AMX, emulated and
  slower than float32 on other CPUs, where it warns) or ``"int8"`` (dynamic int8 quantization of every Linear,
  CPU only, VNNI kernels);
* optional ``torch.compile`` with static shapes (one compiled graph per batch shape).
* an optional onnxruntime encoder (``runtime="onnxruntime"``, float32 on CPU): the encoder graph of
  :mod:`qlip.export` run by onnxruntime's CPU kernels, faster than eager PyTorch on CPU with the same tokens
  (measured in docs/benchmarks.md). It is exported in memory when the model is prepared (seconds to a minute for
  the released sizes), so ``"auto"`` only takes it for jobs of at least :data:`ONNXRUNTIME_MIN_IMAGES` images.

Reduced precision changes the latents slightly, so bits whose pre-quantization value is near zero can flip and a
token index differs from the float32 result when any one of its d bits flips. The benchmarks report this "token
agreement" (``benchmarks/bench_tokenize.py``, ``docs/benchmarks.md``); ``refine_margin`` re-encodes, in float32, the
images that hold a bit closer to zero than the margin, trading speed for agreement. The reference path (the model's
own methods, ``set_attention_impl("reference")``) is left untouched: this module copies what it changes.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .models.qlip import QLIP, TOKEN_OUTPUTS
from .quantizers.bsq import (
    bits_to_codes,
    bits_to_indices,
    codes_to_bits,
    indices_to_bits,
    indices_to_group_indices,
)

log = logging.getLogger(__name__)

MODES = ("auto", "fp32", "bf16", "int8")
RUNTIMES = ("auto", "torch", "onnxruntime")
# Below this many images the one-time ONNX export of the encoder costs more than onnxruntime saves (B-16 on 2 cores,
# docs/benchmarks.md), so runtime="auto" keeps PyTorch for smaller jobs.
ONNXRUNTIME_MIN_IMAGES = 64


# ----------------------------------------------------------------------------------------------------------------
# Hardware probes and mode resolution
# ----------------------------------------------------------------------------------------------------------------


# /proc/cpuinfo flags of the instructions that compute bf16 natively.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags /proc/cpuinfo lists (Linux); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (Linux), else what ``platform`` knows; for result files."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); without it bf16 is emulated and slow.

    Asks torch first, then /proc/cpuinfo (torch's probes are private and may move).
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes):
        return True
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels use here ("AVX512", "AVX2", "DEFAULT", ...)."""
    return str(torch.backends.cpu.get_cpu_capability())


def _warn_if_bf16_cannot_pay(modes: tuple[str, ...], device: torch.device) -> None:
    """One warning when bf16 is asked for on a CPU that emulates it (measured 5x slower than float32 on AVX2)."""
    if device.type != "cpu" or "bf16" not in modes or cpu_has_native_bf16():
        return
    warnings.warn(
        f"mode='bf16' on a CPU without native bf16 (torch CPU capability {cpu_capability()}, no AVX512-BF16 or AMX): "
        "bf16 is emulated here and runs several times slower than float32; use mode='fp32' (or 'auto')",
        RuntimeWarning,
        stacklevel=3,
    )


def resolve_mode(mode: str, device: torch.device) -> str:
    """Turn ``mode`` ("auto" included) into the concrete precision used on ``device``.

    "auto" matches ``qlip encode``: bf16 autocast on CUDA, float32 elsewhere, so that on CPU the tokens are the
    exact float32 ones by default. bf16 (faster on CPUs with native bf16, see :func:`cpu_has_native_bf16`) and int8
    (the fastest CPU path, but it flips the most bits; see docs/benchmarks.md) are opt-in.
    """
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; choose one of {MODES}")
    if mode == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if mode == "int8" and device.type != "cpu":
        raise ValueError(
            f"mode='int8' (dynamic int8 Linear layers) runs on CPU only, but the model is on {device}; "
            "use mode='bf16' on GPU, or move the model to the CPU first"
        )
    return mode


def resolve_runtime(runtime: str, device: torch.device, encoder_mode: str, compile: bool,
                    expected_images: int | None = None) -> str:  # fmt: skip
    """Turn ``runtime`` ("auto" included) into the encoder's runtime: "torch" or "onnxruntime".

    onnxruntime runs the float32 encoder on CPU only. "auto" takes it where it applies and is installed (with
    onnxscript, which torch's ONNX exporter needs), unless the job is known to hold fewer than
    :data:`ONNXRUNTIME_MIN_IMAGES` images; otherwise PyTorch.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    applies = device.type == "cpu" and encoder_mode == "fp32" and not compile
    if runtime == "auto":
        from .export import onnx_available

        small = expected_images is not None and expected_images < ONNXRUNTIME_MIN_IMAGES
        return "onnxruntime" if applies and not small and onnx_available() else "torch"
    if runtime == "onnxruntime" and not applies:
        raise ValueError(
            f"runtime='onnxruntime' runs the float32 encoder on CPU without compile (got device {device}, mode "
            f"{encoder_mode!r}, compile={compile}); use runtime='torch' for the others"
        )
    if runtime == "onnxruntime":
        from .export import onnx_available

        if not onnx_available():
            raise ValueError("runtime='onnxruntime' needs onnx, onnxscript and onnxruntime: pip install 'qlip[export]'")
    return runtime


# ----------------------------------------------------------------------------------------------------------------
# Fused BSQ index computation
# ----------------------------------------------------------------------------------------------------------------


def latents_to_indices(u: Tensor) -> Tensor:
    """Pre-quantization latents (..., d) -> int64 token indices (...), MSB first, sign(0) = -1 (as in BSQ).

    Exactly ``BSQuantizer.quantize(u)[1]`` without the float codes; the bits are packed by the quantizer's own
    :func:`~qlip.quantizers.bsq.bits_to_indices`, whose largest intermediate for d <= 31 is an int32 the size of the
    codes.
    """
    return bits_to_indices(codes_to_bits(u))


def indices_to_signs(indices: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """int64 indices (...) known to be valid -> unit-sphere codes (..., dim) of ``dtype`` in {+-1/sqrt(dim)}, MSB
    first, without the range check's host sync."""
    return bits_to_codes(indices_to_bits(indices, dim, check_range=False)).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# The fast model
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferencePlan:
    """What :func:`optimize_for_inference` chose, for logs and benchmark tables."""

    encoder_mode: str  # "fp32", "bf16" or "int8"
    decoder_mode: str
    compiled: bool
    device: str
    refine_margin: float | None
    runtime: str = "torch"  # the encoder's: "torch" or "onnxruntime"


class Float32Island(nn.Module):
    """Runs ``inner`` in float32 with autocast off, whatever the surrounding precision (inputs cast to float32).

    Used for the encoder's patch embedding in the bf16 path: it is a conv on the raw pixels (<1% of the encoder's
    FLOPs), and rounding those pixels and its weights to bf16 is the largest single source of flipped token bits
    (docs/benchmarks.md, section 2.5).
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.inner(x.float())


def _fuse_projections(module: nn.Module) -> None:
    """Fuse q/k/v and SwiGLU's w1/w2 into single matmuls everywhere under ``module`` (reduced-precision copies)."""
    for m in list(module.modules()):
        if hasattr(m, "fuse_projections"):
            m.fuse_projections()


def _linears_to_bf16(module: nn.Module) -> None:
    """Store every Linear's weights in bf16, so that autocast finds them cast already (it would recast per call).

    Autocast rounds weights to bf16 the same way, so the outputs are unchanged; LayerNorms, embeddings and the
    residual stream keep float32.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.to(torch.bfloat16)


def _quantize_linears_int8(module: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every nn.Linear (weights int8 per tensor, activations quantized on the fly)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao announces its move to torchao; the eager API still works
        warnings.simplefilter("ignore")
        return quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)


class FastQLIP:
    """A QLIP tokenizer prepared for inference; build it with :func:`optimize_for_inference`.

    Offers the token API of :class:`~qlip.models.qlip.QLIP` (``encode``, ``decode``, ``reconstruct``,
    ``tokens_to_codes``, ``grid_size``, ``image_size``, ``num_bits``, ``cfg``, ``device``), always without gradients.
    Inputs may live anywhere; they are moved to the model's device, and results come back on that device.
    """

    def __init__(self, model: QLIP, plan: InferencePlan, reference: QLIP | None) -> None:
        self.model = model
        self.plan = plan
        self._reference = reference  # float32 copy of the encoder for refine_margin, else None
        self.last_refined = 0  # images the last encode() re-encoded in float32 (refine_margin)
        self._encode_fn = self._encode_latents
        self._decode_fn = self._decode_codes
        if plan.compiled:
            # Static shapes: a tokenizer sees one image size and, but for the last batch, one batch size.
            self._encode_fn = torch.compile(self._encode_latents, dynamic=False)
            self._decode_fn = torch.compile(self._decode_codes, dynamic=False)
        if plan.runtime == "onnxruntime" and model.visual is not None:
            self._encode_fn = _onnxruntime_encoder(model)

    # --- model-like properties ------------------------------------------------------------------------------------
    @property
    def cfg(self) -> Any:
        return self.model.cfg

    @property
    def grid_size(self) -> int:
        return self.model.grid_size

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def num_bits(self) -> int:
        return self.model.num_bits

    @property
    def device(self) -> torch.device:
        return torch.device(self.plan.device)

    def __repr__(self) -> str:
        return f"FastQLIP({self.cfg.name}, {self.plan})"

    # --- precision contexts ---------------------------------------------------------------------------------------
    def _autocast(self, mode: str):
        if mode == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    # --- the two halves ---------------------------------------------------------------------------------------
    def _encode_latents(self, images: Tensor) -> Tensor:
        """Images -> pre-quantization latents u (B, N, d), float32. The CLS head is never run."""
        with self._autocast(self.plan.encoder_mode):
            patches = self.model.visual(images).patches  # (B, N, W)
            return self.model.quant_in(patches).float()  # (B, N, d)

    def _decode_codes(self, codes: Tensor) -> Tensor:
        """Codes (B, N, d) -> pixels (B, 3, S, S) float32, CLIP-normalized.

        A bf16 decoder holds its weights in bf16 and runs without autocast (no per-call weight casts): no token can
        flip on this side, and the pixels stay within ~60 dB of the float32 decoder's (docs/benchmarks.md).
        """
        dtype = torch.bfloat16 if self.plan.decoder_mode == "bf16" else torch.float32
        with torch.autocast(self.device.type, enabled=False):
            return self.model.decoder(self.model.quant_out(codes.to(dtype))).float()

    # --- token API --------------------------------------------------------------------------------------------
    def latents(self, images: Tensor) -> Tensor:
        """Images (B, 3, S, S) -> pre-quantization latents u (B, N, d), float32, in this object's precision."""
        self.model._need("vision")
        self.model._need("quantizer")
        with torch.inference_mode():
            return self._encode_fn(images.to(self.device, torch.float32))

    def encode(self, images: Tensor, output: str = "indices", group_size: int | None = None) -> Tensor:
        """Images -> discrete tokens on the (h, w) patch grid; same outputs as :meth:`QLIP.encode`."""
        if output not in TOKEN_OUTPUTS:
            raise ValueError(f"unknown output {output!r}; choose one of {TOKEN_OUTPUTS}")
        with torch.inference_mode():
            images = images.to(self.device, torch.float32)
            u = self.latents(images)  # (B, N, d)
            if self.plan.refine_margin is not None:
                u = self._refine(images, u)
            g = self.grid_size
            if output == "codes":
                codes = self.model.quantizer.quantize(u)[0]
                return rearrange(codes, "b (h w) d -> b h w d", h=g)
            indices = rearrange(latents_to_indices(u), "b (h w) -> b h w", h=g)
            if output == "indices":
                return indices
            if output == "bits":
                return indices_to_bits(indices, self.num_bits)
            return indices_to_group_indices(indices, self.num_bits, group_size or self.cfg.quantizer.group_size)

    def _refine(self, images: Tensor, u: Tensor) -> Tensor:
        """Re-encode in float32 the images that hold a bit within ``refine_margin`` of zero (after l2 norm)."""
        margin = self.plan.refine_margin
        closest = F.normalize(u, dim=-1).abs().flatten(1).amin(dim=1)  # (B,) smallest |u_k| per image
        redo = (closest < margin).nonzero().flatten()
        if redo.numel():
            ref = self._reference
            with torch.autocast(self.device.type, enabled=False):
                u = u.clone()
                u[redo] = ref.quant_in(ref.visual(images[redo]).patches).float()
        log.debug("refine_margin=%g: re-encoded %d of %d images in float32", margin, redo.numel(), u.shape[0])
        self.last_refined = int(redo.numel())
        return u

    def tokens_to_codes(self, tokens: Tensor, kind: str = "indices", group_size: int | None = None) -> Tensor:
        """Token indices / bits / group indices -> codes (B, N, d) float32 (validated like :meth:`QLIP.decode`)."""
        return self.model.tokens_to_codes(tokens.to(self.device), kind, group_size)

    def decode(self, tokens: Tensor, kind: str = "indices", group_size: int | None = None) -> Tensor:
        """Token indices (B, h, w) -> pixels (B, 3, S, S) float32 in the CLIP-normalized space."""
        self.model._need("decoder")
        with torch.inference_mode():
            return self._decode_fn(self.tokens_to_codes(tokens, kind, group_size))

    def decode_indices_unchecked(self, indices: Tensor) -> Tensor:
        """Like :meth:`decode` for int64 indices (B, N) already known valid: skips the range check's host sync."""
        with torch.inference_mode():
            return self._decode_fn(indices_to_signs(indices.to(self.device), self.num_bits))

    def reconstruct(self, images: Tensor) -> Tensor:
        """Encode then decode in this object's precisions; pixels (B, 3, S, S) float32."""
        self.model._need("decoder")
        with torch.inference_mode():
            u = self.latents(images)
            codes = self.model.quantizer.quantize(u)[0]
            return self._decode_fn(codes)


def _onnxruntime_encoder(model: QLIP):
    """images (B, 3, S, S) -> latents u (B, N, d) float32 by onnxruntime, from the encoder graph exported in memory."""
    from .export import onnx_program, onnx_session

    session = onnx_session(onnx_program(model, "encoder", output="latents").model_proto.SerializeToString())
    name = session.get_inputs()[0].name

    def encode_latents(images: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {name: images.cpu().contiguous().numpy()})[0])

    return encode_latents


def _token_parts(model: QLIP) -> QLIP:
    """A deep copy of ``model`` without its text tower (tokens never need it, and it would double the copy)."""
    text = model.text
    try:
        model.text = None
        return copy.deepcopy(model)
    finally:
        model.text = text


def optimize_for_inference(
    model: QLIP,
    *,
    mode: str = "auto",
    decoder_mode: str | None = None,
    compile: bool = False,
    refine_margin: float | None = None,
    runtime: str = "torch",
    expected_images: int | None = None,
) -> FastQLIP:
    """Prepare ``model`` for fast tokenizing and decoding; ``model`` itself is not modified.

    Args:
        model: a QLIP model (any parts; encode needs vision + quantizer, decode needs quantizer + decoder).
        mode: encoder precision: "auto" (bf16 on CUDA, fp32 elsewhere), "fp32", "bf16" (on CPU only worth it with
            native bf16, see :func:`cpu_has_native_bf16`; elsewhere it warns), or "int8" (CPU only: dynamic int8
            Linear layers, the fastest CPU path, with the most flipped bits).
        decoder_mode: decoder precision (same choices); defaults to ``mode``. Decoding tolerates lower precision
            better than encoding (pixels move a little, no index can flip), e.g. ``mode="bf16", decoder_mode="int8"``.
        compile: wrap the encode and decode paths in ``torch.compile`` (static shapes, compiled on first call;
            not with int8).
        refine_margin: when set, images with any l2-normalized latent |u_k| below this are re-encoded in float32,
            so their tokens equal the reference path's (see the module docstring). None: never re-encode.
        runtime: what runs the encoder: "torch", "onnxruntime" (float32 on CPU; see the module docstring) or
            "auto" (onnxruntime where it applies and is installed, see :func:`resolve_runtime`). The decoder always
            runs in PyTorch.
        expected_images: how many images the job holds, when known (lets "auto" skip the export for small jobs).

    Returns:
        A :class:`FastQLIP`.
    """
    if not isinstance(model, QLIP):
        raise TypeError(f"optimize_for_inference expects a qlip QLIP model, got {type(model).__name__}")
    device = model.device
    enc_mode = resolve_mode(mode, device)
    dec_mode = resolve_mode(decoder_mode if decoder_mode is not None else mode, device)
    _warn_if_bf16_cannot_pay((enc_mode, dec_mode), device)
    if compile and "int8" in (enc_mode, dec_mode):
        raise ValueError("compile=True does not support int8 dynamic quantization; use mode 'fp32' or 'bf16'")
    if refine_margin is not None and not 0 < refine_margin < 1:
        raise ValueError(
            f"refine_margin must be in (0, 1) (a distance to zero on the unit sphere), got {refine_margin!r}"
        )
    use = resolve_runtime(runtime, device, enc_mode, bool(compile), expected_images)
    if model.visual is None:
        use = "torch"  # nothing to encode: the decoder runs in PyTorch whatever was asked
    fast = _token_parts(model)
    fast.set_attention_impl("sdpa")
    fast.eval().requires_grad_(False)
    reference = None
    if refine_margin is not None and enc_mode != "fp32" and fast.visual is not None:
        reference = _token_parts(fast)  # float32 encoder kept beside the reduced-precision one
        reference.decoder = reference.quant_out = None
    if enc_mode == "bf16" and fast.visual is not None:
        fast.visual.patch_embed = Float32Island(fast.visual.patch_embed)
        _fuse_projections(fast.visual)
        _linears_to_bf16(fast.visual)
        _linears_to_bf16(fast.quant_in)
    if enc_mode == "int8" and fast.visual is not None:
        _quantize_linears_int8(fast.visual)
        _quantize_linears_int8(fast.quant_in)
    if dec_mode == "bf16" and fast.decoder is not None and fast.quant_out is not None:
        _fuse_projections(fast.decoder)
        fast.decoder.to(torch.bfloat16)
        fast.quant_out.to(torch.bfloat16)
    if dec_mode == "int8" and fast.decoder is not None:
        _quantize_linears_int8(fast.decoder)
        _quantize_linears_int8(fast.quant_out)
    plan = InferencePlan(enc_mode, dec_mode, bool(compile), str(device), refine_margin, use)
    log.info("inference plan for %s: %s", model.cfg.name, plan)
    return FastQLIP(fast, plan, reference)
