"""What a run continues from: ``TrainState`` holds the model, the average of its weights, the
optimizer, the lr schedule, the grad scaler, the time budget and the counters, and is the one
place that lists what a checkpoint stores of them (``state_dict``) and reads back
(``load_state_dict``): a run resumed from any checkpoint continues bit for bit.

The checkpoint's other entries describe the run rather than its state (its config, class names,
cat ids, world size and replica fingerprints: ``Trainer.save``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from retina.config import Config
from retina.engine.budget import TimeBudget
from retina.engine.checkpoint import rng_state, set_rng_state
from retina.engine.ema import build_ema, ema_state, load_ema_state
from retina.engine.optim import LrSchedule, build_optimizer, build_scheduler


@dataclass
class TrainState:
    model: nn.Module
    ema: Optional[AveragedModel]  # train.ema: the average evaluated and deployed
    optimizer: torch.optim.Optimizer
    scheduler: LrSchedule
    scaler: torch.amp.GradScaler
    budget: TimeBudget
    iteration: int = 0  # optimizer steps taken (skipped ones included)
    best_ap: float = -1.0  # the best periodic evaluation's AP (model_best.pth)
    skipped: int = 0  # steps skipped for a non-finite loss or gradient

    def state_dict(self) -> dict:
        """The checkpoint entries of the state, under the checkpoint format's names: ``model``,
        ``optimizer``, ``scheduler``, ``scaler`` (state dicts), ``iteration``, ``best_ap``,
        ``skipped_steps``, ``time_budget``, ``rng`` (every global RNG: ``rng_state``); with an
        average also ``model_ema`` and ``ema_updates`` (``ema_state``)."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "iteration": self.iteration, "best_ap": self.best_ap, "skipped_steps": self.skipped,
                 "time_budget": self.budget.state_dict(), "rng": rng_state()}
        return {**state, **(ema_state(self.ema) if self.ema is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s entries. Entries that older checkpoints lack keep their
        start values: ``best_ap``, ``skipped_steps``, ``time_budget``; without ``model_ema`` the
        average starts at this iteration.

        Raises:
            KeyError, RuntimeError, ValueError: the entries do not fit this state (another
                model, optimizer or schedule).
        """
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("model_ema") is not None:
            load_ema_state(self.ema, state)
        self.iteration = int(state["iteration"])
        self.best_ap = float(state.get("best_ap", -1.0))
        self.skipped = int(state.get("skipped_steps", 0))
        if "time_budget" in state:
            self.budget.load_state_dict(state["time_budget"])
        set_rng_state(state["rng"])


def build_train_state(cfg: Config, model: nn.Module, device_type: str, fp16: bool) -> TrainState:
    """A new run's state for ``model``: ``train.ema``'s average, ``solver``'s optimizer, schedule
    and time budget (``solver.max_minutes``; none: ``solver.max_iter`` alone ends the run), and a
    grad scaler that is on for fp16 autocast only."""
    s, ema = cfg.solver, cfg.train.ema
    optimizer = build_optimizer(s, model)
    return TrainState(
        model=model,
        ema=build_ema(model, ema.decay, ema.warmup) if ema.enabled else None,
        optimizer=optimizer,
        scheduler=build_scheduler(s, optimizer),
        scaler=torch.amp.GradScaler(device_type, enabled=fp16),
        budget=TimeBudget(s.max_minutes * 60 if s.max_minutes else math.inf, s.max_iter),
    )
