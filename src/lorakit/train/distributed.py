"""The processes of a run and their devices: one process on the chosen device, or data parallelism through
torch.distributed (torchrun sets the environment): nccl with one GPU per process, gloo on CPU."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..device import parse_device, resolve_device
from ..errors import DeviceError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:  # only rank 0 writes files and prints
        return self.rank == 0

    def sum(self, value: float) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world(device: str | torch.device = "auto") -> World:
    """A plain `python` run is a world of one, on `device` (auto: the GPU when CUDA is available). Under torchrun,
    join its process group: with a GPU each process uses the one of its local rank (nccl), else the CPU (gloo)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        chosen = resolve_device(device)
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)  # kernels and libraries that use "the current GPU" use this one
        return World(device=chosen)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        if str(device).strip().lower() != "auto" and parse_device(device)[1] is not None:
            raise DeviceError(f"device {str(device)!r}: under torchrun each process uses the GPU of its local rank "
                              "(cuda:LOCAL_RANK); pass --device cuda (or auto), or CUDA_VISIBLE_DEVICES to choose GPUs")
        chosen = resolve_device(f"cuda:{local}")  # fewer GPUs than processes: the error gives the count
        torch.cuda.set_device(chosen)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(rank, size, chosen)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        # DDP's reducer holds the process group; freed only by a cycle collection, it would tear the group's threads
        # down at interpreter exit instead, where gloo can abort ("terminate called without an active exception").
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
