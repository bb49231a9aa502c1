"""Run a detector on image files: a JSON of detections and one drawn image per input.

This module owns the prediction outputs: ``out_dir/detections.json`` (a list of ``{"file_name",
"bbox": [x, y, w, h], "score", "category_id", "category_name"}``) and one drawing per input,
``out_dir/<name>`` in the input's own format (``retina.viz.IMAGE_FORMATS``; JPEG for another),
with boxes, class names and scores drawn (``retina.viz``). ``out_dir`` is made once an image has
been detected: a run that reads none leaves nothing behind. Images are decoded by the datasets'
own ``read_image`` and reach the model as uint8, as in evaluation.

Shape legend: D detections of one image, K classes.
"""

from __future__ import annotations

import glob
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from retina.data.coco import BadImageError, read_image
from retina.data.formats import IMAGE_SUFFIXES
from retina.engine.evaluate import same_size_batches
from retina.errors import InputError, MissingFileError
from retina.io import write_json
from retina.viz import IMAGE_FORMATS, draw_detections, write_image


def list_images(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """The images to predict on, in the order given, each once: a file is taken as it is, a
    directory gives every image directly inside it (the suffixes of ``IMAGE_SUFFIXES``, as a
    YOLO folder may hold them; case-insensitive, sorted), a glob pattern (``*``, ``?``, ``[``;
    ``**`` recurses) gives its matches, sorted, files with those suffixes and directories as above.

    Raises:
        MissingFileError: a path that does not exist, or a pattern that matches nothing
            (one line naming it).
        InputError: a directory or pattern that holds no image.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: dict[Path, None] = {}  # ordered set
    for item in inputs:
        found.update(dict.fromkeys(_expand(str(item))))
    return list(found)


def _expand(item: str) -> list[Path]:
    """The images one ``--input`` item names (see ``list_images``)."""
    if glob.has_magic(item):
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
        if not matches:
            raise MissingFileError(f"no file or directory matches {item}")
        paths = [p for m in matches for p in ([m] if _is_image_file(m) else _images_in(m))]
    else:
        path = Path(item)
        if not path.exists():
            raise MissingFileError(f"no such file or directory: {item}")
        if path.is_file():
            return [path]
        paths = _images_in(path)
    if not paths:
        raise InputError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {item}")
    return paths


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _images_in(directory: Path) -> list[Path]:
    """The images directly inside ``directory``, sorted; [] for anything but a directory."""
    return sorted(p for p in directory.iterdir() if _is_image_file(p)) if directory.is_dir() else []


def _output_names(paths: list[Path]) -> list[str]:
    """Each input's drawing: its own name where ``write_image`` writes its format, else
    ``<stem>.jpg``; ``<stem>_2<suffix>``, ``_3``, ... for a name that an earlier input took (the
    same name in another folder; compared case-insensitively, as some file systems do)."""
    names: list[str] = []
    taken: set[str] = set()
    for p in paths:
        suffix = p.suffix if p.suffix.lower() in IMAGE_FORMATS else ".jpg"
        name, k = f"{p.stem}{suffix}", 1
        while name.lower() in taken:
            k += 1
            name = f"{p.stem}_{k}{suffix}"
        taken.add(name.lower())
        names.append(name)
    return names


def _record_names(paths: list[Path]) -> list[str]:
    """Each input's ``file_name`` in detections.json: its name, or the path as given when
    several inputs share that name."""
    counts = Counter(p.name for p in paths)
    return [p.name if counts[p.name] == 1 else str(p) for p in paths]


class _Skipped:
    """The inputs skipped (unreadable, or refused by the model), each named on stderr as
    ``warning: skipping ...`` once some image has been detected: until then they are held back,
    so that a run that detects no image ends with its one-line error alone."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self._shown = 0
        self._detected = False

    def __len__(self) -> int:
        return len(self.reasons)

    def add(self, reason: str) -> None:
        self.reasons.append(reason)
        self._show()

    def detected(self) -> None:
        self._detected = True
        self._show()

    def _show(self) -> None:
        if self._detected:
            for reason in self.reasons[self._shown:]:
                print(f"warning: skipping {reason}", file=sys.stderr)
            self._shown = len(self.reasons)


def predict_paths(
    model: nn.Module,
    paths: list[Path],
    out_dir: Path,
    class_names: list[str],
    cat_ids: list[int],
    device: torch.device | str,
    score_thresh: float = 0.3,
    batch_size: int = 4,
) -> list[dict]:
    """Detect objects in each image file and write ``out_dir/detections.json`` and one drawing
    per input (see the module docstring).

    Args:
        model: eval-mode contract: ``model(list of uint8 (3, H, W))`` -> list of dicts with
            ``boxes`` (D, 4) XYXY in each input's pixels, ``scores`` (D,), ``labels`` (D,) in 0..K-1.
        class_names, cat_ids: K names and COCO category ids, indexed by contiguous label.
        score_thresh: detections with a lower score are neither written nor drawn.

    Images are read ``batch_size`` at a time and given to the model one size at a time
    (``same_size_batches``), so each image's detections are those of the image alone.

    Returns:
        The detections written to JSON, in input order then model order.

    Raises:
        InputError: some files could not be read, or the model refused them (a static export
            given another size): each was skipped with a warning on stderr, the others'
            detections and drawings were written first; one line names the first. When no
            image could be, nothing is written (no ``out_dir`` either) and no warning printed.
    """
    device = torch.device(device)
    out_dir = Path(out_dir)
    paths = [Path(p) for p in paths]
    out_paths = [out_dir / name for name in _output_names(paths)]
    _refuse_overwriting_inputs(paths, out_paths)
    record_names = _record_names(paths)
    skipped = _Skipped()
    detections: list[dict] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(paths), batch_size):
            images = _read_images(paths, range(start, min(start + batch_size, len(paths))), skipped)
            outputs = _detect(model, images, paths, device, skipped)
            for i in sorted(outputs):  # input order
                boxes, scores, labels = _kept(outputs[i], score_thresh)
                detections.extend(_to_records(record_names[i], boxes, scores, labels, class_names, cat_ids))
                write_image(draw_detections(images[i], boxes, labels, scores, class_names), out_paths[i])
                skipped.detected()
    finally:
        model.train(was_training)
    if paths and len(skipped) == len(paths):
        head = "the image could not" if len(paths) == 1 else f"none of the {len(paths)} images could"
        raise InputError(f"{head} be read or run ({skipped.reasons[0]}); nothing was written")
    write_json(out_dir / "detections.json", detections)
    if skipped:  # after the others' results are written: one bad file loses no finished work
        raise InputError(f"{len(skipped)} of {len(paths)} images could not be read or run (the first: "
                         f"{skipped.reasons[0]}); the detections of the other {len(paths) - len(skipped)} "
                         f"are in {out_dir / 'detections.json'}")
    return detections


def _refuse_overwriting_inputs(paths: list[Path], out_paths: list[Path]) -> None:
    for src, dst in zip(paths, out_paths):
        if dst.exists() and dst.resolve() == src.resolve():
            raise InputError(f"output {dst} would overwrite its input; choose another out_dir")


def _read_images(paths: list[Path], indices: range, skipped: _Skipped) -> dict[int, Tensor]:
    """``{i: uint8 (3, H, W)}`` of the readable ``paths[i]``; the others go to ``skipped``."""
    images: dict[int, Tensor] = {}
    for i in indices:
        try:
            images[i] = read_image(paths[i])
        except BadImageError as e:
            skipped.add(str(e))
    return images


def _detect(model: nn.Module, images: dict[int, Tensor], paths: list[Path], device: torch.device,
            skipped: _Skipped) -> dict[int, dict]:
    """``{i: the model's output}`` of each image, one model call per image size (see
    ``predict_paths``); the images of a call the model refuses (``InputError``, e.g. a static
    export given another size) go to ``skipped``."""
    index = list(images)
    sizes = [tuple(images[i].shape[-2:]) for i in index]
    outputs: dict[int, dict] = {}
    for group in same_size_batches(sizes, len(index), max(len(index), 1)):
        batch = [index[j] for j in group]
        try:
            with torch.inference_mode():
                outputs.update(zip(batch, model([images[i].to(device) for i in batch])))
        except InputError as e:
            for i in batch:
                skipped.add(f"{paths[i]}: {e}")
    return outputs


def _kept(output: dict, score_thresh: float) -> tuple[Tensor, Tensor, Tensor]:
    """(boxes (D', 4) float, scores (D',) float, labels (D',) long) on the CPU of the detections
    scoring at least ``score_thresh``."""
    keep = output["scores"] >= score_thresh  # (D,)
    boxes = output["boxes"][keep].detach().cpu().float()  # (D', 4)
    scores = output["scores"][keep].detach().cpu().float()  # (D',)
    labels = output["labels"][keep].detach().cpu().long()  # (D',)
    return boxes, scores, labels


def _to_records(
    file_name: str,
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    class_names: list[str],
    cat_ids: list[int],
) -> list[dict]:
    """JSON records for one image's kept detections: boxes (D, 4) XYXY -> [x, y, w, h]."""
    boxes_xywh = box_convert(boxes.double(), "xyxy", "xywh")  # (D, 4)
    boxes_xywh = torch.round(boxes_xywh * 100) / 100
    label_list = labels.tolist()
    return [
        {
            "file_name": file_name,
            "bbox": b,
            "score": round(s, 4),
            "category_id": int(cat_ids[c]),
            "category_name": class_names[c],
        }
        for b, s, c in zip(boxes_xywh.tolist(), scores.double().tolist(), label_list)
    ]
