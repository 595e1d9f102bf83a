"""Text-to-image sampling speed: images/s and image tokens/s of ``T2IModel.generate``, KV cache vs recomputation,
with and without classifier-free guidance, at the demo size and at a LlamaGen-B-like size.

    python benchmarks/bench_sampling.py --threads 2 --out benchmarks/results/sampling-cpu.json
    python benchmarks/bench_sampling.py --device cuda --demo-images 256 --b-images 64 --b-reference-images 8

Sizes (random weights: the speed does not depend on what the weights learned):

* ``demo``: the generator of configs/t2i-shapes.yaml (width 128, depth 4, 4 heads, 2 sub-tokens) over the demo
  tokenizer's tokens (qlip-shapes-s, the architecture of runs/shapes-tiny-stage2/last: 8x8 grid, 20 bits) with its
  text tower as the condition (24 caption tokens, width 128).
* ``b``: LlamaGen-B-like (width 768, depth 12, 12 heads) over QLIP-B-16-256 tokens (16x16 grid, 28 bits, 2
  sub-tokens of 14 bits: 512 AR steps per image) conditioned on QLIP-B-16-256's text tower (77 tokens).

Variants: ``cache`` (the default path: a static KV cache, one new position per step) and ``reference``
(``use_cache=False``: the whole sequence is recomputed at every step, the path the cache is tested against), each
with guidance scale 1 (no CFG) and 3 (CFG: the batch is doubled with the null condition). The images of a size are
sampled as one batch. Recomputation grows with the square of the sequence: at the B size on a CPU it is not run by
default but estimated from timed whole-sequence forwards (a row marked "estimate"; ``--b-reference-images N`` runs
it, e.g. on a GPU); the table says how many images each row sampled.
The variants of a size are timed interleaved round by round and the median is reported. That the cache samples the
tokens recomputation does is a test (tests/test_generation.py), not measured here: with random weights the
distributions are nearly flat, and the last-bit differences of two matmul shapes already change some draws.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, median, print_table, setup_threads, time_interleaved, write_results  # noqa: E402

from qlip.factory import create_model, get_model_config  # noqa: E402
from qlip.generation import CodecConfig, T2IConfig, T2IModel  # noqa: E402
from qlip.tokenfile import TokenSpec  # noqa: E402

# name -> (tokenizer architecture, generator width, depth, heads); the codec is 2 sub-tokens for both.
SIZES = {
    "demo": ("qlip-shapes-s", 128, 4, 4),
    "b": ("QLIP-B-16-256", 768, 12, 12),
}


def build_generator(size: str, device: torch.device) -> T2IModel:
    """A randomly initialized generator of ``size`` with the text tower of its tokenizer architecture."""
    arch, width, depth, heads = SIZES[size]
    qcfg = get_model_config(arch)
    spec = TokenSpec(model=arch, grid=qcfg.vision.image_size // qcfg.vision.patch_size, bits=qcfg.quantizer.dim,
                     group_size=qcfg.quantizer.group_size, image_size=qcfg.vision.image_size)  # fmt: skip
    torch.manual_seed(0)
    text = create_model(arch, parts=("text",)).text
    cfg = T2IConfig.for_tokenizer(spec, text=qcfg.text, width=width, depth=depth, heads=heads,
                                  codec=CodecConfig(kind="subtoken", parts=2))  # fmt: skip
    return T2IModel(cfg, text_encoder=text).to(device).eval()


def measure_size(size: str, images: int, reference_images: int, repeats: int, warmup: int, device: torch.device,
                 scales: list[float]) -> list[dict]:  # fmt: skip
    model = build_generator(size, device)
    cfg = model.cfg
    params = sum(p.numel() for p in model.trainable_parameters())
    ctx = cfg.conditioning.context_length
    fns, counts = {}, {}
    for use_cache, n in ((True, images), (False, reference_images)):
        if n <= 0:
            continue
        ids = torch.randint(1, 100, (n, ctx), device=device)
        for scale in scales:
            name = f"{'cache' if use_cache else 'reference'} cfg={scale:g}"

            def fn(ids=ids, scale=scale, use_cache=use_cache):
                return model.generate(ids, cfg_scale=scale, seed=0, use_cache=use_cache)

            fns[name], counts[name] = fn, n
    times = time_interleaved(fns, repeats=repeats, warmup=warmup, device=str(device))
    rows = []
    steps = cfg.image_steps
    for name in fns:
        t = median(times[name])
        n = counts[name]
        rows.append({"size": size, "variant": name, "params_M": params / 1e6, "grid": cfg.grid, "bits": cfg.bits,
                     "ar_steps": steps, "images": n, "s_per_batch": t, "images_s": n / t,
                     "tokens_s": n * cfg.grid * cfg.grid / t, "ar_steps_s": n * steps / t})  # fmt: skip
    if reference_images <= 0:  # too slow to run: estimate it from timed forwards at its shortest and longest lengths
        rows += [{"size": size, **estimate_reference(model, device, images, scale, repeats)} for scale in scales]
    for row in rows:
        ref = row["variant"].replace("cache", "reference")
        base = next((r for r in rows if r["variant"] in (ref, f"{ref} (estimate)")), None)
        row["cache_speedup"] = row["images_s"] / base["images_s"] if base and row["variant"].startswith("cache") \
            else None  # fmt: skip
    return rows


@torch.no_grad()
def estimate_reference(model: T2IModel, device: torch.device, images: int, scale: float, repeats: int) -> dict:
    """Seconds per image of ``use_cache=False`` without running it: it does one whole-sequence forward of the core per
    AR step, over lengths from the prefix + 1 to the full sequence; their cost is close to linear in the length at
    these sizes, so the sum is about steps x the mean of the shortest and the longest forward (lower bound: the
    attention share grows with the square). Measured with the cached path's batch (and CFG's doubling)."""
    cfg = model.cfg
    first, last = cfg.conditioning.context_length + 1, cfg.sequence_length - 1
    rows = images * (2 if scale != 1 else 1)
    x = torch.randn(rows, last, cfg.ar.width, device=device)
    fns = {"short": lambda: model.core.forward_embeds(x[:, :first]), "long": lambda: model.core.forward_embeds(x)}
    times = time_interleaved(fns, repeats=repeats, warmup=1, device=str(device))
    per_batch = cfg.image_steps * (median(times["short"]) + median(times["long"])) / 2
    return {"variant": f"reference cfg={scale:g} (estimate)", "images": images,
            "s_per_batch": per_batch, "images_s": images / per_batch,
            "tokens_s": images * cfg.grid * cfg.grid / per_batch, "forward_s_short": median(times["short"]),
            "forward_s_long": median(times["long"]), "forward_lengths": [first, last], "estimate": True}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="demo,b", help="comma-separated: demo, b (default both)")
    p.add_argument("--demo-images", type=int, default=16, help="images per batch at the demo size (default 16)")
    p.add_argument("--demo-reference-images", type=int, default=None,
                   help="images per batch of the recomputation path at the demo size (default: --demo-images)")
    p.add_argument("--b-images", type=int, default=2, help="images per batch at the B size, cached path (default 2)")
    p.add_argument("--b-reference-images", type=int, default=0,
                   help="images per batch at the B size, recomputation path (default 0: estimated, not run; one "
                        "image takes about half an hour on 2 CPU cores)")
    p.add_argument("--cfg-scales", default="1,3", help="guidance scales (1 = no CFG; default 1,3)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per size (default 3)")
    p.add_argument("--b-repeats", type=int, default=1, help="timed rounds at the B size (default 1)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    device = torch.device(args.device)
    env = environment(args.device)
    scales = [float(s) for s in args.cfg_scales.split(",")]
    rows = []
    for size in args.sizes.split(","):
        if size == "demo":
            ref = args.demo_images if args.demo_reference_images is None else args.demo_reference_images
            rows += measure_size("demo", args.demo_images, ref, args.repeats, 1, device, scales)
        elif size == "b":
            rows += measure_size("b", args.b_images, args.b_reference_images, args.b_repeats, 0, device, scales)
        else:
            p.error(f"unknown size {size!r}; choose from {sorted(SIZES)}")
        print(f"# {size} done", flush=True)
    env["load_average_end"] = list(__import__("os").getloadavg())
    print(f"# {env['date']}  torch {env['torch']}  {env['cpu']}  threads {env['threads']}  device {args.device}"
          f"  load {env['load_average']} -> {[round(x, 2) for x in env['load_average_end']]}")  # fmt: skip
    print_table(rows, ["size", "variant", "params_M", "ar_steps", "images", "s_per_batch", "images_s", "tokens_s",
                       "cache_speedup"])  # fmt: skip
    write_results("sampling", {"environment": env, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
