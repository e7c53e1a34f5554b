"""Process-group set-up for single-process, multi-GPU and multi-node training.

The trainer is started either as a plain process or by ``torchrun``, which exports
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.  With a world
size above one the process group is initialised here: ``nccl`` when the process drives a
CUDA device, ``gloo`` on CPU (how the tests run two processes on one machine).  Everything
else in the trainer talks to a :class:`DistContext` and never reads the environment itself.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job and which device it drives."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None when no process group was created

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, plots and checkpoints; the other ranks only compute."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def select_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` takes the CUDA device of this local rank when CUDA is available, else the CPU."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {preference!r}")
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if preference == "cuda":
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistContext:
    """Create the process group when started by ``torchrun`` with several processes.

    Safe to call when a group already exists (the caller owns it then, e.g. a test that
    spawned its own processes): the existing rank and world size are used.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        dev = select_device(device, local_rank)
        return DistContext(rank, local_rank, world, dev, dist.get_backend())
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = select_device(device, local_rank)
    if world <= 1:
        return DistContext(0, 0, 1, dev, None)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    log.info("process group: backend=%s rank=%d/%d device=%s", backend, rank, world, dev)
    return DistContext(rank, local_rank, world, dev, backend)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group this module created (no-op for a single process)."""
    if ctx.backend is not None and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.barrier()


def mean_across_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average of a scalar tensor over ranks (for logging a loss every rank agrees on)."""
    if not ctx.distributed:
        return value.detach()
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
