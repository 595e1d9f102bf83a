"""Tokenize benchmark: images -> token indices and indices -> images, fast paths vs the reference path.

    python benchmarks/bench_tokenize.py --models QLIP-B-16-256 --batch-sizes 8 --threads 2
    python benchmarks/bench_tokenize.py --models QLIP-B-16-256,QLIP-B-8-256,QLIP-L-14-392 --batch-sizes 1,8,64 \
        --device cuda --variants reference,fp32,bf16,bf16+compile

Random weights (no checkpoint needed; pass --model-dir DIR to use real ones). Inputs are shapes-dataset images at
the model's resolution, so token agreement is measured on images, not noise. Variants (comma-separated):

* ``reference``: the model's own ``encode`` / ``decode`` with explicit attention, float32, no compile, no_grad;
* ``fp32``, ``bf16``, ``int8``: :func:`qlip.inference.optimize_for_inference` in that precision (int8: CPU only);
  append ``+compile`` for torch.compile (static shapes); ``int8/bf16`` etc. sets encoder/decoder modes apart.

Every variant runs once per round, rounds repeat, medians are reported (robust to a shared machine's load).
Token agreement: the fraction of token indices (and of bits) equal to the reference's. Decode quality: PSNR of the
variant's decoded pixels against the reference's (both from the reference tokens), in [0, 1] pixel space.
``--calibrate-steps N`` first trains the bottleneck's input MLP alone with the BSQ loss on other images (the
transformer stays random): a stand-in for trained weights, whose bits sit away from zero.
MFU: analytic matmul FLOPs / measured matmul peak of the variant's dtype on this device (GPU: bf16 peak).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    decoder_flops,
    encoder_flops,
    environment,
    measure_matmul_peak,
    median,
    print_table,
    setup_threads,
    time_interleaved,
    write_results,
)

import qlip  # noqa: E402
from qlip.inference import optimize_for_inference  # noqa: E402
from qlip.transforms import denormalize, image_transform  # noqa: E402


def shapes_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n shapes-dataset images (hard preset: textures, several shapes) as a CLIP-normalized (n, 3, size, size) batch.

    Shapes are drawn at up to 256 px (the generator's limit) and resized to ``size`` by the eval transform.
    """
    from qlip.data.shapes import ShapesConfig, ShapesDataset

    config = ShapesConfig.preset("hard", image_size=min(size, 256))
    ds = ShapesDataset(config, split="val", seed=seed, length=n)
    transform = image_transform(size, train=False)
    return torch.stack([transform(s["image"]) for s in ds])


def parse_variant(spec: str) -> dict[str, Any]:
    """"bf16+compile" -> {mode: bf16, decoder_mode: bf16, compile: True}; "bf16/int8" -> encoder bf16, decoder int8."""
    compile_ = spec.endswith("+compile")
    base = spec.removesuffix("+compile")
    enc, _, dec = base.partition("/")
    return {"mode": enc, "decoder_mode": dec or enc, "compile": compile_}


def calibrate_bottleneck(model: torch.nn.Module, steps: int, images: torch.Tensor, lr: float = 1e-3) -> dict:
    """Train only quant_in, for ``steps`` steps, with the BSQ loss on the (frozen, random) encoder's patch features.

    A stand-in for trained weights: the per-sample entropy term of BSQ pushes every bit away from zero, which is
    what a trained tokenizer's bottleneck does and what decides how many bits reduced precision can flip. The
    transformer stays random. Calibration images are not the evaluation images.
    """
    with torch.no_grad():
        feats = model.visual(images).patches  # (B, N, W)
    opt = torch.optim.AdamW(model.quant_in.parameters(), lr=lr)
    for _ in range(steps):
        loss = model.quantizer(model.quant_in(feats)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    with torch.no_grad():
        u = torch.nn.functional.normalize(model.quant_in(feats), dim=-1).abs()
    return {"steps": steps, "final_loss": loss.item(), "median_abs_u": float(u.median()), "min_abs_u": float(u.min())}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) between two CLIP-normalized batches, in [0, 1] pixel space."""
    mse = (denormalize(a).clamp(0, 1) - denormalize(b).clamp(0, 1)).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def bench_model(name: str, args: argparse.Namespace, peaks: dict[str, float]) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = qlip.create_model(args.model_dir or name, parts=("vision", "quantizer", "decoder"), device=device)
    name = model.cfg.name  # with --model-dir, the loaded model's own name (not the --models default)
    calibration = None
    if args.calibrate_steps:
        calib_images = shapes_images(args.calibrate_images, model.image_size, seed=1).to(device)
        calibration = calibrate_bottleneck(model, args.calibrate_steps, calib_images)
        print(f"# {name}: bottleneck calibrated: {calibration}")
    reference = copy.deepcopy(model).set_attention_impl("reference")
    cfg = model.cfg
    enc_f, dec_f = encoder_flops(cfg), decoder_flops(cfg)
    images_all = shapes_images(max(args.batch_sizes), model.image_size).to(device)
    rows = []
    for bs in args.batch_sizes:
        images = images_all[:bs]
        with torch.no_grad():
            ref_tokens = reference.encode(images)
            ref_pixels = reference.decode(ref_tokens)
            # |u_k| of every bit on the unit sphere (fp32 reference): how close to flipping each bit is.
            ref_margin = torch.nn.functional.normalize(reference._latents(images)[1], dim=-1).abs()  # (B, N, d)
        variants: dict[str, Any] = {}
        for spec in args.variants:
            if spec == "reference":
                variants[spec] = reference
                continue
            opts = parse_variant(spec)
            if device.type != "cpu" and "int8" in (opts["mode"], opts["decoder_mode"]):
                continue
            variants[spec] = optimize_for_inference(model, **opts)

        def enc_fn(v, x=images):
            return lambda: torch.no_grad()(v.encode)(x)

        def dec_fn(v, t=ref_tokens):
            return lambda: torch.no_grad()(v.decode)(t)

        fns = {}
        for spec, v in variants.items():
            fns[f"enc:{spec}"] = enc_fn(v)
            fns[f"dec:{spec}"] = dec_fn(v)
        times = time_interleaved(fns, repeats=args.repeats, warmup=1, device=args.device)
        ref_enc = median(times["enc:reference"]) if "reference" in variants else None
        ref_dec = median(times["dec:reference"]) if "reference" in variants else None
        for spec, v in variants.items():
            tokens = v.encode(images)
            pixels = v.decode(ref_tokens)
            t_enc, t_dec = median(times[f"enc:{spec}"]), median(times[f"dec:{spec}"])
            same = tokens == ref_tokens
            xor = (tokens ^ ref_tokens).flatten(1)  # (B, N)
            shifts = torch.arange(model.num_bits - 1, -1, -1, device=xor.device)
            flips = ((xor.unsqueeze(-1) >> shifts) & 1).bool()  # (B, N, d), MSB first like the latents
            flipped = int(flips.sum())
            worst = ref_margin[flips].max().item() if flipped else 0.0
            enc_dtype = "fp32" if spec == "reference" else v.plan.encoder_mode
            dec_dtype = "fp32" if spec == "reference" else v.plan.decoder_mode
            row = {
                "model": name,
                "batch": bs,
                "calibrated_bottleneck": calibration,
                "variant": spec,
                "enc_img_s": bs / t_enc,
                "enc_speedup": ref_enc / t_enc if ref_enc else None,
                "token_agree": same.float().mean().item(),
                "bit_agree": 1 - flipped / (tokens.numel() * model.num_bits),
                # Largest |u_k| (unit sphere) of a flipped bit, and the share of bits at least that close to zero:
                # a trained model whose bits all sit farther from zero than this would lose no token.
                "flip_max_abs_u": worst,
                "bits_within_flip_bound": (ref_margin <= worst).float().mean().item() if flipped else 0.0,
                "dec_img_s": bs / t_dec,
                "dec_speedup": ref_dec / t_dec if ref_dec else None,
                "dec_psnr_vs_ref": psnr(pixels, ref_pixels),
                "enc_flops": enc_f,  # per image, analytic
                "dec_flops": dec_f,
                "_enc_dtype": enc_dtype,  # MFU is filled in once the peaks are final
                "_dec_dtype": dec_dtype,
                "enc_s_median": t_enc,
                "dec_s_median": t_dec,
            }
            rows.append(row)
            logging.info("%s", row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="QLIP-B-16-256", help="comma-separated registered names")
    p.add_argument("--model-dir", default=None, help="load weights from this directory instead (one model)")
    p.add_argument("--batch-sizes", default="8", help="comma-separated, e.g. 1,8,64")
    p.add_argument("--variants", default="reference,fp32,bf16,int8,bf16/int8")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU targets: 2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calibrate-steps", type=int, default=0,
                   help="train quant_in this many steps with the BSQ loss first (a stand-in for trained weights)")
    p.add_argument("--calibrate-images", type=int, default=8, help="images (not the evaluation ones) to calibrate on")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/tokenize-<time>.json)")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    setup_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    env = environment(args.device)
    # MFU denominators: the measured matmul peak of each precision this device runs (int8 has no float peak).
    peaks = {"fp32": measure_matmul_peak(args.device, torch.float32)}
    if torch.device(args.device).type == "cuda" or qlip.inference.cpu_has_native_bf16():
        peaks["bf16"] = measure_matmul_peak(args.device, torch.bfloat16)
    rows = []
    for name in [args.model_dir] if args.model_dir else args.models.split(","):
        rows.extend(bench_model(name.strip(), args, peaks))
    # Measured again at the end and the best kept: a neighbour's burst during one measurement would inflate MFU.
    peaks = {k: max(v, measure_matmul_peak(args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[k]))
             for k, v in peaks.items()}  # fmt: skip
    for row in rows:
        for part, flops in (("enc", "enc_flops"), ("dec", "dec_flops")):
            dtype = row.pop(f"_{part}_dtype")
            rate = row[flops] * row["batch"] / row[f"{part}_s_median"]  # FLOP/s achieved
            row[f"{part}_mfu"] = rate / peaks[dtype] if dtype in peaks else None
    env["load_average_end"] = list(__import__("os").getloadavg())
    print(f"# {env['date']}  torch {env['torch']}  {env['cpu']}  threads {env['threads']}  device {args.device}"
          f"  load {env['load_average']} -> {[round(x, 2) for x in env['load_average_end']]}")  # fmt: skip
    print(f"# matmul peaks (TFLOP/s): { {k: round(v / 1e12, 3) for k, v in peaks.items()} }")
    print_table(rows, ["model", "batch", "variant", "enc_img_s", "enc_speedup", "token_agree", "bit_agree",
                       "flip_max_abs_u", "dec_img_s", "dec_speedup", "dec_psnr_vs_ref", "enc_mfu",
                       "dec_mfu"])  # fmt: skip
    write_results("tokenize", {"environment": env, "matmul_peak_flops": peaks, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
