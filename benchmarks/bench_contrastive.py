"""Contrastive loss benchmark: CLIP InfoNCE forward + backward at a large global batch, chunked or not.

    python benchmarks/bench_contrastive.py --threads 2                      # CPU: batch 8192 (see below)
    python benchmarks/bench_contrastive.py --device cuda --batch 32768 --chunks none,8192,4096,1024

Single process: the global batch is all local (``qlip.losses.contrastive.ClipLoss``; under torchrun the same loss
all-gathers, and ``local_loss`` cuts the matrix to 1/world). Every variant runs in its own subprocess so that its
peak memory is its own: GPU allocator peak, or on CPU the growth of the peak resident set size (ru_maxrss) over
the process baseline. The unchunked loss holds the whole (N, N) logit matrix and its softmax: at N = 32768 that is
4 GiB per fp32 copy. Variants run round-robin (one subprocess each per round); medians are reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, median, print_table, setup_threads, write_results  # noqa: E402


def run_one(batch: int, dim: int, chunk: int | None, device: str, calls: int) -> dict:
    """Inside the subprocess: warm-up + ``calls`` forward/backward passes; seconds per call and peak memory."""
    import torch.nn.functional as F

    from qlip.losses.contrastive import ClipLoss

    torch.manual_seed(0)
    img = F.normalize(torch.randn(batch, dim, device=device), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(batch, dim, device=device), dim=-1).requires_grad_(True)
    scale = torch.tensor(100.0, device=device, requires_grad=True)
    loss_fn = ClipLoss(chunk_size=chunk)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(calls + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = loss_fn(img, txt, scale)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
        img.grad = txt.grad = scale.grad = None
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return {"seconds": times, "peak_MiB": peak, "loss": float(loss)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--batch", type=int, default=32768 if cuda else 8192, help="global batch (CPU default 8192)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunks", default="none,4096,1024", help="chunk sizes (rows of logits per block); none = whole")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="rounds (one subprocess per variant per round)")
    p.add_argument("--calls", type=int, default=1, help="timed calls per subprocess (after one warm-up)")
    p.add_argument("--out", default=None)
    p.add_argument("--_single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    if args._single is not None:  # subprocess mode
        chunk = None if args._single == "none" else int(args._single)
        print(json.dumps(run_one(args.batch, args.dim, chunk, args.device, args.calls)))
        return 0
    env = environment(args.device)
    chunks = [c.strip() for c in args.chunks.split(",")]
    results: dict[str, list[dict]] = {c: [] for c in chunks}
    for _ in range(args.repeats):
        for c in chunks:
            cmd = [sys.executable, __file__, "--batch", str(args.batch), "--dim", str(args.dim), "--device",
                   args.device, "--calls", str(args.calls), "--_single", c]  # fmt: skip
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["killed (out of memory?)"]
                results[c].append({"error": tail[0]})
                continue
            results[c].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for c in chunks:
        ok = [r for r in results[c] if "error" not in r]
        if not ok:
            rows.append({"chunk": c, "batch": args.batch, "error": results[c][0]["error"]})
            continue
        t = median([s for r in ok for s in r["seconds"]])
        # Forward: two N x N x D logit matmuls; backward twice that; chunked variants recompute the forward once more.
        flops = 2 * 2 * args.batch**2 * args.dim * (3 + (c != "none"))
        rows.append({"chunk": c, "batch": args.batch, "fwd_bwd_s": t, "GFLOP_s": flops / t / 1e9,
                     "peak_MiB": max(r["peak_MiB"] for r in ok), "loss": ok[0]["loss"]})  # fmt: skip
    print(f"# {env['date']}  torch {env['torch']}  {env['cpu']}  threads {env['threads']}  device {args.device}"
          f"  load {env['load_average']}  global batch {args.batch}, dim {args.dim}")  # fmt: skip
    print_table(rows, ["chunk", "batch", "fwd_bwd_s", "GFLOP_s", "peak_MiB", "loss", "error"])
    write_results("contrastive", {"environment": env, "rows": rows, "raw": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
