"""Run a detector on image files: a JSON of detections and one drawn image per input.

This module owns the prediction outputs: ``out_dir/detections.json`` (a list of ``{"file_name",
"bbox": [x, y, w, h], "score", "category_id", "category_name"}``) and ``out_dir/<stem>.jpg``
with boxes, class names and scores drawn (``retina.viz``). Images are decoded by the datasets'
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
from retina.viz import draw_detections, write_image


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
    """``<stem>.jpg`` per input; ``<stem>_<ext>.jpg`` when two inputs share a stem; then
    ``_2``, ``_3``, ... for inputs of the same name in different folders."""
    stems = Counter(p.stem for p in paths)
    names: list[str] = []
    for p in paths:
        base = f"{p.stem}_{p.suffix.lstrip('.')}" if stems[p.stem] > 1 else p.stem
        name, k = f"{base}.jpg", 1
        while name in names:
            k += 1
            name = f"{base}_{k}.jpg"
        names.append(name)
    return names


def _record_names(paths: list[Path]) -> list[str]:
    """Each input's ``file_name`` in detections.json: its name, or the path as given when
    several inputs share that name."""
    counts = Counter(p.name for p in paths)
    return [p.name if counts[p.name] == 1 else str(p) for p in paths]


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
    """Detect objects in each image file and write ``out_dir/detections.json`` and one drawn
    ``out_dir/<stem>.jpg`` per input.

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
            given another size): each was skipped with a warning on stderr,
            the others' detections and drawings were written first; one line names the first.
    """
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in paths]
    out_paths = [out_dir / name for name in _output_names(paths)]
    record_names = _record_names(paths)
    for src, dst in zip(paths, out_paths):
        if dst.exists() and dst.resolve() == Path(src).resolve():
            raise InputError(f"output {dst} would overwrite its input; choose another out_dir")

    was_training = model.training
    model.eval()
    detections: list[dict] = []
    bad: list[str] = []  # unreadable images: skipped, named at the end
    try:
        for start in range(0, len(paths), batch_size):
            read = []  # (index, uint8 (3, H, W)) of the readable images of this batch
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    read.append((i, read_image(paths[i])))
                except BadImageError as e:
                    bad.append(str(e))
                    print(f"warning: skipping {e}", file=sys.stderr)
            if not read:
                continue
            index, images = [i for i, _ in read], [img for _, img in read]
            groups = same_size_batches([tuple(img.shape[-2:]) for img in images], len(images), len(images))
            outputs: dict[int, dict] = {}  # position in ``read`` -> the model's output
            for group in groups:  # one call per image size, see the docstring
                try:
                    with torch.inference_mode():
                        outputs.update(zip(group, model([images[j].to(device) for j in group])))
                except InputError as e:  # an image the model refuses (a static export's other size)
                    for j in group:
                        bad.append(f"{paths[index[j]]}: {e}")
                        print(f"warning: skipping {bad[-1]}", file=sys.stderr)
            for j in sorted(outputs):
                i, image, out = index[j], images[j], outputs[j]
                name, dst = record_names[i], out_paths[i]
                keep = out["scores"] >= score_thresh  # (D,)
                boxes = out["boxes"][keep].detach().cpu().float()  # (D', 4)
                scores = out["scores"][keep].detach().cpu().float()  # (D',)
                labels = out["labels"][keep].detach().cpu().long()  # (D',)
                detections.extend(_to_records(name, boxes, scores, labels, class_names, cat_ids))
                drawn = draw_detections(image, boxes, labels, scores, class_names)
                write_image(drawn, dst)
    finally:
        model.train(was_training)
    write_json(out_dir / "detections.json", detections)
    if bad:  # after the others' results are written: one bad file loses no finished work
        raise InputError(f"{len(bad)} of {len(paths)} images could not be read or run (the first: {bad[0]}); "
                         f"the detections of the other {len(paths) - len(bad)} are in "
                         f"{out_dir / 'detections.json'}")
    return detections


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
