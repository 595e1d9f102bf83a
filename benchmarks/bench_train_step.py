"""Training-step benchmark: stage 1 and stage 2 steps at QLIP-B-16-256 (docs/benchmarks.md).

    python benchmarks/bench_train_step.py --threads 2                        # CPU: batch 4, no batch search
    python benchmarks/bench_train_step.py --device cuda --batch 256 --find-max-batch
    python benchmarks/bench_train_step.py --model qlip-shapes-s --stages 1 --checkpointing off --batch 64 \
        --text-tower hf:minilm --text-trainable projection                  # a pretrained text tower (stage 1)

Built from the model and the losses only (not the trainer loop), so it measures the step itself:

* stage 1: vision + text + quantizer + decoder; loss = 1000 * MSE + BSQ + CLIP InfoNCE (``ClipLoss``) + commitment;
* stage 2: text dropped, visual encoder frozen (run without gradients); quantizer MLPs + decoder trained with
  MSE + BSQ + 0.1 * LPIPS + 0.1 * GAN (generator loss), plus the discriminator's own step (PatchGAN, hinge).
  LPIPS runs with random VGG weights: the same FLOPs as the real network, no weight files needed.

Each step: forward, backward, AdamW step (fused where this torch supports it), gradients set to None; bf16 autocast
on GPU (``--precision``), no ``.item()`` inside the timed steps. Every (stage, checkpointing) configuration runs in
its own subprocess, so peak memory is its own (GPU: allocator peak; CPU: growth of ru_maxrss). ``--find-max-batch``
(GPU) doubles the batch until out-of-memory, then bisects: the largest per-device batch with and without
activation checkpointing. MFU (GPU): analytic model FLOPs (3x forward for trained parts, 1x for the frozen
encoder; LPIPS and discriminator not counted) over the measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
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
    text_flops,
    write_results,
)

DEFAULT_MODEL = "QLIP-B-16-256"


def model_flops_per_sample(cfg: Any, stage: int) -> int:
    if stage == 1:
        return 3 * (encoder_flops(cfg) + decoder_flops(cfg) + text_flops(cfg))
    return encoder_flops(cfg) + 3 * decoder_flops(cfg)


class Step:
    """One training step of a stage, holding the model, losses and optimizers."""

    def __init__(self, model: str, stage: int, device: torch.device, precision: str, checkpointing: bool,
                 text_tower: str | None = None, text_trainable: str = "projection") -> None:  # fmt: skip
        import qlip
        from qlip.losses.adversarial import build_discriminator
        from qlip.losses.contrastive import ClipLoss
        from qlip.losses.lpips import LPIPS

        self.stage, self.device = stage, device
        parts = ("vision", "quantizer", "decoder", "text") if stage == 1 else ("vision", "quantizer", "decoder")
        torch.manual_seed(0)
        self.model = qlip.create_model(model, parts=parts, device=device)
        if text_tower and stage == 1:
            from qlip.hf.text_tower import pretrained_text_tower, text_tower_source, use_text_tower

            tower, _ = pretrained_text_tower(text_tower_source(text_tower), self.model.cfg.embed_dim,
                                             context_length=self.model.cfg.text.context_length,
                                             trainable=text_trainable)  # fmt: skip
            use_text_tower(self.model, tower)
        self.model.train()
        self.model.set_grad_checkpointing(checkpointing)
        self.cfg = self.model.cfg
        if stage == 2:
            self.model.visual.requires_grad_(False)
            self.model.logit_scale.requires_grad_(False)
            self.lpips = LPIPS(allow_random_weights=True).to(device)
            self.disc = build_discriminator("patchgan", self.cfg.vision.image_size).to(device)
            self.opt_d = self._adamw(self.disc.parameters())
        self.clip = ClipLoss()
        self.opt = self._adamw(p for p in self.model.parameters() if p.requires_grad)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def _adamw(self, params) -> torch.optim.Optimizer:
        params = list(params)
        try:  # fused AdamW: one kernel for all parameters (CUDA, and CPU in recent torch)
            return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def batch(self, size: int) -> dict[str, torch.Tensor]:
        s = self.cfg.vision.image_size
        out = {"image": torch.randn(size, 3, s, s, device=self.device)}
        if self.stage == 1:
            out["text"] = torch.randint(1, self.cfg.text.vocab_size, (size, self.cfg.text.context_length),
                                        device=self.device)  # fmt: skip
        return out

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        from qlip.losses.adversarial import discriminator_loss, generator_loss
        from qlip.losses.lpips import clip_normalized_to_lpips_input as to_lpips

        m, images = self.model, batch["image"]
        with self.autocast:
            if self.stage == 1:
                out = m(images, batch["text"])
                q = out["quantizer"]
                loss = (1000 * F.mse_loss(out["reconstruction"].float(), images) + q.loss + q.commit_loss
                        + self.clip(out["image_embeds"], out["text_embeds"], out["logit_scale"]))  # fmt: skip
            else:
                with torch.no_grad():
                    patches = m.visual(images).patches  # frozen encoder
                u = m.quant_in(patches)
                q = m.quantizer(u)
                recon = m.decoder(m.quant_out(q.codes.to(u.dtype)))
                perceptual = self.lpips(to_lpips(recon.float()), to_lpips(images)).mean()
                loss = (F.mse_loss(recon.float(), images) + q.loss + 0.1 * perceptual
                        + 0.1 * generator_loss(self.disc(recon)))  # fmt: skip
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.stage == 2:
            with self.autocast:
                d_loss = discriminator_loss(self.disc(images), self.disc(recon.detach()))
            d_loss.backward()
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
        return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(stage: int, checkpointing: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Inside the subprocess: warm-up step, timed steps, peak memory; optionally the largest batch."""
    device = torch.device(args.device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step = Step(args.model, stage, device, args.precision, checkpointing, args.text_tower, args.text_trainable)
    result: dict[str, Any] = {"stage": stage, "checkpointing": checkpointing, "batch": args.batch}
    try:
        batch = step.batch(args.batch)
        step(batch)  # warm-up (allocator, kernels)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            _sync(device)
            t0 = time.perf_counter()
            loss = step(batch)
            _sync(device)
            times.append(time.perf_counter() - t0)
        result["step_s"] = times
        result["loss"] = float(loss)  # one host sync, after the timed steps
        result["peak_MiB"] = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss)  # fmt: skip
    except torch.cuda.OutOfMemoryError:
        result["error"] = f"out of memory at batch {args.batch}"
    if args.find_max_batch and device.type == "cuda":
        result["max_batch"] = find_max_batch(step, args.batch, args.max_batch_cap)
    return result


def find_max_batch(step: Step, start: int, cap: int) -> int:
    """Largest batch for which one step fits on the GPU: doubling, then bisection."""

    def fits(n: int) -> bool:
        try:
            step(step.batch(n))
            _sync(step.device)
            return True
        except torch.cuda.OutOfMemoryError:
            step.opt.zero_grad(set_to_none=True)
            return False
        finally:
            torch.cuda.empty_cache()

    lo, hi = 0, max(1, start)
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="registered name (qlip-tiny for a smoke test)")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--batch", type=int, default=256 if cuda else 4, help="per-device batch (CPU default 4)")
    p.add_argument("--steps", type=int, default=5 if cuda else 2, help="timed steps after one warm-up step")
    p.add_argument("--checkpointing", default="off,on", help="activation checkpointing settings to run")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16" if cuda else "fp32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--find-max-batch", action="store_true", help="GPU: search the largest batch per configuration")
    p.add_argument("--max-batch-cap", type=int, default=8192)
    p.add_argument("--text-tower", default=None, help="stage 1 with a pretrained text tower, e.g. hf:minilm")
    p.add_argument("--text-trainable", default="projection", help="projection | all | last-N (with --text-tower)")
    p.add_argument("--out", default=None)
    p.add_argument("--_single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    if args._single is not None:
        stage, ckpt = args._single.split(":")
        print(json.dumps(run_config(int(stage), ckpt == "on", args)))
        return 0
    env = environment(args.device)
    import qlip

    cfg = qlip.get_model_config(args.model)
    peak = measure_matmul_peak(args.device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    rows = []
    for stage in (int(s) for s in args.stages.split(",")):
        for ckpt in (c.strip() for c in args.checkpointing.split(",")):
            cmd = [sys.executable, __file__, "--_single", f"{stage}:{ckpt}", "--batch", str(args.batch), "--steps",
                   str(args.steps), "--precision", args.precision, "--device", args.device,
                   "--max-batch-cap", str(args.max_batch_cap), "--model", args.model,
                   "--text-trainable", args.text_trainable]  # fmt: skip
            if args.text_tower:
                cmd += ["--text-tower", args.text_tower]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.find_max_batch:
                cmd.append("--find-max-batch")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
                rows.append({"stage": stage, "checkpointing": ckpt, "batch": args.batch, "error": err})
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"stage": stage, "checkpointing": ckpt, "batch": args.batch, "error": r.get("error"),
                   "max_batch": r.get("max_batch")}  # fmt: skip
            if "step_s" in r:
                t = median(r["step_s"])
                flops = None if args.text_tower and stage == 1 else model_flops_per_sample(cfg, stage) * args.batch
                row.update(step_s=t, samples_s=args.batch / t, peak_MiB=r["peak_MiB"], loss=r["loss"],
                           mfu=flops / t / peak if flops else None)  # fmt: skip
            rows.append(row)
    print(f"# {env['date']}  torch {env['torch']}  {env['cpu']}  threads {env['threads']}  device {args.device}"
          f"  load {env['load_average']}  {args.model} {args.precision}"
          f"{f'  text tower {args.text_tower} ({args.text_trainable})' if args.text_tower else ''}"
          f"  matmul peak {peak / 1e12:.3f} TFLOP/s")  # fmt: skip
    print_table(rows, ["stage", "checkpointing", "batch", "step_s", "samples_s", "peak_MiB", "mfu", "max_batch",
                       "error"])  # fmt: skip
    text = {"model": args.model, "text_tower": args.text_tower, "text_trainable": args.text_trainable}
    write_results("train_step", {"environment": env, "matmul_peak_flops": peak, **text, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
