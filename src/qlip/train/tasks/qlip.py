"""The QLIP tokenizer as a task of the one training loop: the paper's two stages (docs/training.md).

Stage 1 losses: align (CLIP InfoNCE over the global batch), recon (pixel MSE), quant (BSQ), commit; stage 2:
recon, quant, lpips, gan (+ the discriminator's own loss and R1, stepped after the model's optimizer step). The
balancer combines them; every term and every weight is logged. Its options are the config's historical sections
(model, data, loss, probe, stage, init), so it declares no section of its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...data.loader import describe_source
from ...losses.adversarial import adaptive_weight, discriminator_loss, generator_loss, r1_penalty
from ...losses.contrastive import ClipLoss, clamp_logit_scale_
from ...losses.reconstruction import pixel_loss
from ...models.hf_text import HFTextTower
from ..build import (
    build_balancer,
    build_gan,
    build_lpips,
    build_model,
    full_model_for_export,
    set_train_mode,
    text_tower_tokenizer,  # fmt: skip
)
from ..config import ConfigError, TrainConfig, config_from_dict, load_yaml
from ..data import BatchStream, build_tokenizer, held_out_batches, held_out_description
from ..distributed import average_gradients
from ..evaluate import evaluate
from ..optim import build_scheduler
from .base import StepLosses, Task

log = logging.getLogger(__name__)


class QLIPTask(Task):
    """QLIP stage 1 (alignment + reconstruction) or stage 2 (decoder with LPIPS and GAN), as ``cfg.stage`` says."""

    progress_unit = "img/s"

    @classmethod
    def check_startup(cls, cfg: TrainConfig) -> None:
        """The data, the model (or ``init``), the tokenizer folder, and a run_dir holding another model's run."""
        from ...data.loader import describe_source
        from ...factory import HF_HUB_PREFIX, list_models

        for key, spec in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
            if spec is not None:
                try:
                    describe_source(spec)
                except (FileNotFoundError, ValueError) as e:
                    raise ConfigError(f"{key}={spec}: {e}") from e
        if cfg.init is None:
            name = cfg.model.name
            is_dir = Path(name).expanduser().is_dir()
            if not name.startswith(HF_HUB_PREFIX) and name not in list_models() and not is_dir:
                raise ConfigError(f"model.name={name!r} is neither a registered model ({', '.join(list_models())}) nor "
                                  "a model directory")  # fmt: skip
        elif not cfg.init.startswith(HF_HUB_PREFIX) and not Path(cfg.init).expanduser().is_dir():
            raise ConfigError(f"init={cfg.init}: no such model directory; give a folder with config.json + "
                              "model.safetensors, or init=null to start from random weights")  # fmt: skip
        if cfg.data.tokenizer is not None and not (Path(cfg.data.tokenizer).expanduser() / "vocab.json").is_file():
            raise ConfigError(f"data.tokenizer={cfg.data.tokenizer}: no vocab.json + merges.txt there; give the "
                              "folder `qlip tokenizer train` wrote (or a model directory), or "
                              "data.tokenizer=null")  # fmt: skip
        run_dir = Path(cfg.run_dir).expanduser()
        saved = run_dir / "config.yaml"
        if cfg.resume == "auto" and saved.is_file() and any((run_dir / "checkpoints").glob("step_*.pt")):
            try:
                old = config_from_dict(load_yaml(saved))
            except ConfigError:
                return  # an older layout: the checkpoint itself is checked when it is loaded
            ours, theirs = (cfg.init or cfg.model.name, cfg.stage), (old.init or old.model.name, old.stage)
            if ours != theirs:
                raise ConfigError(f"run_dir={cfg.run_dir} holds checkpoints of {theirs[0]} (stage {theirs[1]}) and "
                                  f"this config trains {ours[0]} (stage {ours[1]}); choose a new run_dir, or "
                                  "resume=never to start over there")  # fmt: skip

    # --- building ---------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        cfg, rt = self.cfg, self.rt
        self.model = build_model(cfg)
        self.model.to(rt.device)
        mcfg = self.model.cfg
        self.image_size = self.model.image_size
        self.tokenizer = None
        if isinstance(self.model.text, HFTextTower):
            self.tokenizer = text_tower_tokenizer(cfg, self.model)
        elif self.model.text is not None:
            self.tokenizer = build_tokenizer(cfg.data, init_dir=cfg.init, context_length=mcfg.text.context_length,
                                             vocab_size=mcfg.text.vocab_size, seed=cfg.seed)  # fmt: skip
        elif cfg.init and (cfg.data.tokenizer or any((Path(cfg.init) / name).is_file()
                                                     for name in ("vocab.json", "tokenizer.json"))):
            from ...factory import get_tokenizer  # carried into the export, at the exported text tower's context

            self.tokenizer = get_tokenizer(cfg.init, vocabulary=cfg.data.tokenizer)
        self.balancer = build_balancer(cfg)
        self.lpips = build_lpips(cfg, self.balancer, rt.device)
        self.disc = build_gan(cfg, self.balancer, self.image_size, rt.device)
        self.clip_loss = ClipLoss(local_loss=cfg.loss.clip_local_loss, chunk_size=cfg.loss.clip_chunk_size)
        self.disc_optimizer = self.disc_scheduler = None
        if self.disc is not None:
            betas = tuple(cfg.optim.disc_betas)
            self.disc_optimizer = torch.optim.AdamW(self.disc.parameters(), lr=cfg.optim.disc_lr, betas=betas,
                                                    weight_decay=cfg.optim.disc_weight_decay)  # fmt: skip
            self.disc_scheduler = build_scheduler(self.disc_optimizer, cfg.optim)
        return self.model

    def batches(self) -> BatchStream:
        cfg, rt = self.cfg, self.rt
        self.stream = BatchStream(cfg.data, image_size=self.image_size, tokenizer=self.tokenizer if cfg.stage == 1
                                  else None, seed=cfg.seed, rank=rt.rank, world_size=rt.world_size)  # fmt: skip
        return self.stream

    def find_unused_parameters(self) -> bool:
        # A switched-off stage-1 term leaves a whole tower without gradient (text for recon-only, decoder for
        # align-only).
        return self.cfg.stage == 1 and not all(self.balancer.is_active(t) for t in ("align", "recon"))

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        towers = (model.visual, model.decoder, model.text)
        return [block for tower in towers if tower is not None
                for block in (tower.blocks if isinstance(tower, HFTextTower) else tower.transformer.blocks)]

    def train_mode(self, model: nn.Module) -> None:
        set_train_mode(model, self.cfg.stage)

    # --- one step ---------------------------------------------------------------------------------------------
    def losses(self, model: nn.Module, batch: dict[str, Any], step: int) -> StepLosses:
        cfg = self.cfg
        images = batch["image"].to(self.rt.device, non_blocking=True)
        text = batch["text"].to(self.rt.device, non_blocking=True) if cfg.stage == 1 else None
        with warnings.catch_warnings():  # FSDP2 warns that an output (the latents) is a view: none is changed in place
            warnings.filterwarnings("ignore", message=".*returned a view tensor", category=UserWarning)
            out = model(images, text) if text is not None else model(images)
        q = out["quantizer"]
        recon = out["reconstruction"]
        losses: dict[str, torch.Tensor] = {}
        if cfg.stage == 1 and self.balancer.is_active("align"):
            losses["align"] = self.clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
        losses["recon"] = pixel_loss(recon, images, kind=cfg.loss.pixel,
                                     gradient_weight=cfg.loss.gradient_weight)
        losses["quant"] = q.loss
        losses["commit"] = q.commit_loss
        if self.lpips is not None:
            from ...losses.lpips import clip_normalized_to_lpips_input

            losses["lpips"] = self.lpips(clip_normalized_to_lpips_input(recon.float()),
                                         clip_normalized_to_lpips_input(images.float())).mean()  # fmt: skip
        if self.disc is not None and step >= cfg.loss.gan_start:
            with _frozen(self.disc):
                g_loss = generator_loss(self.disc(recon), cfg.loss.gan_loss)
            if cfg.loss.adaptive_gan_weight:
                rec = losses["recon"] + losses.get("lpips", 0.0)
                g_loss = g_loss * adaptive_weight(rec, g_loss, self.model.decoder.head.out.weight)
            losses["gan"] = g_loss
        losses = {k: v for k, v in losses.items() if self.balancer.is_active(k)}
        total, weights = self.balancer.combine(losses, step=step, return_tensors=True,
                                               shared_param=self._shared_param())  # fmt: skip
        return StepLosses(terms=losses, total=total, samples=images.shape[0], weights=weights,
                          outputs={"images": images, "recon": recon, "stats": q.stats})  # fmt: skip

    def _shared_param(self) -> torch.Tensor | None:
        if self.balancer.cfg.mode != "grad-norm":
            return None
        return self.model.visual.transformer.blocks[-1].mlp.w3.weight

    def after_step(self, step: int, last: StepLosses) -> dict[str, torch.Tensor]:
        """Clamp the logit scale; then the discriminator's step on the last micro-batch, and its schedule."""
        out: dict[str, torch.Tensor] = {}
        if self.model.text is not None and self.model.logit_scale.requires_grad:
            clamp_logit_scale_(self.model.logit_scale, self.cfg.loss.logit_scale_max)
        if self.disc is not None and step >= self.cfg.loss.gan_start:
            out = self._disc_step(step, last.outputs["images"], last.outputs["recon"].detach())
        if self.disc_scheduler is not None:
            with warnings.catch_warnings():  # the schedule runs from step 0 although the GAN starts later
                warnings.simplefilter("ignore", UserWarning)
                self.disc_scheduler.step()
        return out

    def _disc_step(self, step: int, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, dtype = self.cfg, self.rt.autocast_dtype
        with torch.autocast(self.rt.device.type, dtype=dtype, enabled=dtype is not None):
            logits = self.disc(torch.cat([real, fake]))
            real_logits, fake_logits = logits.chunk(2)
            d_loss = discriminator_loss(real_logits, fake_logits, cfg.loss.gan_loss)
            out = {"disc": d_loss.detach()}
            if cfg.loss.r1_weight > 0 and step % cfg.loss.r1_every == 0:
                real_in = real.detach().requires_grad_(True)
                r1 = r1_penalty(real_in, self.disc(real_in))
                d_loss = d_loss + 0.5 * cfg.loss.r1_weight * cfg.loss.r1_every * r1
                out["r1"] = r1.detach()
        d_loss.backward()
        average_gradients(self.disc.parameters(), self.rt)  # not DDP-wrapped (R1 needs a double backward)
        torch.nn.utils.clip_grad_norm_(self.disc.parameters(), cfg.optim.grad_clip or math.inf)
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return out

    def log_metrics(self, last: StepLosses) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.model.text is not None:
            metrics["logit_scale"] = float(self.model.logit_scale.detach().exp())
        stats = last.outputs["stats"] or {}
        for key in ("mean_bit_entropy", "distinct_codes", "code_entropy"):
            if key in stats:
                metrics[f"codes/{key}"] = float(stats[key])
        return metrics

    # --- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "balancer": self.balancer.state_dict(),
            "disc": self.disc.state_dict() if self.disc is not None else None,
            "disc_optimizer": self.disc_optimizer.state_dict() if self.disc_optimizer is not None else None,
            "disc_scheduler": self.disc_scheduler.state_dict() if self.disc_scheduler is not None else None,
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.balancer.load_state_dict(checkpoint["balancer"])
        if self.disc is not None and checkpoint.get("disc"):
            self.disc.load_state_dict(checkpoint["disc"])
            self.disc_optimizer.load_state_dict(checkpoint["disc_optimizer"])
            self.disc_scheduler.load_state_dict(checkpoint["disc_scheduler"])

    # --- evaluation and export ------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, *, name: str) -> dict[str, Any]:
        """Zero-shot accuracy (stage 1, shapes), retrieval (stage 1, captioned data), reconstruction PSNR / SSIM,
        code usage and a reconstruction grid; the first call logs which checks run on which held-out data."""
        cfg = self.cfg
        if not hasattr(self, "_held_out"):
            self._plan_checks()
        return evaluate(model, self._held_out, tokenizer=self.tokenizer, tasks=self._tasks, device=self.rt.device,
                        autocast_dtype=self.rt.autocast_dtype, grid_path=self.grid_path(name),
                        grid_images=cfg.eval.grid_images, retrieval=self._retrieval)  # fmt: skip

    def _plan_checks(self) -> None:
        """Build the held-out batches once and say (once) which checks they allow, or that none applies."""
        cfg = self.cfg
        text = self.model.text is not None
        self._held_out = held_out_batches(cfg.data, image_size=self.image_size, tokenizer=self.tokenizer if text
                                          else None, num_samples=cfg.eval.num_samples,
                                          batch_size=cfg.eval.batch_size, seed=cfg.seed)  # fmt: skip
        shapes = describe_source(cfg.data.val or cfg.data.train) == "shapes"
        tasks = {}
        if text and cfg.data.train.startswith("shapes"):
            all_tasks = self.stream.dataset.tasks if hasattr(self.stream.dataset, "tasks") else {}
            tasks = {k: all_tasks[k] for k in cfg.eval.tasks if k in all_tasks}
        self._tasks = tasks
        # Shapes captions repeat across images, so ranking them measures ties; real captions are ranked.
        captioned = bool(self._held_out) and all("text" in b for b in self._held_out if b["key"])
        self._retrieval = text and self.tokenizer is not None and captioned and not shapes
        where = held_out_description(cfg.data)
        if not self._held_out:
            log.warning("no held-out checks: %s; set data.val=PATH (held-out data) or data.val_fraction=0.05 (a "
                        "share of data.train left out of training)",
                        f"{where} gave no samples" if where else f"data.train={cfg.data.train} has no held-out "
                        "split")  # fmt: skip
            return
        checks = []
        if self.model.decoder is not None and self.model.quantizer is not None:
            checks.append("reconstruction and code usage")
        if tasks:
            checks.append(f"zero-shot on {', '.join(tasks)}")
        if self._retrieval:
            checks.append("image-text retrieval")
        if checks:
            log.warning("held-out checks on %s (%d samples): %s", where, sum(len(b["key"]) for b in self._held_out),
                     "; ".join(checks))  # fmt: skip
        else:
            log.warning("no held-out check applies to %s: the model has no decoder, and the data gives neither "
                        "zero-shot tasks (shapes) nor captions to rank", where)  # fmt: skip

    def export_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        from ...models.qlip import QLIP

        plain = QLIP(self.model.cfg)
        plain.load_state_dict(state)
        return plain

    def save_export(self, model: nn.Module, out_dir: Path) -> Path:
        """save_pretrained + tokenizer, loadable by create_model / qlip encode; stage 2 carries init's text tower."""
        return full_model_for_export(model, self.cfg).save_pretrained(out_dir, self.tokenizer)


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """Let gradients flow through ``module`` to its input without accumulating into its parameters."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)
