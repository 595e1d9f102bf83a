"""Variants x seeds: run directories, one subprocess per (variant, seed), resume-skip of finished ones.

An experiment is a list of :class:`Variant`; each variant is one or more :class:`Stage` s (a stage-1 run, a stage-2
run started from the previous stage's export, or the ``qlip balance`` probes). Every (variant, seed) is a *job*
executed by :mod:`qlip.experiments.worker`, by default in its own Python process so that its peak resident memory
(``getrusage``) belongs to that variant alone. A job writes ``result.json`` last; a job whose ``result.json``
exists is skipped, so an interrupted experiment is continued by running the same command again (and an interrupted
training run inside a job resumes from its checkpoint: the trainer's ``resume=auto``).

Layout::

    OUT/runs/<variant>/seed<k>/<stage>/     training run dirs (metrics.jsonl, last/, checkpoints/)
    OUT/runs/<variant>/seed<k>/job.json     what was run
    OUT/runs/<variant>/seed<k>/result.json  evaluation + time + peak memory (written last)
    OUT/runs/<variant>/seed<k>/worker.log   the subprocess's output
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig, load_config

log = logging.getLogger(__name__)

# Smoke mode: a few steps of qlip-tiny at 32 px (tests, and a check that a command runs end to end).
SMOKE_OVERRIDES = [
    "model.name=qlip-tiny",
    "data.shapes.image_size=32",
    "data.batch_size=8",
    "data.shapes_training.bpe_captions=120",
    "data.shapes_training.bpe_vocab_size=600",
    "distributed.threads=1",
    "distributed.device=cpu",
]
SMOKE_STEPS = 3
SMOKE_EVAL = {"num_eval": 16, "num_probe_train": 48, "batch_size": 16}
# Full evaluation: held-out images for zero-shot / reconstruction, training images for the linear probe.
DEFAULT_EVAL = {"num_eval": 500, "num_probe_train": 1000, "batch_size": 100}
EVAL_SEED = 0  # every variant and seed is evaluated on the same held-out images


@dataclass
class Stage:
    """One step of a variant.

    Attributes:
        name: directory name under the job dir ("stage1", "stage2", "probe").
        kind: "train" or "probe" (``qlip balance``: single-objective runs, writes ``balance.yaml``).
        files: YAML config files, in order.
        overrides: ``a.b=c`` overrides (after the experiment's own: budget, logging, seed, run_dir).
        steps: optimizer steps of this stage (already scaled by the budget).
        init_from_previous: start from the previous stage's ``last/`` export (stage 2).
        fragment_from_previous: add the previous stage's ``balance.yaml`` as a config file (posthoc balancing).
        evaluate: evaluate this stage's export too (keys prefixed ``<name>/`` in the result).
    """

    name: str
    kind: str = "train"
    files: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    steps: int = 1
    init_from_previous: bool = False
    fragment_from_previous: bool = False
    evaluate: bool = False


@dataclass
class Variant:
    """A named configuration of the experiment, run once per seed in ``seeds``; ``meta`` goes into the tables."""

    name: str
    stages: list[Stage]
    seeds: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    # What scores the exports (a name of qlip.experiments.worker.EVALUATORS): "qlip" (zero-shot, probe,
    # reconstruction), "vqa" (a VLM's shapes questions), "generator" (ShapesEval), "unified" (qlip eval unified).
    evaluator: str = "qlip"
    eval_options: dict[str, Any] = field(default_factory=dict)  # this variant's, over Settings.eval_options


@dataclass
class Settings:
    """What every command shares (the ``qlip experiment`` flags).

    Attributes:
        config: the stage-1 YAML config the variants start from.
        out: the experiment's output directory.
        seeds: seed list (variants that need several seeds use all; the others the first).
        budget: fraction of the config's ``optim.steps`` each stage-1 run gets (stage 2 likewise of its config).
        smoke: a few steps of qlip-tiny at 32 px instead (tests).
        isolate: run each job in its own process (per-variant peak memory); False runs in this process.
        eval: evaluation sizes (``num_eval``, ``num_probe_train``, ``batch_size``).
        threads: torch threads per job (0 = the config's).
        fixed_steps: train every run this many steps instead of ``budget`` x the config's (0 = use the budget).
        eval_options: settings of the evaluators that sample (judge, data, split, cfg_scale, batch_size; see
            :func:`qlip.experiments.worker.evaluate_generator_run` and ``evaluate_unified_run``), for every variant
            (a variant's ``eval_options`` override them).
    """

    config: str
    out: Path
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    budget: float = 0.3
    smoke: bool = False
    isolate: bool = True
    eval: dict[str, int] = field(default_factory=dict)
    threads: int = 0
    source_config: str = ""
    fixed_steps: int = 0
    eval_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.source_config = self.source_config or self.config
        if not self.seeds:
            raise ValueError("the seed list is empty; pass e.g. --seeds 0,1,2")
        if self.fixed_steps < 0:
            raise ValueError(f"steps must be a positive number of optimizer steps, got {self.fixed_steps}")
        if not 0 < self.budget <= 100:
            raise ValueError(f"budget must be a fraction of the config's steps in (0, 100], got {self.budget}")
        self.eval = {**(SMOKE_EVAL if self.smoke else DEFAULT_EVAL), **self.eval}

    def freeze(self) -> None:
        """Train every job from a snapshot of the config in ``out/configs/`` (see :func:`snapshot_config`)."""
        self.config = snapshot_config(self.source_config, self.out, Path(self.source_config).name)

    def base_config(self, files: list[str] | None = None) -> TrainConfig:
        """The config the variants start from (smoke overrides applied)."""
        return load_config(files or [self.config], SMOKE_OVERRIDES if self.smoke else [])

    def steps(self, cfg_steps: int) -> int:
        """A stage's step count under this budget (or the fixed step count)."""
        if self.smoke:
            return SMOKE_STEPS
        return self.fixed_steps or max(1, round(cfg_steps * self.budget))


def snapshot_config(path: str, out: Path, name: str) -> str:
    """Copy a config into the experiment dir on the first run and use the copy from then on.

    Every job of an experiment (including those run later to continue it) then trains from the same file, even if
    the original is edited in between; a changed original is reported, not silently mixed in.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    target = out / "configs" / name
    if target.is_file():
        if target.read_text() != source.read_text():
            log.warning("%s changed since this experiment started; continuing with the snapshot %s (use a new --out "
                        "to run the edited config)", path, target)  # fmt: skip
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source.read_text())
    return str(target)


def run_overrides(settings: Settings, steps: int, warmup_fraction: float) -> list[str]:
    """The overrides every experiment run gets: budget, quiet logging, no periodic eval (the job evaluates)."""
    warmup = min(steps, max(0, round(steps * warmup_fraction)))
    out = list(SMOKE_OVERRIDES) if settings.smoke else []
    out += [
        f"optim.steps={steps}",
        f"optim.warmup_steps={warmup}",
        "stop_at=null",
        "eval.every=0",
        "eval.at_end=false",
        f"checkpoint.every={max(1, steps // 4)}",
        "checkpoint.keep_last=1",
        "checkpoint.export=true",
        f"logging.every={max(1, min(20, steps // 25))}",
        "logging.progress=false",
        "logging.tensorboard=false",
        "resume=auto",
    ]
    if settings.threads:
        out.append(f"distributed.threads={settings.threads}")
    return out


def job_dir(settings: Settings, variant: Variant, seed: int) -> Path:
    return settings.out / "runs" / variant.name / f"seed{seed}"


def job_spec(settings: Settings, variant: Variant, seed: int) -> dict[str, Any]:
    """The JSON the worker executes."""
    return {
        "experiment_out": str(settings.out),
        "variant": variant.name,
        "seed": seed,
        "dir": str(job_dir(settings, variant, seed)),
        "stages": [asdict(s) for s in variant.stages],
        "eval": dict(settings.eval),
        "eval_seed": EVAL_SEED,
        "meta": variant.meta,
        "evaluator": variant.evaluator,
        "eval_options": {**settings.eval_options, **variant.eval_options},
    }


def read_result(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_job(settings: Settings, variant: Variant, seed: int) -> dict[str, Any]:
    """Run one (variant, seed) unless its result exists; returns the result dict."""
    from .worker import execute_job

    directory = job_dir(settings, variant, seed)
    result_path = directory / "result.json"
    done = read_result(result_path)
    if done is not None:
        log.info("%s seed %d: finished earlier, skipped (%s)", variant.name, seed, result_path)
        return done
    directory.mkdir(parents=True, exist_ok=True)
    spec = job_spec(settings, variant, seed)
    spec_path = directory / "job.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    log.info("%s seed %d: running %s", variant.name, seed, " -> ".join(s.name for s in variant.stages))
    if not settings.isolate:
        return execute_job(spec, isolated=False)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(directory / "worker.log", "w") as logfile:
        proc = subprocess.run([sys.executable, "-m", "qlip.experiments.worker", str(spec_path)], stdout=logfile,
                              stderr=subprocess.STDOUT, env=env)  # fmt: skip
    result = read_result(result_path)
    if proc.returncode != 0 or result is None:
        tail = (directory / "worker.log").read_text()[-2000:]
        raise RuntimeError(f"{variant.name} seed {seed} failed (exit {proc.returncode}); its log "
                           f"{directory / 'worker.log'} ends with:\n{tail}")  # fmt: skip
    return result


def run_variants(settings: Settings, variants: list[Variant]) -> list[dict[str, Any]]:
    """Every (variant, seed) job, in order (variant-major); returns their results."""
    results = []
    total = sum(len(v.seeds) for v in variants)
    for variant in variants:
        for seed in variant.seeds:
            log.info("job %d/%d", len(results) + 1, total)
            results.append(run_job(settings, variant, seed))
    return results


def settings_summary(settings: Settings, cfg: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """What a table records about how it was made (config, seeds, budget, model, steps, evaluation sizes)."""
    return {"config": settings.source_config, "snapshot": settings.config, "seeds": settings.seeds,
            "budget": settings.budget, "smoke": settings.smoke,
            "model": cfg.model.name, "batch_size": cfg.one_process_batch,
            "config_steps": cfg.optim.steps,
            "data": cfg.data.train, "eval": settings.eval, "chance": chance_levels(cfg), "machine": machine_summary(),
            "architecture": architecture(cfg), **extra}  # fmt: skip


def architecture(cfg: TrainConfig) -> dict[str, Any] | None:
    """The model config behind ``model.name`` (registered names can change between experiments: record it)."""
    from ..factory import get_model_config

    try:
        arch = get_model_config(cfg.model.name)
    except ValueError:
        return None
    return {k: getattr(arch, k).__dict__ if hasattr(getattr(arch, k), "__dict__") else getattr(arch, k)
            for k in ("vision", "quantizer", "decoder", "text") if getattr(arch, k, None) is not None}  # fmt: skip


def chance_levels(cfg: TrainConfig) -> dict[str, float]:
    """100 / classes of every evaluated shapes task (tasks with one class are not evaluated)."""
    from ..data.loader import describe_source
    from ..data.shapes import shapes_tasks
    from ..train.data import shapes_config

    if cfg.task != "qlip" or describe_source(cfg.data.train) != "shapes":
        return {}
    tasks = shapes_tasks(shapes_config(cfg.data, 64))
    return {t: 100.0 / len(tasks[t].classnames) for t in cfg.eval.tasks if t in tasks and len(tasks[t].classnames) > 1}


def machine_summary() -> dict[str, Any]:
    """Where the numbers were measured (they depend on it: time, memory, and threads)."""
    import datetime
    import platform

    import torch

    from .. import __version__
    from ..inference import cpu_name

    processor = cpu_name()
    return {"platform": platform.platform(), "processor": processor,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "qlip": __version__, "cuda": torch.cuda.is_available(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
