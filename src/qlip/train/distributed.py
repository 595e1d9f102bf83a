"""Process setup: torchrun environment, device, seeding per rank, and DDP / FSDP2 wrapping.

One code path from a laptop to many nodes: without torchrun's environment the run is a single process; with it,
the default process group is created (nccl on GPU, gloo on CPU) and the model is wrapped in DDP, or sharded with
FSDP2 (``fully_shard`` on every transformer block, then the root) for models whose optimizer state does not fit.

FSDP2 shards every parameter along its first dimension and so cannot take a 0-dim one (the model's logit scale):
those stay whole on every rank, outside FSDP, and the trainer averages their gradients itself
(:func:`unsharded_params`, :func:`average_gradients`), as it does for the discriminator that no wrapper owns.
The model keeps its shapes, so its checkpoints and the released layout are the same under every strategy.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
import random
import sys
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import DistributedSection

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Where this process runs: rank, world size, device, autocast dtype."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # None = full fp32
    initialized_here: bool = False  # this module created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(cfg: DistributedSection) -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), pick the device, init the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("distributed.device=cuda but torch sees no CUDA device; use distributed.device=cpu")
    if want_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    initialized_here = False
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        initialized_here = True
    elif dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Runtime(rank, world, local_rank, device, dtype, initialized_here)


def launch_local(processes: int, argv: Sequence[str]) -> int:
    """Run ``python -m qlip.cli ARGV`` in ``processes`` worker processes on this machine, with torchrun's
    environment (``--standalone``: a rendezvous on a free local port, no restarts). Returns 0 when every worker
    finished, else the exit code of the first that failed (each worker has printed its own error)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)  # fmt: skip
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the workers say what went wrong
    try:
        elastic_launch(config, sys.executable)("-m", "qlip.cli", *argv)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 1  # a negative code is a signal
    return 0


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def wrap_model(model: nn.Module, runtime: Runtime, strategy: str, find_unused_parameters: bool = False,
               shard_units: Iterable[nn.Module] = ()) -> nn.Module:  # fmt: skip
    """DDP (default) or FSDP2 around ``model`` when distributed; the model itself otherwise.

    ``find_unused_parameters``: some trainable parameters get no gradient (a loss term switched off, e.g. the
    single-objective probes of ``qlip balance``); DDP then has to look for them after every backward.
    ``shard_units``: FSDP2 shards each of these submodules on its own (transformer blocks), then the rest of the model.
    """
    if not runtime.distributed:
        return model
    if strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            fully_shard = None
        if fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters:  # < 2.7
            raise RuntimeError(f"distributed.strategy=fsdp needs torch >= 2.7 (FSDP2 fully_shard with ignored_params), "
                               f"this is torch {torch.__version__}: upgrade torch or use distributed.strategy=ddp")
        for unit in shard_units:
            fully_shard(unit)
        scalars = {p for p in model.parameters() if p.dim() == 0}
        fully_shard(model, ignored_params=scalars or None)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unsharded_params(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of an FSDP2-sharded ``model`` that FSDP left whole (plain tensors, not DTensors):
    FSDP does not reduce their gradients, :func:`average_gradients` must."""
    from torch.distributed.tensor import DTensor

    return [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]


def average_gradients(params: Any, runtime: Runtime) -> None:
    """Average the gradients of ``params`` over the ranks, in place (parameters no DDP / FSDP wrapper owns)."""
    if not runtime.distributed:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(runtime.world_size)


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (e.g. the gradient norm over sharded parameters) as a plain tensor; others unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def all_gather_objects(obj: Any, runtime: Runtime) -> list[Any]:
    """Every rank's ``obj`` (a list of one element without distribution)."""
    if not runtime.distributed:
        return [obj]
    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def teardown(runtime: Runtime) -> None:
    if runtime.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
        # Free what still refers to the group (autograd nodes of collectives, finished work) while Python is alive:
        # left to interpreter shutdown, gloo's threads were now and then destroyed unjoined, aborting a rank that
        # had finished its work (SIGABRT, "terminate called without an active exception").
        gc.collect()
