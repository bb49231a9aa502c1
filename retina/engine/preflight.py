"""Checks made before training starts, and error text recovered from DataLoader workers, so a
run fails early and in one line rather than hours in with a traceback."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from retina.errors import RetinaError

_BAD_DATA = ("BadImageError", "TooManyBadImages")


class PreflightError(RetinaError, RuntimeError):
    """The run directory cannot hold this run; one line naming it."""


def checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Size of one checkpoint: weights and buffers plus the optimizer's per-parameter state
    (SGD momentum: 1 tensor per parameter; AdamW: 2)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    slots = 2 if isinstance(optimizer, torch.optim.AdamW) else 1
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + slots * params


def check_run_dir(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The run directory is writable and its disk holds two more checkpoints (one being written
    next to the last complete one)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise PreflightError(f"cannot write to run directory {run_dir}: {e.strerror or e}") from None
    need = 2 * checkpoint_bytes(model, optimizer)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise PreflightError(f"only {free / 2**20:.0f} MiB free in {run_dir}; a checkpoint needs "
                             f"{need / 2**21:.0f} MiB and two must fit; free space or use --out")


def worker_error_line(error: BaseException) -> Optional[str]:
    """The one-line message of a bad-data error, whether raised here or re-raised from a
    DataLoader worker (whose message carries the worker's traceback); ``None`` for others."""
    if type(error).__name__ in _BAD_DATA:
        text = str(error)
    elif any(f"{name}:" in str(error) for name in _BAD_DATA):
        text = str(error)
    else:
        return None
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(error).__name__
    for name in _BAD_DATA:  # "retina.data.coco.BadImageError: msg" -> "msg"
        if f"{name}: " in last:
            last = last.split(f"{name}: ", 1)[1]
    return last
