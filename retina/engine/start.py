"""How a run starts: the reading, checking and deciding ``Trainer.__init__`` relies on before it
builds anything. This process's device and place among torchrun's processes, the checkpoint a
``--resume`` continues from (and what its config changes), the datasets (the val set read up front
so that a bad one stops the run before training) and the model a run starts from
(``model.init``, or the checkpoint's tensors).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from retina.config import Config, config_changes
from retina.data import build_dataset
from retina.engine import dist
from retina.engine.checkpoint import (CheckpointError, UnsafeCheckpointError, last_checkpoint,
                                      list_checkpoints, load_checkpoint)
from retina.engine.evaluate import check_same_classes
from retina.engine.init import load_init
from retina.errors import RetinaError
from retina.model import build_model


class TrainingError(RetinaError, RuntimeError):
    """Training cannot go on; the message is one line and names what to do."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def join_processes(device: str, batch_size: int) -> tuple[torch.device, int, int]:
    """(device, rank, world size) of this process, in torchrun's process group when there is
    one; the global ``batch_size`` must split evenly over the processes."""
    device_ = dist.resolve_device(device)
    if dist.init_distributed(device_.type) and device_.type == "cuda":
        device_ = torch.device("cuda", torch.cuda.current_device())
    if device_.type == "cuda":  # input sizes repeat (fixed sizes or a few aspect groups)
        torch.backends.cudnn.benchmark = True
    world_size = dist.world_size()
    if batch_size % world_size:
        raise TrainingError(f"solver.batch_size={batch_size} is not divisible by the {world_size} processes")
    return device_, dist.rank(), world_size


def checkpoint_to_resume(run_dir: Path, resume: bool, main: bool) -> tuple[Optional[Path], Optional[dict]]:
    """The newest checkpoint of ``run_dir`` that loads (path and contents), newest first; an
    unreadable one (a disk fault; our own writes are atomic) is reported and the one before it
    is used. An unsafe one (pickled objects other than tensors: not written by retina) stops the
    run, and so do checkpoints without ``resume`` (the run would be overwritten)."""
    found = last_checkpoint(run_dir)
    if found is None:
        return None, None
    if not resume:
        raise TrainingError(f"{run_dir} already holds checkpoints ({found.name}); pass "
                            f"--resume to continue that run or --out to start a new one")
    for path in [found] + [p for _, p in reversed(list_checkpoints(run_dir)) if p != found]:
        try:
            return path, load_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            if main:
                print(f"warning: skipping unreadable checkpoint: {e}", file=sys.stderr)
    raise TrainingError(f"no readable checkpoint in {run_dir}; start a new run with --out")


def resume_line(ckpt: Optional[dict], cfg: Config) -> Optional[str]:
    """On resume, the settings that differ from the checkpoint's config (a raised
    ``solver.max_iter`` is the common one; anything else changes the run from here on)."""
    if ckpt is None or not isinstance(ckpt.get("config"), dict):
        return None
    changes = config_changes(ckpt["config"], cfg)
    if not changes:
        return None
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    return f"resuming with {len(changes)} setting(s) changed from the checkpoint's config: {shown}"


def read_datasets(cfg: Config, main: bool):
    """(train set, val set or None). Rank 0 reads the train set first (generating a bundled one)
    while the others wait. The val set is read now when the run evaluates, so that a missing or
    empty one stops the run before training; a COCO val json with other categories (it would be
    scored by position) is refused."""
    train_set = build_dataset(cfg, "train") if main else None
    dist.barrier()
    if train_set is None:
        train_set = build_dataset(cfg, "train")
    val_set = build_dataset(cfg, "val") if cfg.train.eval_at_end or cfg.train.eval_period > 0 else None
    if val_set is not None:
        check_same_classes(train_set.class_names, val_set, train_set=train_set)
    return train_set, val_set


def start_model(cfg: Config, resuming: bool, class_names: list[str],
                device: torch.device) -> tuple[nn.Module, Optional[str]]:  # fmt: skip
    """The model a run starts from, on ``device``, and the line saying what ``model.init`` loaded.
    Resuming, every tensor comes from the checkpoint, so neither pretrained weights nor
    ``model.init`` are read (the backbone config still decides FrozenBN and freeze_at)."""
    starts_from = None if resuming else cfg.model.init
    model = build_model(cfg, pretrained=not resuming and starts_from is None).to(device)
    if starts_from is None:
        return model, None
    return model, load_init(model, starts_from, class_names, cfg.model.head.prior_prob)
