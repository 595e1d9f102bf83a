"""`qlip tokenize` throughput vs the encode-only benchmark at the same batch size (target: within 15%).

    python benchmarks/bench_tokenize_cli.py --threads 2 --model QLIP-B-16-256 --batch-size 8 --images 64 --mode auto

Both sides use the same :class:`~qlip.inference.FastQLIP`. Encode-only: the model on a batch already in memory,
``images / batch_size`` calls. Tokenize: :func:`qlip.tokenize_dataset.tokenize_dataset` on ``shapes:hard`` (generated
at the model's resolution, up to 256) with DataLoader workers, shard writing and manifest updates, into a fresh
directory each round. Rounds alternate the two; medians of images/s are compared. The workers share the machine
with the model: on a 2-core CPU they take cycles from it, which is part of what is measured.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, median, print_table, setup_threads, write_results  # noqa: E402

import qlip  # noqa: E402
from qlip.inference import optimize_for_inference  # noqa: E402
from qlip.tokenize_dataset import tokenize_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="QLIP-B-16-256")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--images", type=int, default=64, help="images per round (a multiple of the batch size)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mode", default="auto", choices=("auto", "fp32", "bf16", "int8"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    env = environment(args.device)
    torch.manual_seed(0)
    model = qlip.create_model(args.model, parts=("vision", "quantizer"), device=args.device)
    fast = optimize_for_inference(model, mode=args.mode)
    s = model.image_size
    batch = torch.randn(args.batch_size, 3, s, s, device=args.device)
    calls = max(1, args.images // args.batch_size)
    n = calls * args.batch_size
    fast.encode(batch)  # warm-up

    def encode_only() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fast.encode(batch).cpu()
        return n / (time.perf_counter() - t0)

    def tokenize() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            r = tokenize_dataset(fast, "shapes:hard", tmp, batch_size=args.batch_size, num_workers=args.workers,
                                 shard_size=4 * args.batch_size, limit=n, progress=False)  # fmt: skip
            assert r.images == n, r
            return r.images_per_s

    rates: dict[str, list[float]] = {"encode-only": [], "qlip tokenize": []}
    for _ in range(args.repeats):
        rates["encode-only"].append(encode_only())
        rates["qlip tokenize"].append(tokenize())
    base = median(rates["encode-only"])
    rows = [{"path": k, "batch": args.batch_size, "images": n, "workers": args.workers if "tok" in k else None,
             "img_s": median(v), "vs_encode_only": median(v) / base} for k, v in rates.items()]  # fmt: skip
    print(f"# {env['date']}  torch {env['torch']}  {env['cpu']}  threads {env['threads']}  device {args.device}"
          f"  load {env['load_average']}  {args.model}  plan {fast.plan}")  # fmt: skip
    print_table(rows, ["path", "batch", "images", "workers", "img_s", "vs_encode_only"])
    write_results("tokenize_cli", {"environment": env, "plan": str(fast.plan), "rows": rows, "raw": rates}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
