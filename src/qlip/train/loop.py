"""The one training loop of every model family in the package: one readable story.

    setup (ranks, device, seed) -> task.build_model -> task.batches -> wrap (DDP / FSDP2) -> optimizer -> resume
    repeat: accumulate micro-batches (task.losses, backward) -> clip -> step (unless non-finite)
            -> task.after_step -> EMA -> log / eval / checkpoint / signal
    export run_dir/last (task.export_model + task.save_export)

What a model family brings (its model, batches, losses, extra state, evaluation, export) is a Task
(qlip.train.tasks; the config's ``task:`` key picks it, QLIP by default). Host syncs in the hot loop: one boolean
per optimizer step (is the gradient finite?), which the never-lose-a-run rule needs, and with several ranks the stop
signal they agree on after every step (so that a preempted job checkpoints within one step); loss values are only
read at log intervals.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import RunCheckpoints, find_resume_checkpoint, rng_state, set_rng_state
from .config import ConfigError, TrainConfig, check_startup
from .distributed import (
    Runtime,
    all_gather_objects,
    average_gradients,
    barrier,
    plain_tensor,
    seed_everything,
    setup_runtime,
    teardown,
    unsharded_params,
    wrap_model,
)
from .ema import ModelEMA
from .logger import RunLogger
from .optim import build_optimizer, build_scheduler
from .tasks import TASKS, StepLosses

log = logging.getLogger(__name__)

# The checkpoint keys the loop writes; a task's state_dict adds its own beside them.
LOOP_STATE_KEYS = ("step", "model", "optimizer", "scheduler", "scaler", "ema", "rng", "data", "world_size",
                   "skipped_total", "config")  # fmt: skip


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the last checkpoint on disk is intact."""


@dataclass
class TrainResult:
    """What a finished (or interrupted) run leaves behind."""

    step: int
    run_dir: Path
    export_dir: Path | None = None
    eval: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    skipped_steps: int = 0
    signal: int | None = None  # the signal that stopped the run (the same on every rank)

    @property
    def exit_code(self) -> int:
        """The process exit status this run calls for: 0, or 128 + the signal (143 for SIGTERM, 130 for SIGINT)."""
        return 128 + self.signal if self.signal else 0


class _StopFlag:
    """Set by SIGTERM / SIGINT; the loop checkpoints and stops at the end of the step it is in (on every rank)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners): no handler
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) the training that ``cfg`` describes; returns when done, stopped or interrupted."""
    check_startup(cfg)
    runtime = setup_runtime(cfg.distributed)
    try:
        return _Trainer(cfg, runtime).run()
    finally:
        teardown(runtime)


def _check_same_model(path: Path, ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """A checkpoint of another architecture (another run in the same run_dir) is a ConfigError, not a traceback."""
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    reshaped = sorted(k for k in set(ours) & set(theirs) if tuple(ours[k].shape) != tuple(theirs[k].shape))
    if missing or unexpected or reshaped:
        example = (missing or unexpected or reshaped)[0]
        raise ConfigError(f"{path} holds the weights of a different model than this config builds ({len(missing)} "
                          f"missing, {len(unexpected)} unexpected, {len(reshaped)} reshaped, e.g. {example}); choose "
                          "a new run_dir, or resume=never to start over there")  # fmt: skip


class _Trainer:
    def __init__(self, cfg: TrainConfig, rt: Runtime) -> None:
        self.cfg, self.rt = cfg, rt
        self.run_dir = Path(cfg.run_dir)
        if cfg.checkpoint.export:  # every rank: refused at start, not after the training
            for name in ("last", "last-ema"):
                TASKS[cfg.task].check_export_target(self.run_dir / name)
        if rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")
        barrier(rt)
        self.task = TASKS[cfg.task](cfg, rt)
        seed_everything(cfg.seed)  # same on every rank: identical random initialization
        self.model = self.task.build_model()
        seed_everything(cfg.seed + 1000 * rt.rank + 1)  # per-rank streams from here on
        self.stream = self.task.batches()
        # Wrap before building the optimizer: FSDP2 replaces parameters by sharded ones.
        unused = self.task.find_unused_parameters()
        self.wrapped = wrap_model(self.model, rt, cfg.distributed.strategy, find_unused_parameters=unused,
                                  shard_units=self.task.shard_units(self.model))  # fmt: skip
        self.sharded = cfg.distributed.strategy == "fsdp" and rt.distributed
        self.unsharded = unsharded_params(self.model) if self.sharded else []  # whole on every rank (logit scale)
        self.forward_model = torch.compile(self.wrapped) if cfg.model.compile else self.wrapped
        self.optimizer = build_optimizer(self.task.param_groups(self.model), cfg.optim, rt.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.autocast_dtype == torch.float16)
        self.ema = ModelEMA(self.model, cfg.checkpoint.ema_decay) if cfg.checkpoint.ema_decay > 0 else None
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.rebuilt = self.task.rebuilt_state_keys(self.model)  # not in checkpoints: build_model restores them
        self.step = 0
        self.skipped_total = 0
        self.nonfinite_in_row = 0
        self._resume()
        self.checkpoints = RunCheckpoints(self.run_dir, cfg.checkpoint.keep_last, start_step=self.step)

    # --- checkpoints -------------------------------------------------------------------------------------------
    def _model_state(self, skip: set[str] = frozenset()) -> dict[str, Any]:
        """The full model state on the CPU, less the keys in ``skip`` (a collective under FSDP)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {k: v for k, v in full.items() if k not in skip}
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items() if k not in skip}

    def _optim_state(self) -> dict[str, Any]:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        return self.optimizer.state_dict()

    def save_checkpoint(self) -> Path | None:
        """Collective: every rank contributes its RNG and data-stream state; rank 0 writes the file."""
        rngs = all_gather_objects(rng_state(), self.rt)
        streams = all_gather_objects(self.stream.state_dict(), self.rt)
        state = {
            "step": self.step,
            "model": self._model_state(skip=self.rebuilt),
            "optimizer": self._optim_state(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rngs,
            "data": streams,
            "world_size": self.rt.world_size,
            "skipped_total": self.skipped_total,
            "config": self.cfg.to_dict(),
        }
        extra = self.task.state_dict()
        clash = sorted(set(extra) & set(LOOP_STATE_KEYS))
        if clash:
            raise RuntimeError(f"{type(self.task).__name__}.state_dict uses the loop's checkpoint keys {clash}")
        state.update(extra)
        path = None
        if self.rt.is_main:
            path = self.checkpoints.save(state, self.step)
            log.info("checkpoint %s", path)
        barrier(self.rt)
        return path

    def _resume(self) -> None:
        found = find_resume_checkpoint(self.run_dir, self.cfg.resume)
        if found is None:
            return
        path, state = found
        if state["world_size"] != self.rt.world_size:
            raise RuntimeError(f"{path} was written by {state['world_size']} ranks and this run has "
                               f"{self.rt.world_size}; resume with the same number of processes")  # fmt: skip
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,  # fmt: skip
            )

            opts = StateDictOptions(full_state_dict=True)
            saved = {k: v for k, v in state["model"].items() if k not in self.rebuilt}
            set_model_state_dict(self.model, saved, options=StateDictOptions(full_state_dict=True,
                                                                             strict=not self.rebuilt))  # fmt: skip
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:  # an older checkpoint may still hold rebuilt keys: they are ignored
            ours = {k: v for k, v in self.model.state_dict().items() if k not in self.rebuilt}
            saved = {k: v for k, v in state["model"].items() if k not in self.rebuilt}
            _check_same_model(path, ours, saved)
            self.model.load_state_dict(saved, strict=not self.rebuilt)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.task.load_state_dict(state)
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"][self.rt.rank])
        self.stream.load_state_dict(state["data"][self.rt.rank])
        self.step = int(state["step"])
        self.skipped_total = int(state.get("skipped_total", 0))
        if self.rt.is_main:  # a warning so that it shows by default: the run continues, it does not start afresh
            log.warning("resumed from step %d (%s)", self.step, path)

    # --- one optimizer step -------------------------------------------------------------------------------------
    def _autocast(self):
        dtype = self.rt.autocast_dtype
        return torch.autocast(self.rt.device.type, dtype=dtype, enabled=dtype is not None)

    def train_step(self) -> dict[str, Any]:
        """Accumulate ``accum_steps`` micro-batches, then one (possibly skipped) optimizer step."""
        cfg, rt = self.cfg, self.rt
        accum = cfg.optim.accum_steps
        sums: dict[str, torch.Tensor] = {}
        last: StepLosses | None = None
        samples = 0
        for micro in range(accum):
            batch = next(self.stream)
            sync = micro == accum - 1 or not isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
            ctx = contextlib.nullcontext() if sync else self.wrapped.no_sync()
            with ctx:
                with self._autocast():
                    last = self.task.losses(self.forward_model, batch, self.step)
                self.scaler.scale(last.total / accum).backward()
            samples += last.samples
            for k, v in last.terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / accum
            sums["total"] = sums.get("total", 0.0) + last.total.detach().float() / accum
        average_gradients(self.unsharded, rt)
        self.scaler.unscale_(self.optimizer)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = plain_tensor(torch.nn.utils.clip_grad_norm_(self.trainable, clip))
        finite = bool(torch.isfinite(grad_norm) & torch.isfinite(sums["total"]))  # the one host sync per step
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
            self.skipped_total += 1
            log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row, %d in total)",
                        self.step, self.nonfinite_in_row, self.skipped_total)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step still advances the schedule: no "step before optimizer"
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        sums.update(self.task.after_step(self.step, last))
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        if self.nonfinite_in_row >= cfg.optim.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_row} non-finite losses in a row (step {self.step}); stopped. The last checkpoint "
                f"in {self.run_dir / 'checkpoints'} is intact: lower optim.lr, check the data, or raise "
                "optim.max_nonfinite_steps"
            )
        return {"sums": sums, "weights": last.weights, "grad_norm": grad_norm.detach(), "last": last,
                "samples": samples * rt.world_size}  # fmt: skip

    # --- the run ----------------------------------------------------------------------------------------------
    def _eval(self, final: bool = False) -> dict[str, Any]:
        results: dict[str, Any] = {}
        if self.rt.is_main:
            name = "final" if final else f"step_{self.step:08d}"
            results = self.task.evaluate(self.model, name=name)
            self.task.train_mode(self.model)
            log.info("eval at step %d: %s", self.step, results)
        barrier(self.rt)
        return results

    def run(self) -> TrainResult:
        cfg, rt = self.cfg, self.rt
        last = min(cfg.optim.steps, cfg.stop_at or cfg.optim.steps)
        logger = RunLogger(self.run_dir, enabled=rt.is_main, total_steps=last, start_step=self.step,
                           progress=cfg.logging.progress, tensorboard=cfg.logging.tensorboard)  # fmt: skip
        stop = _StopFlag()
        stop.install()
        self.task.train_mode(self.model)
        result = TrainResult(step=self.step, run_dir=self.run_dir)
        unit = self.task.progress_unit
        t0, seen = time.perf_counter(), 0
        try:
            while self.step < last:
                info = self.train_step()
                seen += info["samples"]
                at_log = self.step % cfg.logging.every == 0 or self.step == last
                if at_log:
                    elapsed = time.perf_counter() - t0
                    metrics = self._log_metrics(info, seen / max(elapsed, 1e-9))
                    logger.log(self.step, metrics)
                    logger.progress(self.step, {k: metrics[k] for k in metrics if k.startswith(("loss/", "w/"))
                                                } | {unit: metrics["samples_per_s"]})  # fmt: skip
                    t0, seen = time.perf_counter(), 0
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < last:
                    logger.log(self.step, self._eval(), kind="eval")
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < last:
                    self.save_checkpoint()
                result.signal = self._agreed_signal(stop)
                if result.signal:
                    log.warning("signal %s: writing a checkpoint at step %d and stopping", result.signal, self.step)
                    self.save_checkpoint()
                    result.interrupted = True
                    break
            else:
                self.save_checkpoint()
                if cfg.eval.at_end:
                    result.eval = self._eval(final=True)
                    logger.log(self.step, result.eval, kind="eval")
                if cfg.checkpoint.export and self.step >= cfg.optim.steps:
                    result.export_dir = self.export()
        finally:
            stop.restore()
            logger.close()
        result.step = self.step
        result.skipped_steps = self.skipped_total
        return result

    def _agreed_signal(self, stop: _StopFlag) -> int | None:
        """The stop signal any rank has received (the largest number if several), checked after every step.

        Every rank must stop at the same step to write one checkpoint together; a job scheduler's grace period
        after SIGTERM is short, so the ranks agree every step (one all-reduce of one number) rather than only at
        log intervals.
        """
        if not self.rt.distributed:
            return stop.signal
        flag = torch.tensor([stop.signal or 0], dtype=torch.int64, device=self.rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def _log_metrics(self, info: dict[str, Any], samples_per_s: float) -> dict[str, Any]:
        metrics: dict[str, Any] = {f"loss/{k}": float(v) for k, v in info["sums"].items()}
        metrics.update({f"w/{k}": float(v) for k, v in info["weights"].items()})
        metrics["grad_norm"] = float(info["grad_norm"])
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        for group in self.optimizer.param_groups:
            metrics[f"lr/{group.get('name', '?')}"] = group["lr"]
        metrics.update(self.task.log_metrics(info["last"]))
        metrics["samples_per_s"] = samples_per_s
        metrics["skipped_steps"] = self.skipped_total
        return metrics

    def export(self) -> Path | None:
        """``run_dir/last`` (and ``last-ema``) in the task's format (QLIP: save_pretrained + tokenizer)."""
        state = self._model_state()  # collective under FSDP
        ema = self.ema.state_dict() if self.ema is not None else None  # collective under FSDP: gathers the shards
        if not self.rt.is_main:
            barrier(self.rt)
            return None
        plain = self.task.export_model(state)
        out = self.task.save_export(plain, self.run_dir / "last")
        if ema is not None:
            self.ema.copy_to(plain, ema["shadow"])
            self.task.save_export(plain, self.run_dir / "last-ema")
        barrier(self.rt)
        return out
