"""DDP under torchrun: NCCL on GPUs, gloo on CPUs. Nothing home-made: torch.distributed does the work.

A job calls `setup_distributed` once. With ``WORLD_SIZE > 1`` in the environment (torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) it initialises the
default process group; if the caller already initialised one, that one is used. With a single
process everything degrades to no-ops.

Training convention: ``batch_size`` is the *global* batch. Every rank draws the same global batch
from identically seeded generators and trains on its own contiguous slice of it, so N processes
compute exactly the gradient that one process would on the whole batch (DDP averages gradients).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, global_batch: int) -> slice:
        """This rank's slice of a global batch (which must divide evenly)."""
        if global_batch % self.world_size:
            raise ValueError(f"batch size {global_batch} must be divisible by the number of processes "
                             f"{self.world_size}")
        per_rank = global_batch // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def mean(self, value: float, device: torch.device) -> float:
        """Average a float over ranks (no-op for a single process)."""
        if not self.enabled:
            return float(value)
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is True on any rank (keeps cancellation in lock-step)."""
        if not self.enabled:
            return bool(flag)
        tensor = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item() > 0)

    def sum_array(self, array, device: torch.device):
        """Element-wise sum of a numpy array over ranks (no-op for a single process)."""
        if not self.enabled:
            return array
        tensor = torch.as_tensor(array, device=device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup_distributed(device: torch.device) -> DistContext:
    """Join (or create from the torchrun environment) the default process group."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")), initialized_here=True)


def teardown_distributed(context: DistContext) -> None:
    if context.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, context: DistContext, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` when running distributed, else the model itself."""
    if not context.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)
