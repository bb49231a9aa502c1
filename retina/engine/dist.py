"""Where this process runs: its device, and torch.distributed (process-group setup from
torchrun's environment, rank queries)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from retina.errors import InputError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU; a CUDA request without CUDA is refused."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    return device


def init_distributed(device_kind: str) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); NCCL on CUDA, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum/max/min over ranks (a no-op in a single process); returns ``x``."""
    if world_size() > 1:
        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return x


def gather_to_main(obj):
    """Every rank's ``obj`` as a list on rank 0 (``None`` elsewhere); ``[obj]`` in one process."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main_process() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
