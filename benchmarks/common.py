"""Shared pieces of the benchmark scripts: interleaved timing, analytic FLOP counts, matmul peaks, reports.

Benchmarks measure, tests check: nothing here runs in the test suite. Every script compares its variants inside one
run, interleaving them round by round and taking medians, because the machines they run on are shared (the load
average is recorded next to every result).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from qlip.inference import BF16_CPU_FLAGS, cpu_capability, cpu_flags, cpu_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The CPU flags recorded with every result: the ones that decide whether bf16 is native, and the vector width.
_BF16_RELEVANT_FLAGS = (*BF16_CPU_FLAGS, "amx_tile", "avx512f", "avx2")


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work so that wall-clock timings cover it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin (one call of each per round) after warm-up.

    Interleaving spreads a change in machine load over all variants instead of penalizing whichever ran last.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# ----------------------------------------------------------------------------------------------------------------
# Analytic FLOPs (multiply-add = 2 FLOPs; matmuls only, norms and activations are noise next to them)
# ----------------------------------------------------------------------------------------------------------------


def block_flops(tokens: int, width: int, mlp_hidden: int, mlp: str = "swiglu") -> int:
    """Forward FLOPs of one pre-norm transformer block over one sequence of ``tokens``."""
    proj = 4 * width * width  # q, k, v, out
    ffn = (3 if mlp == "swiglu" else 2) * width * mlp_hidden  # SwiGLU: w1, w2, w3
    attn = 2 * tokens * width  # q k^T and attn v, per query token
    return 2 * tokens * (proj + ffn + attn)


def encoder_flops(cfg: Any) -> int:
    """Forward FLOPs per image of images -> token indices (vision tower + quant_in MLP; no CLS head)."""
    v, d = cfg.vision, cfg.quantizer.dim
    n = v.grid_size**2
    patch = 2 * n * 3 * v.patch_size**2 * v.width
    blocks = v.layers * block_flops(n + 1, v.width, v.mlp_hidden)
    quant_in = 2 * n * (v.width * v.width + v.width * d)
    return patch + blocks + quant_in


def decoder_flops(cfg: Any) -> int:
    """Forward FLOPs per image of token indices -> pixels (quant_out MLP + decoder + pixel head)."""
    dec, d = cfg.decoder, cfg.quantizer.dim
    n = dec.grid_size**2
    post = cfg.quant_post_width or dec.width
    quant_out = 2 * n * (d * post + post * post)
    blocks = dec.layers * block_flops(n, dec.width, dec.mlp_hidden)
    head = 2 * n * (dec.width * dec.head_hidden + dec.head_hidden * 3 * dec.patch_size**2)
    return quant_out + blocks + head


def text_flops(cfg: Any) -> int:
    """Forward FLOPs per caption of the text tower (context_length tokens, GELU MLP) and its projection."""
    t = cfg.text
    return t.layers * block_flops(t.context_length, t.width, t.mlp_hidden, mlp="gelu") + 2 * t.width * cfg.embed_dim


# ----------------------------------------------------------------------------------------------------------------
# Matmul peak
# ----------------------------------------------------------------------------------------------------------------


def measure_matmul_peak(device: str, dtype: torch.dtype, size: int | None = None, repeats: int = 10) -> float:
    """Best measured FLOP/s of a square matmul in ``dtype`` on ``device`` (the MFU denominator we state).

    The best of several calls, because on a shared machine a busy neighbour only ever makes a call slower.
    """
    size = size or (8192 if torch.device(device).type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


# ----------------------------------------------------------------------------------------------------------------
# Environment and reports
# ----------------------------------------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str) -> dict[str, Any]:
    """Hardware, versions, date and load: what a figure needs next to it to mean anything."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_capability": cpu_capability(),  # the kernels torch picked: AVX512, AVX2, ...
        "cpu_flags": sorted(f for f in cpu_flags() if f in _BF16_RELEVANT_FLAGS),  # no *_bf16: bf16 is slow
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _git_commit(),
        "device": device,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


def print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """A plain aligned table on stdout (benchmarks are scripts: they print)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_results(name: str, payload: dict[str, Any], out: str | None) -> Path:
    """Write ``payload`` as JSON to ``out`` or benchmarks/results/<name>-<timestamp>.json; returns the path."""
    if out:
        path = Path(out)
    else:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    from qlip.fileio import write_text_atomic

    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")  # a stopped run leaves no half file
    print(f"wrote {path}")
    return path


def setup_threads(threads: int | None) -> None:
    """Fix the intra-op thread count (the CPU targets are stated for 2 threads)."""
    if threads:
        torch.set_num_threads(threads)
