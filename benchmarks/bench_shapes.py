"""Measure `shapes` generation speed (images/s, one process) at 64x64 and 256x256 for each preset.

Usage:
    python benchmarks/bench_shapes.py [--n 2000] [--repeats 3] [--sizes 64 256] [--out bench_shapes.json]

Prints one line per (preset, size) and writes all figures to a JSON file. Two numbers per setting:
generation alone (PIL image + caption + labels), and generation followed by the eval transform to a
normalized tensor (what a training DataLoader worker does per sample).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from qlip.data.shapes import ShapesConfig, generate_shapes_sample
from qlip.transforms import image_transform


def measure(config: ShapesConfig, n: int, with_transform: bool, repeats: int) -> float:
    """Best of ``repeats`` runs over the same n indices (the machine may be shared: the best run is the least
    disturbed one)."""
    transform = image_transform(config.image_size)
    generate_shapes_sample(0, config)  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            sample = generate_shapes_sample(i, config)
            if with_transform:
                transform(sample["image"])
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="images per measurement at 64x64 (a quarter above)")
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many runs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--presets", nargs="+", default=["easy", "default", "hard"])
    parser.add_argument("--out", default="bench_shapes.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for preset in args.presets:
        for size in args.sizes:
            cfg = ShapesConfig.preset(preset, image_size=size)
            n = args.n if size <= 64 else max(50, args.n // 4)
            gen = measure(cfg, n, with_transform=False, repeats=args.repeats)
            full = measure(cfg, n, with_transform=True, repeats=args.repeats)
            results.append({"preset": preset, "image_size": size, "n": n, "images_per_s": round(gen, 1),
                            "images_per_s_with_transform": round(full, 1), "repeats": args.repeats})  # fmt: skip
            print(f"shapes:{preset:8s} {size:4d}x{size:<4d} {gen:8.1f} images/s  ({full:8.1f} with transform)")
    info = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "processes": 1, "results": results}  # fmt: skip
    with open(args.out, "w") as fh:
        json.dump(info, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
