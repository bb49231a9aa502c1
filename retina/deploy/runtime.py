"""Exported detectors (``retina export``) behind the model's own eval-mode interface.

``load_exported(path)`` reads an ``.onnx`` file (run by onnxruntime) or a ``.pt2`` program
(``torch.export``, run by PyTorch without retina's model code) and returns what
``retina.engine.checkpoint.load_model`` returns: ``(detector, config, class_names, cat_ids)``,
the config and class names coming from the file's metadata. The detector is an ``nn.Module``
whose ``detector(images)`` takes a list of (3, H, W) images, uint8 or float in [0, 1], and
returns per-image dicts of ``boxes`` (D, 4) XYXY in the input's pixels, ``scores`` (D,),
``labels`` (D,) int64, as ``RetinaNet`` in eval mode; so ``retina predict`` and ``retina eval``
run it unchanged.

Images of one size go to the exported graph together (one batch) when it was exported with
``--dynamic``; a graph exported for one input shape takes only that shape. Each image's result
is the one eager inference gives for it in a batch of images of its size (eager inference pads a
batch of mixed sizes to its largest, which changes the features near a smaller image's border).

Shape legend: N images, D detections of one image (``detections_per_image`` when padded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from retina.errors import InputError, MissingFileError, RetinaError
from retina.model.retinanet import to_float

EXPORT_SUFFIXES = (".onnx", ".pt2")
# What an exported file's metadata holds, each a string (ONNX metadata_props, .pt2 extra files).
METADATA_KEYS = ("retina_export", "class_names", "cat_ids", "config", "input_dtype", "input_shape",
                 "outputs", "contract")
ONNXRUNTIME_MISSING = ("onnxruntime is not installed; `retina export` and `--weights *.onnx` need it: "
                       "pip install 'retina[export]'")


class ExportError(RetinaError, RuntimeError):
    """An exported file cannot be written, read or run; one line naming the file."""


def is_exported(path: str | Path) -> bool:
    """True for a file ``retina export`` writes (``.onnx``, ``.pt2``), by its suffix."""
    return Path(path).suffix.lower() in EXPORT_SUFFIXES


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or an ``ExportError`` saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(ONNXRUNTIME_MISSING) from None
    return onnxruntime


def unpad(boxes: Tensor, scores: Tensor, labels: Tensor, num: Tensor) -> list[dict[str, Tensor]]:
    """The graph's padded outputs (N, D, 4), (N, D), (N, D), counts (N,) -> N dicts of the first
    ``num[i]`` detections, as ``RetinaNet`` returns them."""
    return [{"boxes": boxes[i, :c], "scores": scores[i, :c], "labels": labels[i, :c].long()}
            for i, c in enumerate(num.tolist())]


class ExportedDetector(nn.Module):
    """An exported graph behind ``RetinaNet``'s eval interface (see the module docstring).

    ``run`` maps one uint8/float (N, 3, H, W) batch to the graph's four outputs as tensors;
    ``metadata`` holds the file's metadata (``class_names``, ``config``, ... as strings)."""

    def __init__(self, path: Path, metadata: dict[str, str]) -> None:
        super().__init__()
        self.path, self.metadata = path, metadata
        self.input_dtype = metadata.get("input_dtype", "uint8")
        self.input_shape: tuple = tuple(json.loads(metadata.get("input_shape", "null")) or ())

    def run(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def train(self, mode: bool = True) -> "ExportedDetector":
        """Only the flag: an exported graph is inference only (``retina eval`` and ``predict``
        set eval mode and restore the previous one)."""
        self.training = mode
        return self

    def forward(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        results: list[dict[str, Tensor]] = []
        for group in self._groups(images):  # consecutive images of one size
            batch = torch.stack([self._convert(img) for img in group])  # (N, 3, H, W)
            self._check_shape(batch)
            results.extend(unpad(*self.run(batch)))
        return results

    def _groups(self, images: Sequence[Tensor]) -> list[list[Tensor]]:
        fixed_batch = bool(self.input_shape) and isinstance(self.input_shape[0], int)
        groups: list[list[Tensor]] = []
        for img in images:
            if img.dim() != 3 or img.shape[0] != 3:
                raise InputError(f"images should be (3, H, W) tensors; got {tuple(img.shape)}")
            full = fixed_batch and groups and len(groups[-1]) == self.input_shape[0]
            if groups and not full and groups[-1][0].shape == img.shape:
                groups[-1].append(img)
            else:
                groups.append([img])
        return groups

    def _convert(self, image: Tensor) -> Tensor:
        image = image.detach().cpu()
        if self.input_dtype == "uint8":
            if image.dtype != torch.uint8:
                raise InputError(f"{self.path.name} takes uint8 images (exported with --input uint8), "
                                 f"got {image.dtype}; export with --input float for float images")
            return image
        return to_float(image)

    def _check_shape(self, batch: Tensor) -> None:
        for have, want in zip(batch.shape, self.input_shape):
            if isinstance(want, int) and have != want:
                raise InputError(f"{self.path.name} was exported for input {list(self.input_shape)} "
                                 f"(no --dynamic); got {list(batch.shape)}: export with --dynamic")


class OnnxDetector(ExportedDetector):
    """An ``.onnx`` file run by onnxruntime (CPU, or CUDA when asked and available)."""

    def __init__(self, path: Path, device: torch.device | str = "cpu", threads: int = 0) -> None:
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # no busy-waiting between runs: the threads would hold the cores that the caller's own
        # work (decoding images, PyTorch) needs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line naming it
            raise ExportError(f"cannot load {path} with onnxruntime: {_first_line(e)}") from None
        super().__init__(path, dict(session.get_modelmeta().custom_metadata_map))
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def run(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(batch.numpy())})
        return tuple(torch.from_numpy(o) for o in outputs)  # type: ignore[return-value]


class ProgramDetector(ExportedDetector):
    """A ``.pt2`` file (``torch.export`` program) run by PyTorch."""

    def __init__(self, path: Path, device: torch.device | str = "cpu") -> None:
        metadata = dict.fromkeys(METADATA_KEYS, "")
        try:
            program = torch.export.load(str(path), extra_files=metadata)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"cannot load {path} with torch.export.load: {_first_line(e)}") from None
        super().__init__(path, {k: v for k, v in metadata.items() if v})
        self.device = torch.device(device)
        self.program = program.module().to(self.device)

    def run(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with torch.inference_mode():
            outputs = self.program(batch.to(self.device))
        return tuple(o.cpu() for o in outputs)  # type: ignore[return-value]


# The config keys an exported graph holds as constants: its score threshold, NMS, top-k, test
# size, normalisation and padding. Other keys (data, eval) are read as for a checkpoint.
BUILT_IN = ("model.inference.", "model.input.")


def load_exported(path: str | Path, device: torch.device | str = "cpu", overrides: Sequence[str] = (),
                  cfg=None):
    """``(detector, config, class_names, cat_ids)`` of an exported file, as ``load_model`` for a
    checkpoint: the config is the file's (with ``overrides``, e.g. ``data.root=...``) unless
    ``cfg`` is given. ``InputError`` when the config changes a setting of ``BUILT_IN``."""
    from retina.config import config_changes, config_from_dict

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"exported model not found: {path}")
    detector: ExportedDetector = (OnnxDetector(path, device) if path.suffix.lower() == ".onnx"
                                  else ProgramDetector(path, device))
    meta = detector.metadata
    if "retina_export" not in meta or "config" not in meta:
        raise ExportError(f"{path} has no retina metadata (config, class names); was it written by "
                          "retina export?")
    built_in = json.loads(meta["config"])
    if cfg is None:
        cfg = config_from_dict(built_in, overrides, source=str(path))
    changed = [c for c in config_changes(built_in, cfg) if c.startswith(BUILT_IN)]
    if changed:  # they would be read, and silently not used: the graph holds its own
        raise InputError(f"{path} has its inference and input settings built in, so {changed[0]} "
                         f"cannot apply{f' (nor {len(changed) - 1} more)' if len(changed) > 1 else ''}; "
                         f"run the checkpoint with them, or export it again with --set")
    return detector.eval(), cfg, json.loads(meta["class_names"]), json.loads(meta["cat_ids"])


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def load_detector(weights: str | Path, device: torch.device | str = "cpu", overrides: Sequence[str] = (),
                  cfg=None):
    """``(detector, config, class_names, cat_ids)`` of what ``--weights`` names, for inference
    (``retina eval``, ``predict``, ``analyze errors``): an exported file run by its runtime, or a
    checkpoint as ``inference_model`` makes it (BatchNorm folded, memory format chosen), wrapped
    for test-time augmentation when the config asks for it (``with_test_time_augmentation``; an
    exported file has none, and its config cannot ask: ``BUILT_IN``)."""
    from retina.deploy.fuse import inference_model
    from retina.engine.checkpoint import load_model
    from retina.model import with_test_time_augmentation

    if is_exported(weights):  # retina export's .onnx / .pt2: config and classes inside
        return load_exported(weights, device, overrides, cfg)
    model, cfg, class_names, cat_ids = load_model(weights, device, tuple(overrides), cfg)
    return with_test_time_augmentation(inference_model(model), cfg), cfg, class_names, cat_ids
