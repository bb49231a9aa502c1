"""``retina export``: the whole detector in one file, and its parity with PyTorch proven.

Formats (both by PyTorch's own exporters, from ``retina.deploy.graph.DetectorGraph``, through
``torch.export``):

- ``onnx``: ``torch.onnx.export(dynamo=True)``; run by onnxruntime (``pip install
  'retina[export]'``). Metadata in the file's ``metadata_props``.
- ``pt2``: the ``torch.export`` program saved with ``torch.export.save`` (``.pt2``), PyTorch's
  successor of TorchScript (``torch.jit.trace`` would freeze the in-graph resize and top-k counts
  at the traced size); load with ``torch.export.load(F).module()``, no retina code needed.
  Metadata in the file's extra files. ``torchscript``, its former name, is a deprecated alias
  (``DEPRECATED_FORMATS``): it writes the same file, with a notice.

The file's contract (``DetectorGraph``): input ``images`` (N, 3, H, W) RGB, uint8 0..255 (or float
in [0, 1] with ``input_dtype="float32"``); outputs ``boxes`` (N, D, 4) XYXY in input pixels,
``scores`` (N, D), ``labels`` (N, D) (-1 padding), ``num_detections`` (N,), D =
``detections_per_image``. With ``dynamic`` any N >= 1, H and W (``MIN_SIDE`` to ``MAX_SIDE``);
without, only the example's shape. Metadata (strings): ``class_names``, ``cat_ids`` (JSON lists),
``config`` (the resolved config as JSON), ``input_dtype``, ``input_shape`` (JSON, a dynamic
dimension as its name), ``outputs``, ``contract``, ``retina_export`` (format version).

After writing, ``export_cli`` loads the file back (``retina.deploy.runtime``), runs it and PyTorch
eager on the same images, and reports the differences (``retina.deploy.parity``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor

from retina.config import Config, config_to_dict
from retina.deploy.graph import OUTPUTS, DetectorGraph
from retina.deploy.parity import BOX_TOL, Parity, compare_image
from retina.deploy.runtime import (ExportError, ExportedDetector, load_exported, require_onnxruntime)
from retina.errors import InputError
from retina.io import weights_dir
from retina.model.retinanet import RetinaNet

Format = Literal["onnx", "pt2"]
InputDtype = Literal["uint8", "float32"]
SUFFIX = {"onnx": ".onnx", "pt2": ".pt2"}
DEPRECATED_FORMATS = {"torchscript": "pt2"}  # former name -> the format it writes
FORMAT_VERSION = "1"
MIN_SIDE, MAX_SIDE, MAX_BATCH = 8, 8192, 1024  # the dynamic dimensions' declared ranges
EXPORT_MISSING = "{what} is not installed; retina export --format onnx needs it: pip install 'retina[export]'"
CONTRACT = ("input images (N, 3, H, W) RGB {dtype}; outputs boxes (N, D, 4) XYXY in input pixels, "
            "scores (N, D), labels (N, D) int64 (-1 = padding), num_detections (N,): image i's "
            "detections are its first num_detections[i] rows, by decreasing score")


def export_metadata(cfg: Config, class_names: Sequence[str], cat_ids: Sequence[int],
                    input_dtype: InputDtype, input_shape: Sequence[int | str]) -> dict[str, str]:
    """The strings an exported file carries (see the module docstring)."""
    return {"retina_export": FORMAT_VERSION, "class_names": json.dumps(list(class_names)),
            "cat_ids": json.dumps([int(c) for c in cat_ids]), "config": json.dumps(config_to_dict(cfg)),
            "input_dtype": input_dtype, "input_shape": json.dumps(list(input_shape)),
            "outputs": ",".join(OUTPUTS), "contract": CONTRACT.format(dtype=input_dtype)}


def _dynamic_shapes(dynamic: bool):
    if not dynamic:
        return None
    dim = torch.export.Dim
    return ({0: dim("batch", min=1, max=MAX_BATCH), 2: dim("height", min=MIN_SIDE, max=MAX_SIDE),
             3: dim("width", min=MIN_SIDE, max=MAX_SIDE)},)


def _quiet():
    """The exporters' progress prints and warnings (deprecations, specialisations) are not for the
    user; errors still raise."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    logging.disable(logging.WARNING)  # onnx_ir's notes on attribute types, torch's on symbols
    stack.callback(logging.disable, logging.NOTSET)
    return stack


def export_model(model: RetinaNet, path: str | Path, fmt: Format, example: Tensor, metadata: dict[str, str],
                 dynamic: bool = False, opset: int | None = None) -> Path:
    """Write ``DetectorGraph(model)`` to ``path`` in ``fmt``, traced on ``example`` (N, 3, H, W)
    (its dtype is the file's input dtype); ``dynamic``: any N, H, W. Returns ``path``."""
    if fmt not in SUFFIX:
        raise ValueError(f"unknown export format {fmt!r}; choose {' | '.join(SUFFIX)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = DetectorGraph(model.eval())
    shapes = _dynamic_shapes(dynamic)
    if dynamic and example.shape[0] == 1:  # torch.export specialises a size-1 dimension to 1
        example = example.expand(2, -1, -1, -1)
    with _quiet(), torch.no_grad():
        if fmt == "pt2":
            program = torch.export.export(graph, (example,), dynamic_shapes=shapes)
            torch.export.save(program, str(path), extra_files=metadata)
            return path
        for module in ("onnx", "onnxscript"):  # the exporter's own dependencies
            try:
                __import__(module)
            except ImportError:
                raise ExportError(EXPORT_MISSING.format(what=module)) from None
        program = torch.onnx.export(graph, (example,), dynamo=True, dynamic_shapes=shapes,
                                    opset_version=opset, input_names=["images"],
                                    output_names=list(OUTPUTS), verbose=False)
        program.model.metadata_props.update(metadata)
        program.save(str(path), external_data=False)
    return path


def _parity_images(cfg: Config, paths: Sequence[str], count: int) -> list[tuple[str, Tensor]]:
    """(name, uint8 (3, H, W)) of the given image files, else of the first ``count`` val images."""
    from retina.data.coco import read_image

    if paths:
        from retina.engine.predict import list_images

        return [(p.name, read_image(p)) for p in list_images(list(paths))[:count]]
    from retina.data import build_dataset

    try:
        dataset = build_dataset(cfg, "val")
    except (OSError, ValueError) as e:
        raise InputError(f"no val images for the parity check ({' '.join(str(e).split())}); "
                         "give some with --images") from None
    return [(f"val[{i}]", dataset[i][0]) for i in range(min(count, len(dataset)))]


def check_parity(model: RetinaNet, detector: ExportedDetector, images: Sequence[tuple[str, Tensor]],
                 box_tol: float = BOX_TOL) -> Parity:
    """Run eager ``model`` and ``detector`` on each image alone; the differences (``Parity``).
    With a fixed input shape, images of another shape are skipped."""
    post = model.postprocessor
    parity = Parity(box_tol=box_tol)
    fixed = [d if isinstance(d, int) else None for d in detector.input_shape[1:]]
    for name, image in images:
        if any(f is not None and f != s for f, s in zip(fixed, image.shape)):
            parity.notes.append(f"{name}: skipped, {list(image.shape)} is not the exported shape")
            continue
        if detector.input_dtype != "uint8":
            image = image.float() / 255
        with torch.inference_mode():
            ref = model([image])[0]
            out = detector([image])[0]
        h, w = image.shape[-2:]
        rh, rw = model.inference_size(h, w)
        compare_image(parity, ref, out, post.score_thresh, post.detections_per_image, name=name,
                      px_scale=max(h / rh, w / rw))
    return parity


def export_cli(weights: str, fmt: str, out: str | None, dynamic: bool, opset: int | None,
               images: Sequence[str], config: str | None, overrides: Sequence[str],
               input_dtype: InputDtype = "uint8", num_images: int = 4, box_tol: float = BOX_TOL) -> int:
    """``retina export``: load, export, check parity; 0 when parity holds, 1 when it does not.
    ``fmt`` may be a ``DEPRECATED_FORMATS`` name: a one-line notice on stderr gives the new one."""
    from retina.config import find_config, load_config
    from retina.engine.checkpoint import load_model

    if fmt in DEPRECATED_FORMATS:
        new = DEPRECATED_FORMATS[fmt]
        print(f"retina: --format {fmt} is deprecated: it writes a torch.export program (.pt2); "
              f"use --format {new}", file=sys.stderr)
        fmt = new

    if fmt == "onnx":
        require_onnxruntime()  # before the minutes of export, not after
    cfg = load_config(find_config(config), overrides) if config else None
    model, cfg, class_names, cat_ids = load_model(weights, "cpu", tuple(overrides), cfg)
    if cfg.model.inference.hflip_tta:  # the graph runs each image once: parity could not hold
        raise InputError("model.inference.hflip_tta is not exported (the exported graph detects each "
                         "image once); export with --set model.inference.hflip_tta=false")
    model = model.to(memory_format=torch.contiguous_format)
    model.channels_last = False  # the exported graph is NCHW; the runtime picks its own layout
    samples = _parity_images(cfg, images, num_images)
    if not samples:
        raise InputError("no images for the parity check; give some with --images")
    example = samples[0][1][None]  # (1, 3, H, W)
    if input_dtype == "float32":
        example = example.float() / 255
    shape: list[int | str] = ["batch", 3, "height", "width"] if dynamic else list(example.shape)
    path = Path(out) if out else weights_dir(weights) / f"model{SUFFIX[fmt]}"
    export_model(model, path, fmt, example,
                 export_metadata(cfg, class_names, cat_ids, input_dtype, shape), dynamic, opset)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {fmt}, input {shape} {input_dtype})")
    detector, *_ = load_exported(path)
    parity = check_parity(model, detector, samples, box_tol)
    for note in parity.notes:
        print(f"  {note}")
    print(parity.summary())
    return 0 if parity.ok else 1
