"""CPU paths of the exact float32 tokenizer side by side: eager, torch.compile, onnxruntime, against the GEMM rate.

    python benchmarks/bench_cpu_paths.py --model QLIP-B-16-256 --batch-sizes 1,8 --threads 2 --repeats 3 \
        --out benchmarks/results/cpu-paths-B16.json

For images -> indices (encoder graph) and indices -> images (decoder graph) of one model (random weights built
from its registered config, or --model-dir), each path runs the same graphs (``qlip.export.EncoderGraph`` /
``DecoderGraph``) in float32:

* ``eager``: PyTorch eager under ``torch.inference_mode`` (fused SDPA attention), what ``qlip encode`` ran before;
* ``compile``: ``torch.compile`` (inductor, static shapes), its compile time recorded; a failure is recorded as such;
* ``onnxruntime``: the ONNX graph ``qlip export`` writes, run by onnxruntime's CPU provider (export time recorded).

A block of large float32 ``torch.mm`` calls (2048 x 2048, the same thread count) runs as one more variant inside
the same interleaved rounds, so every path is compared with the GEMM rate measured under the same load. Each path's
FLOP/s (analytic matmul FLOPs, cross-checked once with ``torch.utils.flop_counter``) is reported as a fraction of it:
``*_of_gemm_best`` = best call / best GEMM block (on a shared machine a neighbour only ever slows a call down),
``*_of_gemm`` = median / median. The same GEMM block also runs as an onnxruntime MatMul (MLAS): on CPUs where
torch's MKL does not pick its fastest kernels (AMD) that rate is higher, and ``*_of_machine*`` divides by the faster
of the two, the float32 GEMM rate the machine does sustain.
Exactness: each path's token indices against eager's on the same images (mismatching tokens counted), and its
decoded pixels against eager's (max abs difference in [0, 1] pixel space).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tokenize import shapes_images  # noqa: E402
from common import (  # noqa: E402
    decoder_flops,
    encoder_flops,
    environment,
    median,
    print_table,
    setup_threads,
    time_interleaved,
    write_results,
)

import qlip  # noqa: E402
from qlip.export import DecoderGraph, EncoderGraph, onnx_available, onnx_program, onnx_session  # noqa: E402
from qlip.transforms import denormalize  # noqa: E402

PATHS = ("eager", "compile", "onnxruntime")
GEMM_SIZE = 2048
GEMM_CALLS = 4  # one timed GEMM block: ~0.3 s on 2 cores, long enough to see the same load as a model call


def lscpu() -> dict[str, Any]:
    """``lscpu``'s model name and the flags that decide the float32 / bf16 kernels."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    return {"model_name": fields.get("Model name", "").strip(), "flags": {f: f in flags for f in wanted}}


def counted_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward as torch.utils.flop_counter counts them (matmuls, convs, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        module(x)
    return int(counter.get_total_flops())


def onnxruntime_gemm(a: torch.Tensor, b: torch.Tensor, threads: int):
    """The same GEMM block run by onnxruntime's MatMul (MLAS), or None without onnxruntime.

    On CPUs where torch's BLAS (MKL) does not pick its fastest kernels (AMD processors), MLAS sustains a higher
    float32 GEMM rate than ``torch.mm``: a path running on MLAS would otherwise look faster than "the" GEMM rate.
    """
    if not onnx_available():
        return None
    from onnx import TensorProto, helper

    n = a.shape[0]
    spec = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b", "c")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", spec[:2], spec[2:])
    session = onnx_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(),
                           threads)  # fmt: skip
    feeds = {"a": a.numpy(), "b": b.numpy()}
    return lambda: [session.run(None, feeds) for _ in range(GEMM_CALLS)]


def build_paths(model: torch.nn.Module, wanted: list[str], threads: int) -> tuple[dict, dict]:
    """{path: (encode fn, decode fn)} for the paths that work here, and {path: status / setup seconds}."""
    enc, dec = EncoderGraph(model).eval(), DecoderGraph(model).eval()
    paths: dict[str, tuple] = {}
    status: dict[str, Any] = {}
    for path in wanted:
        t0 = time.perf_counter()
        try:
            if path == "eager":
                paths[path] = (enc, dec)
            elif path == "compile":
                paths[path] = (torch.compile(enc, dynamic=False), torch.compile(dec, dynamic=False))
            elif path == "onnxruntime":
                if not onnx_available():
                    raise RuntimeError("onnx / onnxscript / onnxruntime not installed")
                sessions = [onnx_session(onnx_program(model, g).model_proto.SerializeToString(), threads)
                            for g in ("encoder", "decoder")]  # fmt: skip

                def runner(session):
                    name = session.get_inputs()[0].name
                    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])

                paths[path] = tuple(runner(s) for s in sessions)
            status[path] = {"ok": True, "setup_s": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # a path that does not work on this machine is a result, not a crash
            status[path] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return paths, status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="QLIP-B-16-256", help="registered name (random weights)")
    p.add_argument("--model-dir", default=None, help="load weights from this model directory instead")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu-paths-<time>.json)")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    env = environment("cpu")
    env["lscpu"] = lscpu()
    torch.manual_seed(0)
    model = qlip.create_model(args.model_dir or args.model, parts=("vision", "quantizer", "decoder")).eval()
    cfg = model.cfg
    enc_f, dec_f = encoder_flops(cfg), decoder_flops(cfg)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    images_all = shapes_images(max(batch_sizes), model.image_size)
    flops_check = {
        "encoder_analytic": enc_f,
        "decoder_analytic": dec_f,
        "encoder_flop_counter": counted_flops(EncoderGraph(model), images_all[:1]),
        "decoder_flop_counter": counted_flops(DecoderGraph(model), model.encode(images_all[:1])),
    }
    paths, status = build_paths(model, [s.strip() for s in args.paths.split(",") if s.strip()], args.threads)
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    gemm_ort = onnxruntime_gemm(a, b, args.threads)
    rows = []
    for bs in batch_sizes:
        images = images_all[:bs].contiguous()
        with torch.inference_mode():
            ref_tokens = paths["eager"][0](images)
            ref_pixels = denormalize(paths["eager"][1](ref_tokens)).clamp(0, 1)
        fns: dict[str, Any] = {"gemm": lambda: [torch.mm(a, b) for _ in range(GEMM_CALLS)]}
        if gemm_ort is not None:
            fns["gemm_ort"] = gemm_ort
        for name, (enc, dec) in list(paths.items()):
            try:  # first call: compiles (torch.compile) and checks exactness
                t0 = time.perf_counter()
                with torch.inference_mode():
                    tokens, pixels = enc(images), dec(ref_tokens)
                first_s = time.perf_counter() - t0
            except Exception as e:
                status[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                del paths[name]
                continue
            diff = (denormalize(pixels).clamp(0, 1) - ref_pixels).abs()
            rows.append({"batch": bs, "path": name, "first_call_s": first_s,
                         "token_mismatches": int((tokens != ref_tokens).sum()), "tokens": tokens.numel(),
                         "pixel_max_abs_diff": float(diff.max())})  # fmt: skip
            fns[f"enc:{name}"] = lambda enc=enc, x=images: torch.inference_mode()(enc)(x)
            fns[f"dec:{name}"] = lambda dec=dec, t=ref_tokens: torch.inference_mode()(dec)(t)
        times = time_interleaved(fns, repeats=args.repeats, warmup=1)
        block = GEMM_CALLS * 2 * GEMM_SIZE**3
        gemm_rate, gemm_best = block / median(times["gemm"]), block / min(times["gemm"])
        ort_rate = block / median(times["gemm_ort"]) if gemm_ort is not None else None
        ort_best = block / min(times["gemm_ort"]) if gemm_ort is not None else None
        # The machine's rate: the faster of the two GEMM kernels under the same load.
        machine_rate, machine_best = max(gemm_rate, ort_rate or 0), max(gemm_best, ort_best or 0)
        for row in rows:
            if row["batch"] != bs:
                continue
            name = row["path"]
            t_enc, t_dec = median(times[f"enc:{name}"]), median(times[f"dec:{name}"])
            best_enc, best_dec = min(times[f"enc:{name}"]), min(times[f"dec:{name}"])
            row.update({
                # The headline: best call against the best GEMM block of the same rounds (a busy neighbour only
                # ever slows a call down), and medians against the median GEMM block.
                "enc_of_gemm_best": enc_f * bs / best_enc / gemm_best,
                "dec_of_gemm_best": dec_f * bs / best_dec / gemm_best,
                "enc_s_best": best_enc, "dec_s_best": best_dec,
                "enc_img_s": bs / t_enc, "dec_img_s": bs / t_dec,
                "enc_gflops": enc_f * bs / t_enc / 1e9, "dec_gflops": dec_f * bs / t_dec / 1e9,
                "gemm_gflops": gemm_rate / 1e9, "gemm_best_gflops": gemm_best / 1e9,
                "gemm_ort_gflops": ort_rate / 1e9 if ort_rate else None,
                "gemm_ort_best_gflops": ort_best / 1e9 if ort_best else None,
                "enc_of_machine_best": enc_f * bs / best_enc / machine_best,
                "dec_of_machine_best": dec_f * bs / best_dec / machine_best,
                "enc_of_machine": enc_f * bs / t_enc / machine_rate,
                "dec_of_machine": dec_f * bs / t_dec / machine_rate,
                "enc_of_gemm": enc_f * bs / t_enc / gemm_rate, "dec_of_gemm": dec_f * bs / t_dec / gemm_rate,
                "enc_s_median": t_enc, "dec_s_median": t_dec,
            })  # fmt: skip
            eager = next(r for r in rows if r["batch"] == bs and r["path"] == "eager")
            row["enc_speedup"] = eager["enc_s_median"] / t_enc
            row["dec_speedup"] = eager["dec_s_median"] / t_dec
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"# {env['date']}  torch {env['torch']}  {env['lscpu']['model_name']}  threads {env['threads']}"
          f"  load {env['load_average']} -> {env['load_average_end']}")  # fmt: skip
    print(f"# paths: {status}")
    print(f"# FLOPs per image: {flops_check}")
    print_table(rows, ["batch", "path", "enc_img_s", "enc_speedup", "enc_of_gemm_best", "enc_of_machine_best",
                       "dec_img_s", "dec_speedup", "dec_of_gemm_best", "dec_of_machine_best", "gemm_best_gflops",
                       "gemm_ort_best_gflops", "token_mismatches", "pixel_max_abs_diff"])  # fmt: skip
    payload = {"environment": env, "model": cfg.name, "paths": status, "flops_per_image": flops_check,
               "gemm_size": GEMM_SIZE, "gemm_calls_per_block": GEMM_CALLS, "rows": rows}  # fmt: skip
    write_results("cpu-paths", payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
