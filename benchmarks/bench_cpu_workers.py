"""Training throughput of one config on a CPU: one process with T threads against P 1-thread worker processes
(``distributed.processes``), the same global batch. Each variant is a real ``qlip train`` run, stopped after
``--steps`` steps of the config's schedule; the rows per second are taken between the first logged step after
``--skip`` and the last (start-up, data loading and the first steps' allocations excluded). The variants alternate
for ``--rounds`` rounds.

    python benchmarks/bench_cpu_workers.py configs/um3-shapes.yaml --out benchmarks/results/cpu-workers-um3.json

The config's own data must exist (for the unified demo: runs/lm-text/last, runs/shapes-tiny-stage2/last,
data/shapes-tok). Nothing is written outside a temporary directory but the result file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, median, print_table, write_results  # noqa: E402

from qlip.train.logger import read_metrics  # noqa: E402


def rows_per_second(run_dir: Path, skip: int, batch: int) -> float:
    """Global rows per second between the first logged step after ``skip`` and the last (metrics.jsonl times)."""
    train = [r for r in read_metrics(run_dir) if r["step"] > skip]
    if len(train) < 2:
        raise SystemExit(f"{run_dir}: fewer than two logged steps after step {skip}; raise --steps")
    first, last = train[0], train[-1]
    return (last["step"] - first["step"]) * batch / (last["time"] - first["time"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--batch", type=int, default=32, help="global batch (split evenly over the workers)")
    p.add_argument("--threads", type=int, default=2, help="threads of the single process")
    p.add_argument("--processes", type=int, default=2, help="1-thread workers of the other variant")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--skip", type=int, default=25)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.batch % args.processes:
        raise SystemExit(f"--batch {args.batch} does not split evenly over {args.processes} workers")
    variants = {
        f"1 process x {args.threads} threads": ["distributed.processes=1", f"distributed.threads={args.threads}",
                                                 f"data.batch_size={args.batch}"],
        f"{args.processes} processes x 1 thread": [f"distributed.processes={args.processes}", "distributed.threads=1",
                                                   f"data.batch_size={args.batch // args.processes}"],
    }  # fmt: skip
    common = [f"stop_at={args.steps}", "eval.at_end=false", "checkpoint.every=0", "checkpoint.export=false",
              "logging.every=5"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, overrides) in enumerate(variants.items()):
                run_dir = Path(tmp) / f"r{r}-v{i}"
                cmd = [sys.executable, "-m", "qlip.cli", "train", args.config, *common, *overrides,
                       f"run_dir={run_dir}"]  # fmt: skip
                done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if done.returncode:
                    raise SystemExit(f"{name}: qlip train failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
                speeds[name].append(rows_per_second(run_dir, args.skip, args.batch))
                print(f"round {r}: {name}: {speeds[name][-1]:.1f} rows/s", flush=True)
    base = median(next(iter(speeds.values())))
    rows = [{"variant": n, "rows/s": median(v), "vs one process": median(v) / base, "runs": [round(x, 1) for x in v]}
            for n, v in speeds.items()]  # fmt: skip
    print_table(rows, ["variant", "rows/s", "vs one process", "runs"])
    write_results("cpu-workers", {"environment": environment("cpu"), "config": args.config, "batch": args.batch,
                                  "steps": args.steps, "skip": args.skip, "results": rows}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
