"""An exponential moving average of the weights (``train.ema``), the library way:
``torch.optim.swa_utils.AveragedModel`` with a decay that warms up.

The formula is mmdet's ``ExpMomentumEMA`` (mmdet/models/layers/ema.py; YOLOX's ``ModelEMA`` is
the same with the count shifted by one). ``AveragedModel``'s first update copies the weights;
the update after ``n`` earlier ones (n >= 1) is

    decay_n = decay * (1 - exp(-(n + 1) / warmup))
    ema <- decay_n * ema + (1 - decay_n) * weights

so early on, while the weights move fast, the average follows them (decay_1 = decay * (1 -
exp(-2 / warmup)) is near 0 for warmup in the thousands), and it settles to ``decay``. Only
parameters are averaged; buffers (BatchNorm statistics, FrozenBatchNorm constants, the loss
normaliser's count) are copied from the model at every update, as mmdet and AveragedModel do by
default. The update count (``n_averaged``) is read on the host once per update: free on a CPU,
one small copy and sync on a GPU (AveragedModel hands the count to the averaging function on the
parameters' device).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def ema_decay(decay: float, warmup: float, num_averaged: int) -> float:
    """The share of the average kept by the update after ``num_averaged`` earlier ones."""
    return decay * (1 - math.exp(-(num_averaged + 1) / warmup))


def build_ema(model: nn.Module, decay: float, warmup: float) -> AveragedModel:
    """An ``AveragedModel`` of ``model`` (deep-copied, on its device) updated by ``ema_decay``;
    call ``update_parameters(model)`` after each optimizer step."""

    @torch.no_grad()
    def average(ema_params: list, params: list, num_averaged: torch.Tensor) -> None:
        get_ema_multi_avg_fn(ema_decay(decay, warmup, int(num_averaged)))(ema_params, params, num_averaged)

    return AveragedModel(model, multi_avg_fn=average)


def ema_state(ema: AveragedModel) -> dict:
    """Checkpoint fields: ``model_ema`` (the averaged model's state dict, the model's keys) and
    ``ema_updates`` (updates made)."""
    return {"model_ema": ema.module.state_dict(), "ema_updates": int(ema.n_averaged)}


def load_ema_state(ema: AveragedModel, ckpt: dict) -> None:
    """Restore ``ema_state``'s fields exactly."""
    ema.module.load_state_dict(ckpt["model_ema"])
    ema.n_averaged.fill_(int(ckpt["ema_updates"]))
