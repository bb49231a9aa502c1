"""Dataset layouts a user's folder may have, and what a reader of one returns.

This module owns the detection of a folder's layout (``detect_format``) and ``FolderData``, the
common result of the VOC and YOLO readers (``voc.py``, ``yolo.py``): one COCO-format dict per
split, held in memory, so that every format goes through the same ``CocoDetection`` and the same
pycocotools evaluation. The dicts follow one convention, whatever the source:

- categories: ids 1..K in label order (label k is category k + 1), names as the source gives;
- images: ids 1..N in the split's order, ``file_name`` relative to ``image_dirs[split]``,
  ``height`` and ``width`` in pixels;
- annotations: ids 1..A, ``bbox`` [x, y, w, h] in absolute pixels, where (x, y) is the top-left
  corner in continuous coordinates (the first pixel spans [0, 1)), ``area`` = w * h (COCOeval's
  size ranges read it), ``iscrowd`` 1 for an ignore region (the assigner's crowd path; COCOeval
  ignores detections on it too).

Readers do not stop at the first bad file: each problem becomes a ``Problem`` (a kind of
``retina data check``'s table and one line naming the file, and the line or object) and the
record is left out. ``retina data check`` counts them; training refuses the folder with the first
(``FolderData.raise_on_problems``).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from PIL import Image

from retina.data.coco import upright_size
from retina.errors import InputError

Format = Literal["coco", "voc", "yolo"]

# The image files a YOLO folder may hold (ultralytics' IMG_FORMATS that PIL reads) and the
# extensions tried for a VOC image id after ".jpg".
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".mpo")


class Problem(NamedTuple):
    """One bad record: ``kind`` is a kind of ``retina.data.check.KINDS``; ``where`` one line."""

    kind: Literal["malformed_label", "unknown_class", "missing_annotation", "missing_file",
                  "unreadable_image"]  # fmt: skip
    where: str


@dataclass
class FolderData:
    """A VOC or YOLO folder read into COCO-format dicts (the conventions of the module docstring).

    Attributes:
        format: "voc" or "yolo".
        root: the folder (YOLO: the data.yaml file).
        class_names: K names; label k is category id k + 1.
        splits: split name -> COCO dict (``images``, ``annotations``, ``categories``).
        image_dirs: split name -> the folder ``file_name`` is relative to.
        origins: split name -> annotation id -> where it is written (``a.xml object 2``,
            ``a.txt:3``), for messages.
        problems: every record left out, in reading order.
    """

    format: Format
    root: Path
    class_names: list[str]
    splits: dict[str, dict] = field(default_factory=dict)
    image_dirs: dict[str, Path] = field(default_factory=dict)
    origins: dict[str, dict[int, str]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    given_classes: tuple[str, ...] = ()  # VOC: the class list the folder was read with, if any

    def summary(self, detected: bool = False) -> str:
        """One line: ``voc layout detected in ROOT (160 train / 40 val images, 1 class)``."""
        how = "layout detected in" if detected else "folder"
        counts = " / ".join(f"{len(d['images'])} {s}" for s, d in self.splits.items())
        k = len(self.class_names)
        return f"{self.format} {how} {self.root} ({counts} images, {k} class{'es' * (k != 1)})"

    def raise_on_problems(self) -> None:
        """``InputError`` naming the first problem (and how many there are), if any."""
        if not self.problems:
            return
        first, more = self.problems[0], len(self.problems) - 1
        also = f" (and {more} more problem{'s' * (more != 1)})" if more else ""
        raise InputError(f"{first.where}{also}; list them all with: {self.check_command()}")

    def check_command(self) -> str:
        """The ``retina data check`` that reads this folder as it was read: same splits, same
        class list (without them the check would look for train/val or miss an unknown class)."""
        cmd = ["retina", "data", "check", "--root", str(self.root), "--format", self.format]
        if list(self.splits) != ["train", "val"]:
            cmd += ["--splits", ",".join(self.splits)]
        if self.given_classes:
            cmd += ["--classes", ",".join(self.given_classes)]
        return shlex.join(cmd)


def detect_format(root: str | Path) -> Format:
    """The layout of ``root``: "voc" when it holds ``Annotations/`` and ``JPEGImages/``, "yolo"
    when it is a .yaml file or holds ``data.yaml``, else "coco" (json files named in the config).
    """
    root = Path(root)
    if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
        return "voc"
    if (root.is_file() and root.suffix in (".yaml", ".yml")) or (root / "data.yaml").is_file():
        return "yolo"
    return "coco"


def categories(class_names: list[str]) -> list[dict]:
    """COCO categories of ``class_names``: ids 1..K in label order."""
    return [{"id": k + 1, "name": name} for k, name in enumerate(class_names)]


def annotation(ann_id: int, image_id: int, label: int, xywh: list[float], crowd: bool) -> dict:
    """One COCO annotation of contiguous ``label`` (category id ``label + 1``)."""
    return {"id": ann_id, "image_id": image_id, "category_id": label + 1, "bbox": xywh,
            "area": xywh[2] * xywh[3], "iscrowd": int(crowd)}  # fmt: skip


def image_size(path: Path) -> tuple[int, int] | Problem:
    """(width, height) from the file's header, EXIF orientation applied (PIL decodes no pixels
    here), or the ``Problem``."""
    try:
        with Image.open(path) as im:
            return upright_size(im)
    except FileNotFoundError:
        return Problem("missing_file", f"{path}: image not found")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = " ".join((str(e) or type(e).__name__).split())
        return Problem("unreadable_image", f"{path}: cannot read the image: {reason}")
