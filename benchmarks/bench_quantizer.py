"""BSQ quantizer benchmark: forward + entropy at d = 28 over 1M tokens, "group" vs "analytical" entropy.

    python benchmarks/bench_quantizer.py --threads 2
    python benchmarks/bench_quantizer.py --device cuda --tokens 1048576 --group-sizes 1,2,4

For each entropy variant and group size: the training forward (codes, indices, loss, usage stats) with and without
the backward of the loss, and the inference path (``quantize``: codes + indices only) next to the fused index
computation of :mod:`qlip.inference`. Tokens/s and peak memory (GPU: allocator peak; CPU: not measured). With
group_size 1 the analytical entropy equals the group one exactly (both are checked to agree to 1e-5).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, median, print_table, setup_threads, time_interleaved, write_results  # noqa: E402

from qlip.inference import latents_to_indices  # noqa: E402
from qlip.quantizers.bsq import BSQuantizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1 << 20, help="tokens per call (default 1M = 2^20)")
    p.add_argument("--dim", type=int, default=28)
    p.add_argument("--group-sizes", default="1,2,4", help="group sizes for the 'group' entropy")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    device = torch.device(args.device)
    env = environment(args.device)
    torch.manual_seed(0)
    u = torch.randn(args.tokens, args.dim, device=device)
    rows = []
    variants = [("analytical", 1)] + [("group", int(g)) for g in args.group_sizes.split(",")]
    # Value check first: analytical == group at g = 1.
    qa, qg = BSQuantizer(args.dim, entropy="analytical"), BSQuantizer(args.dim, entropy="group", group_size=1)
    la, lg = qa.to(device)(u[:65536]).loss.item(), qg.to(device)(u[:65536]).loss.item()
    print(f"# loss at g=1 on 65536 tokens: analytical {la:.6f}, group {lg:.6f} (|diff| {abs(la - lg):.2e})")
    fns = {}
    for entropy, g in variants:
        q = BSQuantizer(args.dim, entropy=entropy, group_size=g).to(device)

        def fwd(q=q):
            with torch.no_grad():
                return q(u).loss

        def fwd_bwd(q=q):
            x = u.detach().requires_grad_(True)
            q(x).loss.backward()

        fns[f"{entropy} g={g} forward"] = fwd
        fns[f"{entropy} g={g} forward+backward"] = fwd_bwd
    q = BSQuantizer(args.dim).to(device)
    fns["quantize (codes+indices)"] = lambda: q.quantize(u)
    fns["fused indices (inference)"] = lambda: latents_to_indices(u)
    peaks = {}
    for name, fn in fns.items():  # peak memory, one call each, before timing
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20
    times = time_interleaved(fns, repeats=args.repeats, warmup=1, device=args.device)
    for name in fns:
        t = median(times[name])
        rows.append({"variant": name, "tokens": args.tokens, "ms": t * 1e3, "Mtokens_s": args.tokens / t / 1e6,
                     "peak_MiB": peaks.get(name)})  # fmt: skip
    print(f"# {env['date']}  torch {env['torch']}  {env['cpu']}  threads {env['threads']}  device {args.device}"
          f"  load {env['load_average']}  d={args.dim}")  # fmt: skip
    print_table(rows, ["variant", "tokens", "ms", "Mtokens_s", "peak_MiB"])
    write_results("quantizer", {"environment": env, "loss_g1": {"analytical": la, "group": lg}, "rows": rows},
                  args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
