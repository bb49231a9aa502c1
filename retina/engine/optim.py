"""Optimizer and learning-rate schedule from ``SolverConfig``: the one place that reads it."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from retina.config import SolverConfig

_NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.SyncBatchNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only; none on norm layers and biases
    (detectron2's WEIGHT_DECAY_NORM = 0 and torchvision's norm_weight_decay = 0)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, _NORM_TYPES) or name == "bias":
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: SolverConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    elif cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise AssertionError(cfg.optimizer)  # Literal: validated by the config loader


def lr_factor(cfg: SolverConfig, iteration: int, max_iter: Optional[int] = None) -> float:
    """Multiplier of ``cfg.lr`` at ``iteration``: linear warmup, then step decay or cosine to 0 at
    ``max_iter`` (``cfg.max_iter`` unless a time budget says otherwise: ``retina.engine.budget``)."""
    if cfg.schedule == "step":
        factor = cfg.gamma ** sum(iteration >= s for s in cfg.steps)  # lr / 10 at 60k, 80k (Sec. 4.1)
    else:
        end = max(max_iter or cfg.max_iter, 1)
        factor = 0.5 * (1 + math.cos(math.pi * min(iteration, end) / end))
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


class LrSchedule(LRScheduler):
    """Each group's initial lr times ``lr_factor`` of the iteration, stepped once per iteration.

    ``set_horizon(max_iter)`` moves where the cosine ends (a time budget re-estimates it); until
    then it is ``cfg.max_iter``. The state (``state_dict``) is the iteration count
    (``last_epoch``) and the lrs, the fields a ``LambdaLR`` writes, so either reads the other's;
    the horizon is not state: the trainer sets it again after a resume.
    """

    def __init__(self, cfg: SolverConfig, optimizer: torch.optim.Optimizer) -> None:
        self.cfg, self.max_iter = cfg, cfg.max_iter
        super().__init__(optimizer)

    def set_horizon(self, max_iter: int) -> None:
        self.max_iter = max_iter

    def get_lr(self) -> list[float]:
        factor = lr_factor(self.cfg, self.last_epoch, self.max_iter)
        return [base_lr * factor for base_lr in self.base_lrs]

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "cfg", "max_iter")}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "lr_lambdas"})  # LambdaLR's


def build_scheduler(cfg: SolverConfig, optimizer: torch.optim.Optimizer) -> LrSchedule:
    return LrSchedule(cfg, optimizer)
