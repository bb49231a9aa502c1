"""Checkpoints that hold every state a run needs, written atomically, read without running code.

A checkpoint is a dict of tensors and plain Python values only: ``model`` (state dict),
``optimizer``, ``scheduler``, ``scaler``, ``iteration``, ``rng`` (see ``rng_state``), ``config``
(plain dict), ``class_names``, ``cat_ids`` (lists); with ``train.ema`` also ``model_ema`` (the
averaged weights, a state dict of the same keys) and ``ema_updates`` (int). The averaged weights
are the ones evaluated, so they are the ones deployed: ``deployed_weights``. It is written with
``retina.io.atomic_write`` (temporary file, fsync, rename: a kill during a save never leaves a
truncated checkpoint under the final name) and read with ``torch.load(weights_only=True)``, which
refuses any pickled object that is not a tensor or a plain value, so a ``.pth`` from elsewhere
cannot run code when loaded. The one exception: checkpoints written before RNG states were
stored as tensors hold NumPy's RNG state as an array; exactly the NumPy types of that array are
allowed, and only for such files.
"""

from __future__ import annotations

import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retina.errors import RetinaError
from retina.io import atomic_write

CHECKPOINT_RE = re.compile(r"model_(\d{7})\.pth$")
_GLOBAL_RE = re.compile(r"GLOBAL (\S+) was not an allowed global")


class CheckpointError(RetinaError, RuntimeError):
    """A checkpoint file is missing, unreadable or not a retina checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds pickled objects other than tensors and plain values: loading it
    could run code, so it is refused (never skipped in favour of an older checkpoint)."""


def _old_numpy_rng_globals() -> list[Any]:
    """What a NumPy RNG state array in an old checkpoint unpickles through, under both of
    NumPy's module names (``numpy.core`` before 2.0, ``numpy._core`` since)."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [(multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _name(obj: Any) -> str:
    return obj[1] if isinstance(obj, tuple) else f"{obj.__module__}.{obj.__name__}"


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """Write ``ckpt`` (tensors and plain values only) to ``path`` atomically."""
    return atomic_write(path, lambda f: torch.save(ckpt, f))


def _torch_load(path: Path, allowed: list[Any]) -> Any:
    with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says enough
        warnings.simplefilter("ignore")
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)


def _unsafe(path: Path, error: Exception) -> UnsafeCheckpointError:
    found = _GLOBAL_RE.search(str(error))
    what = f"it refers to {found.group(1)}, which" if found else "it holds objects that"
    return UnsafeCheckpointError(f"{path}: not a retina checkpoint or unsafe to load (weights_only): "
                                 f"{what} a checkpoint never holds; load only files you trust")


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict in ``path``, read with ``weights_only=True``.

    Raises:
        UnsafeCheckpointError: the file pickles something other than tensors and plain values.
        CheckpointError: the file is missing, unreadable (truncated) or not a retina checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive ("PK"; a truncated one is reported below), before 1.6 a
    # pickle (0x80); a yaml, an image or text is named as what it is not
    if head[:1] != b"\x80" and head != b"PK":
        raise CheckpointError(f"{path} is not a checkpoint: not a file of torch.save (retina train "
                              f"writes model_final.pth in its run directory)")
    try:
        ckpt = _torch_load(path, [])
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the file
        if not isinstance(e, pickle.UnpicklingError):
            raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
        ckpt = _load_old_format(path, e)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a retina checkpoint (no 'model' entry)")
    return ckpt


def _load_old_format(path: Path, error: Exception) -> dict:
    """A checkpoint of this project written before RNG states were tensors: its only other
    globals are the NumPy RNG array's. Anything else is refused."""
    allowed = _old_numpy_rng_globals()
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a torch zip file (e.g. a bare pickle)
        raise _unsafe(path, error) from None
    if not needed:  # every global is allowed: the pickle itself is damaged
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}") from None
    if not needed <= {_name(g) for g in allowed}:
        raise _unsafe(path, error) from None
    try:
        return _torch_load(path, allowed)
    except Exception as e:  # noqa: BLE001
        raise _unsafe(path, e) from None


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


def checkpoint_file(path: str | Path) -> Path:
    """``path``, or for a run directory its newest complete checkpoint (``last_checkpoint``):
    what ``--weights`` and ``--init`` take. ``CheckpointError`` for a directory without one."""
    path = Path(path)
    if path.is_dir():
        found = last_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path}")
        return found
    return path


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the ``keep`` newest periodic checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep]:
        path.unlink(missing_ok=True)


def rng_state() -> dict:
    """Every global RNG's state as tensors and plain values: ``python`` [version, internal state
    (625 ints), gauss_next], ``numpy`` (MT19937: ``keys`` (624,) int64 tensor, ``pos``,
    ``has_gauss``, ``cached_gaussian``), ``torch`` (CPU byte tensor), ``cuda`` (one per device)."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": [version, list(internal), gauss_next],
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``'s result; also reads old checkpoints' (tuples, a NumPy array)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def deployed_weights(ckpt: dict) -> dict:
    """The state dict a checkpoint's model is evaluated and used with: ``model_ema`` when the run
    kept an EMA of its weights (``train.ema``), else ``model``."""
    return ckpt["model_ema"] if ckpt.get("model_ema") is not None else ckpt["model"]


def stored_config(ckpt: dict) -> dict:
    """The config a checkpoint was trained with, as a dict that today's rules accept.

    Checkpoints written before loss settings that do not apply became config errors may hold
    ``loss.type: ce|ohem`` with the default ``loss.gamma: 2.0``: the loss of that time trained
    them with gamma 0 (it replaced the value silently), so 0 is what they are read with.
    """
    config = dict(ckpt["config"])
    loss = dict(config.get("loss") or {})
    if loss.get("type") in ("ce", "ohem") and loss.get("gamma", 0) != 0:
        config["loss"] = {**loss, "gamma": 0.0}
    return config


def load_model(path: str | Path, device: torch.device | str = "cpu", overrides: tuple[str, ...] = (),
               cfg=None):
    """Rebuild the trained model a checkpoint (or run directory) holds.

    Returns ``(model in eval mode, config, class_names, cat_ids)``; the model holds the
    checkpoint's ``deployed_weights`` (its EMA when it has one). The config is the one stored
    in the checkpoint with ``overrides`` (``key=value``, e.g. ``data.root=...``) applied, or
    ``cfg`` when given. The checkpoint's class names decide ``model.num_classes``: a null count
    takes theirs, a set one that disagrees is refused (``retina.data.resolve_num_classes``). The
    model is built without pretrained backbone weights (every tensor comes from the checkpoint),
    so nothing is downloaded or read besides the checkpoint.
    """
    from retina.config import config_from_dict
    from retina.data import resolve_num_classes
    from retina.model import build_model

    path = checkpoint_file(path)
    ckpt = load_checkpoint(path)
    if "config" not in ckpt:
        raise CheckpointError(f"{path} holds no config; was it written by retina train?")
    if cfg is None:
        cfg = config_from_dict(stored_config(ckpt), overrides, source=str(path))
    if ckpt.get("class_names"):
        cfg = resolve_num_classes(cfg, len(ckpt["class_names"]), f"the checkpoint {path}")
    model = build_model(cfg, pretrained=False)
    try:
        model.load_state_dict(deployed_weights(ckpt))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit its config: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), cfg, list(ckpt.get("class_names", [])), list(ckpt.get("cat_ids", []))
