"""What a model family gives the one training loop (qlip.train.loop): the ``Task`` interface.

The loop owns everything that is the same for every model: ranks, device and seeds, DDP / FSDP2, the optimizer,
schedule, grad scaler, accumulation, clipping and the skipping of non-finite steps, the EMA, logging, periodic
evaluation, atomic checkpoints with exact resume, signals and the export's collectives. A task owns what makes a
model family itself: its model, its batches, its losses, what it does after an optimizer step, its extra state,
its held-out evaluation and its export format. The loop calls, in this order:

    check_startup(cfg)                       (class method, before anything is written)
    build_model()                            under seed_everything(cfg.seed): the same weights on every rank
    batches()                                under a per-rank seed
    find_unused_parameters(), shard_units(model), param_groups(model), rebuilt_state_keys(model)
    [resume: load_state_dict(checkpoint)]
    train_mode(model)
    repeat: losses(model, batch, step) per micro-batch -> backward -> clip -> optimizer step
            -> after_step(step, last_losses) -> EMA;  log_metrics(last_losses) at log intervals
            evaluate(model, name=...) on rank 0 at eval intervals (then train_mode(model) again)
            state_dict() into every checkpoint
    export_model(state) -> save_export(model, run_dir/last) [and run_dir/last-ema], on rank 0

A task with its own options declares a top-level config section: ``section`` (its YAML key, e.g. ``generator``)
and ``section_class`` (a dataclass with a default for every field, and optionally ``validate(cfg)`` raising
ConfigError). The config reads that section into ``cfg.task_options`` with the same merging rules as every other
section, so an unknown key there is a one-line ConfigError naming the valid ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from ..optim import param_groups

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..distributed import Runtime


def check_tokenizer_dir(path: str, key: str) -> None:
    """Raise ConfigError when ``path`` (the config's ``key``) is not a QLIP model directory: the tokenizer whose
    encoder, tokens or decoder a downstream model family builds on."""
    if not (Path(path) / "config.json").is_file():
        from ..config import ConfigError

        raise ConfigError(f"{key}={path}: no QLIP model directory there (train one with configs/shapes-tiny*.yaml, "
                          "or name a released model directory)")


class BatchSource(Protocol):
    """An endless iterator of batches that can say where it is, so that a resumed run sees the same batches."""

    def __iter__(self) -> Iterator[Any]: ...

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class StepLosses:
    """One micro-batch's losses.

    Attributes:
        terms: named scalar losses (logged as ``loss/<name>``, averaged over the micro-batches).
        total: the scalar the loop back-propagates (already weighted).
        samples: how many samples the micro-batch held on this rank (for the throughput figure).
        weights: the weight of each term when a balancer chose them (logged as ``w/<name>``).
        outputs: anything the task wants back in ``after_step`` / ``log_metrics`` (the last micro-batch's).
    """

    terms: dict[str, torch.Tensor]
    total: torch.Tensor
    samples: int
    weights: dict[str, Any] = field(default_factory=dict)
    outputs: Any = None


class Task:
    """A model family trained by the one training loop. Subclass it, then register it in ``qlip.train.tasks.TASKS``.

    ``self.cfg`` is the whole TrainConfig (the loop's sections: optim, distributed, checkpoint, logging, eval,
    seed, run_dir) and ``self.options`` the task's own section (None without one); ``self.rt`` is the runtime
    (rank, world size, device, autocast dtype).
    """

    section: ClassVar[str | None] = None  # the task's top-level config key, e.g. "generator"
    section_class: ClassVar[type | None] = None  # its dataclass (every field has a default)
    progress_unit: ClassVar[str] = "samples/s"  # how the progress bar names the throughput

    def __init__(self, cfg: TrainConfig, rt: Runtime) -> None:
        self.cfg, self.rt = cfg, rt

    @property
    def options(self) -> Any:
        """The task's own config section (an instance of ``section_class``), or None."""
        return self.cfg.task_options

    @classmethod
    def check_startup(cls, cfg: TrainConfig) -> None:
        """What the config names that must exist on this machine (files, models), before the run writes anything.

        Raise ConfigError with what to change. ``validate`` of the section class judges values alone.
        """

    @classmethod
    def check_export_target(cls, out_dir: Path) -> None:
        """Raise when the export could not be written to ``out_dir`` (``run_dir/last``), before training starts.
        Default: where ``save_pretrained`` of a QLIP-style model directory would refuse."""
        from ...checkpoints import check_save_target

        check_save_target(out_dir)

    # --- building ---------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The model on ``self.rt.device``, initialized, with frozen parameters at ``requires_grad=False`` (the loop
        optimizes, clips and averages exactly the parameters that require a gradient). Build every other part the
        task needs here too (tokenizer, loss networks, a discriminator): it runs under the same seed on every rank.
        """
        raise NotImplementedError

    def batches(self) -> BatchSource:
        """This rank's training batches (its shard of the data), resumable through state_dict / load_state_dict."""
        raise NotImplementedError

    def find_unused_parameters(self) -> bool:
        """True when some trainable parameters get no gradient in a step (DDP must then look for them)."""
        return False

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The submodules FSDP2 shards one by one (``distributed.strategy=fsdp``), usually the transformer blocks;
        whatever is left is sharded with the model. Default: none (the whole model is one unit)."""
        return []

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer groups of the unwrapped model's trainable parameters, each with ``lr``, ``weight_decay`` and a
        ``name`` (logged as ``lr/<name>``). Default: ``qlip.train.optim.param_groups`` (``optim.lr`` for names it does
        not know, no decay on vectors and embeddings)."""
        return param_groups(model, self.cfg.optim)

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode (frozen parts may stay in eval mode)."""
        model.train()

    # --- one step ---------------------------------------------------------------------------------------------
    def losses(self, model: nn.Module, batch: Any, step: int) -> StepLosses:
        """The losses of one micro-batch, computed with ``model`` (the wrapped, maybe compiled, model: call it, do
        not reach into it) under the loop's autocast. Move the batch to ``self.rt.device`` here."""
        raise NotImplementedError

    def after_step(self, step: int, last: StepLosses) -> dict[str, torch.Tensor]:
        """After the optimizer and scheduler step, before the EMA update (clamps, a discriminator's own step).

        Returns extra scalars to log as ``loss/<name>`` (keep them tensors: they are read at log intervals only).
        """
        return {}

    def log_metrics(self, last: StepLosses) -> dict[str, float]:
        """Task figures for the metrics log at a log interval (e.g. code usage), beside losses, lr and grad norm."""
        return {}

    # --- state --------------------------------------------------------------------------------------------------
    def rebuilt_state_keys(self, model: nn.Module) -> set[str]:
        """Keys of the unwrapped model's ``state_dict`` that :meth:`build_model` restores identically from files
        (a frozen pretrained LM, a frozen vision tower): checkpoints leave them out, so that they hold only what
        training changes, and a resumed run keeps the values it built. Default: none."""
        return set()

    def state_dict(self) -> dict[str, Any]:
        """Extra state for the checkpoint (a balancer, a discriminator and its optimizer); its keys sit beside the
        loop's in the checkpoint, so they must not be one of ``qlip.train.loop.LOOP_STATE_KEYS``."""
        return {}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` wrote, from the whole checkpoint dict."""

    # --- evaluation and export ------------------------------------------------------------------------------------
    def grid_path(self, name: str) -> Path:
        """Where :meth:`evaluate` writes its picture of ``name`` (reconstructions, samples): ``run_dir/grids``."""
        return Path(self.cfg.run_dir) / "grids" / f"{name}.png"

    def evaluate(self, model: nn.Module, *, name: str) -> dict[str, Any]:
        """Held-out checks on rank 0 (the unwrapped model), as flat metrics in the package's evaluation vocabulary
        (``qlip.eval.schema``); ``name`` ("step_00000500" or "final") names any picture it writes under run_dir."""
        return {}

    def export_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A fresh, unwrapped model holding ``state`` (full tensors), on the CPU; the loop copies the EMA into it for
        ``last-ema``."""
        raise NotImplementedError

    def save_export(self, model: nn.Module, out_dir: Path) -> Path:
        """Write ``model`` where users load it from (``run_dir/last``): weights, config, and what inference needs."""
        raise NotImplementedError
