"""GPU correctness of the tokenizer and the text-to-image generator against the CPU, on a trained demo generator.

    python benchmarks/gpu_check.py --generator runs/t2i-shapes/last --out gpu-check.json

A generator directory carries its QLIP tokenizer (``DIR/qlip``), so one argument covers both models. Each check
runs the same inputs on the CPU in float32 (the reference) and on the GPU, and reports ||gpu - cpu|| / ||cpu||
and how many discrete outputs agree:

* ``tokenizer``: BSQ codes of real shapes test images (GPU float32 with TF32 off, and bf16 autocast) - the share
  of bits and of whole codes that match the CPU's, and the decoder's output on the CPU's codes.
* ``generator``: the teacher-forced loss and hidden states (float32, bf16 autocast) on the same tokens and captions.
* ``cache``: on the GPU, greedy sampling (top-k 1) with the static KV cache equals recomputing the whole sequence
  at every step, with and without classifier-free guidance; and a seed reproduces the same sampled tokens.

Figures go to ``--out`` (JSON) and a short table to stdout. It needs no download: the shapes are drawn.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_results  # noqa: E402

from qlip.eval.judge import demo_shapes_config, label_names, shapes_images  # noqa: E402
from qlip.generation import load  # noqa: E402
from qlip.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def bit_agreement(a: torch.Tensor, b: torch.Tensor, bits: int) -> tuple[float, float]:
    """(share of equal bits, share of equal codes) of two int64 code tensors."""
    a, b = a.cpu().flatten(), b.cpu().flatten()
    shifts = torch.arange(bits)
    abits, bbits = (a[:, None] >> shifts) & 1, (b[:, None] >> shifts) & 1
    return float((abits == bbits).float().mean()), float((a == b).float().mean())


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def check_tokenizer(gen_cpu, gen_gpu, device: torch.device, count: int) -> list[dict]:
    images, _ = shapes_images(demo_shapes_config(), count, split="test")
    x = normalize(images)
    q_cpu, q_gpu = gen_cpu.qlip, gen_gpu.qlip
    bits = gen_cpu.model.cfg.bits
    with torch.no_grad():
        codes_cpu = q_cpu.encode(x)
        rows = []
        for name, autocast in (("float32", False), ("bf16 autocast", True)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                codes = q_gpu.encode(x.to(device))
                recon = q_gpu.decode(codes_cpu.to(device)).float()
            bit_eq, code_eq = bit_agreement(codes, codes_cpu, bits)
            err = rel_err(recon, q_cpu.decode(codes_cpu))
            rows.append({"check": "tokenizer", "precision": name, "images": count, "bits_equal": bit_eq,
                         "codes_equal": code_eq, "decode_rel_err": err})  # fmt: skip
    return rows


def check_generator(gen_cpu, gen_gpu, device: torch.device, count: int) -> list[dict]:
    images, labels = shapes_images(demo_shapes_config(), count, split="test", seed=1)
    names = label_names(demo_shapes_config(), labels)
    shapes, colors, positions = names["shape"], names["color"], names["position"]
    captions = [f"a large {c} {s} in the {p}." for s, c, p in zip(shapes, colors, positions)]
    with torch.no_grad():
        tokens = gen_cpu.qlip.encode(normalize(images))
        ids = gen_cpu.tokenize(captions)
        drop = torch.zeros(count, dtype=torch.bool)
        ref = gen_cpu.model(tokens, ids, drop=drop)
        hidden_ref = gen_cpu.model.teacher_forced(tokens, ids, drop)[0]
        rows = []
        for name, autocast in (("float32", False), ("bf16 autocast", True)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = gen_gpu.model(tokens.to(device), ids.to(device), drop=drop.to(device))
                hidden = gen_gpu.model.teacher_forced(tokens.to(device), ids.to(device), drop.to(device))[0]
            rows.append({"check": "generator", "precision": name, "images": count,
                         "loss_cpu": float(ref["loss"]), "loss_gpu": float(out["loss"]),
                         "loss_rel_err": rel_err(out["loss"], ref["loss"]),
                         "hidden_rel_err": rel_err(hidden.float(), hidden_ref)})  # fmt: skip
    return rows


def check_cache(gen_gpu, device: torch.device, count: int) -> list[dict]:
    prompts = ["a large red triangle in the top left corner.", "a large blue circle in the center.",
               "a large green star at the bottom.", "a large yellow heart on the right."]  # fmt: skip
    ids = gen_gpu.tokenize([prompts[i % len(prompts)] for i in range(count)])
    rows = []
    for cfg_scale in (1.0, 3.0):
        cached = gen_gpu.model.generate(ids, cfg_scale=cfg_scale, top_k=1, seed=0, use_cache=True)
        full = gen_gpu.model.generate(ids, cfg_scale=cfg_scale, top_k=1, seed=0, use_cache=False)
        a = gen_gpu.model.generate(ids, cfg_scale=cfg_scale, temperature=1.0, seed=7)
        b = gen_gpu.model.generate(ids, cfg_scale=cfg_scale, temperature=1.0, seed=7)
        rows.append({"check": "cache", "cfg_scale": cfg_scale, "images": count,
                     "greedy_cached_equals_full": float((cached == full).float().mean()),
                     "seed_reproduces": bool(torch.equal(a, b))})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generator", default="runs/t2i-shapes/last")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/gpu_check-<time>.json)")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 rows compare float32 arithmetic, not TF32
    torch.backends.cudnn.allow_tf32 = False
    gen_cpu = load(args.generator)
    gen_gpu = copy.deepcopy(gen_cpu).to(device)
    rows = check_tokenizer(gen_cpu, gen_gpu, device, args.images)
    rows += check_generator(gen_cpu, gen_gpu, device, min(args.images, 128))
    rows += check_cache(gen_gpu, device, 16)
    result = {"benchmark": "gpu_check", "generator": args.generator, "environment": environment(args.device),
              "rows": rows}  # fmt: skip
    write_results("gpu_check", result, args.out)
    for kind in ("tokenizer", "generator", "cache"):
        sel = [r for r in rows if r["check"] == kind]
        print_table(sel, [k for k in sel[0] if k != "check"])


if __name__ == "__main__":
    main()
