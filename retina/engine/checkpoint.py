"""Checkpoints that hold every state a run needs, written atomically.

A checkpoint is a dict: ``model`` (state dict), ``optimizer``, ``scheduler``, ``scaler``,
``iteration``, ``rng`` (python, numpy, torch, cuda), ``config`` (plain dict), ``class_names``,
``cat_ids``. Writes go to a temporary file in the same directory, are fsync'ed, then renamed over
the target, so a kill during a save never leaves a truncated checkpoint under the final name.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retina.errors import RetinaError

CHECKPOINT_RE = re.compile(r"model_(\d{7})\.pth$")


class CheckpointError(RetinaError, RuntimeError):
    """A checkpoint file is missing, unreadable or not a retina checkpoint."""


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a retina checkpoint (no 'model' entry)")
    return ckpt


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Periodic checkpoints in ``run_dir`` as (iteration, path), oldest first."""
    found = []
    for p in Path(run_dir).glob("model_*.pth"):
        m = CHECKPOINT_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: the highest iteration, or ``model_final.pth``."""
    final = Path(run_dir) / "model_final.pth"
    found = list_checkpoints(run_dir)
    if final.is_file():
        return final
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the ``keep`` newest periodic checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep]:
        path.unlink(missing_ok=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model(path: str | Path, device: torch.device | str = "cpu", overrides: tuple[str, ...] = (),
               cfg=None):
    """Rebuild the trained model a checkpoint (or run directory) holds.

    Returns ``(model in eval mode, config, class_names, cat_ids)``. The config is the one stored
    in the checkpoint with ``overrides`` (``key=value``, e.g. ``data.root=...``) applied, or
    ``cfg`` when given (its ``model.num_classes`` is taken from the checkpoint's classes).
    """
    from retina.config import config_from_dict, config_to_dict
    from retina.model import build_model

    path = Path(path)
    if path.is_dir():
        found = last_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path}")
        path = found
    ckpt = load_checkpoint(path)
    if "config" not in ckpt:
        raise CheckpointError(f"{path} holds no config; was it written by retina train?")
    if cfg is None:
        cfg = config_from_dict(ckpt["config"], overrides, source=str(path))
    elif ckpt.get("class_names"):
        cfg = config_from_dict({**config_to_dict(cfg), "model": {
            **config_to_dict(cfg)["model"], "num_classes": len(ckpt["class_names"])}}, source=str(path))
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit its config: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), cfg, list(ckpt.get("class_names", [])), list(ckpt.get("cat_ids", []))
