"""Pascal VOC folders: ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg``, ``ImageSets/Main/<split>.txt``.

This module owns reading one into COCO-format dicts (``read_voc``; conventions in ``formats.py``).

Box convention: VOC corners are 1-based, inclusive pixel indices: ``xmin = 1`` is the first pixel
column, ``xmax = W`` the last. In the continuous coordinates used everywhere else (the first pixel
spans [0, 1), the last [W - 1, W)) the box covers [xmin - 1, xmax] x [ymin - 1, ymax]:

    x1 = xmin - 1,  y1 = ymin - 1,  x2 = xmax,  y2 = ymax

as detectron2's ``pascal_voc.py`` converts them (``bbox[0] -= 1.0; bbox[1] -= 1.0``). So
xmin = 1, xmax = 10 are the 10 pixels 0..9: x1 = 0, x2 = 10, width 10 = xmax - xmin + 1.

- Splits: the first word of each line of ``ImageSets/Main/<split>.txt`` is an image id.
- Images: ``JPEGImages/<id>.jpg``, else the xml's ``filename``, else ``<id>`` with another image
  suffix; the size from the xml's ``size``, or from the file's header when it is absent or 0.
- Classes: the list given, in its order, or every object name of the splits read, sorted
  (codepoint order: the same labels on every machine); a name outside a given list is an error.
- ``difficult`` objects become ignore regions (``iscrowd`` 1: no anchor learns from them, and
  COCOeval neither rewards nor punishes detections on them, as VOC's own evaluation) unless
  ``keep_difficult``, which makes them ordinary boxes.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from retina.data.formats import IMAGE_SUFFIXES, FolderData, Problem, annotation, categories, image_size
from retina.errors import MissingFileError


@dataclass
class _Object:
    name: str
    difficult: bool
    xyxy: tuple[float, float, float, float]  # continuous pixel corners (module docstring)
    where: str  # "a.xml object 2"


@dataclass
class _Image:
    file_name: str
    width: int
    height: int
    objects: list[_Object]


class _Malformed(Exception):
    """A record of one xml file that cannot be read; ``str`` names the file."""


def split_ids(root: Path, split: str) -> list[tuple[str, str]]:
    """(image id, "file:line") of every line of ``ImageSets/Main/<split>.txt``, each id once (a
    repeated line would count its image's boxes twice in evaluation), in file order. Read as
    UTF-8 with or without a byte-order mark (Windows editors write one)."""
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise MissingFileError(f"{path} not found: a VOC folder lists the image ids of split "
                                f"{split!r} there, one a line")  # fmt: skip
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    ids = {}  # image id -> its first line
    for i, line in enumerate(lines, 1):
        if line.strip():
            ids.setdefault(line.split()[0], f"{path}:{i}")
    return list(ids.items())


def _text(node: ET.Element, tag: str, where: str) -> str:
    text = node.findtext(tag)
    if text is None or not text.strip():
        raise _Malformed(f"{where}: no <{tag}>")
    return text.strip()


def _number(node: ET.Element, tag: str, where: str) -> float:
    text = _text(node, tag, where)
    try:
        value = float(text)
    except ValueError:
        raise _Malformed(f"{where}: <{tag}> is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise _Malformed(f"{where}: <{tag}> is {text!r}, not a finite number")
    return value


def _parse_object(node: ET.Element, where: str) -> _Object:
    name = _text(node, "name", where)
    difficult = node.findtext("difficult", "0").strip() or "0"
    if difficult not in ("0", "1"):
        raise _Malformed(f"{where}: <difficult> is {difficult!r}, not 0 or 1")
    box = node.find("bndbox")
    if box is None:
        raise _Malformed(f"{where}: no <bndbox>")
    xmin, ymin, xmax, ymax = (_number(box, t, where) for t in ("xmin", "ymin", "xmax", "ymax"))
    return _Object(name, difficult == "1", (xmin - 1, ymin - 1, xmax, ymax), where)


def _parse_xml(path: Path) -> tuple[ET.Element, list[_Object]]:
    """The xml root and its objects; ``_Malformed`` names the file (and the line when it does
    not parse, or the object)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        line, column = e.position
        raise _Malformed(f"{path}:{line}:{column}: not valid XML ({str(e).split(':')[0]})") from None
    objects = [_parse_object(node, f"{path} object {i}")
               for i, node in enumerate(root.findall("object"), 1)]  # fmt: skip
    return root, objects


def _image_file(image_dir: Path, image_id: str, xml_name: str | None) -> str:
    """The file of ``image_id`` in ``image_dir`` (module docstring); ``<id>.jpg`` when none is
    there, so that the loader and ``retina data check`` report it missing."""
    candidates = [f"{image_id}.jpg"] + ([xml_name] if xml_name else [])
    candidates += [f"{image_id}{s}" for s in IMAGE_SUFFIXES[1:]]
    return next((c for c in candidates if (image_dir / c).is_file()), candidates[0])


def _size(root: ET.Element, where: str) -> tuple[int, int] | None:
    """(width, height) from ``<size>``; None when it is absent or 0 (then the file tells)."""
    size = root.find("size")
    if size is None:
        return None
    width, height = (int(_number(size, t, where)) if size.findtext(t) else 0 for t in ("width", "height"))
    return (width, height) if width > 0 and height > 0 else None


def _read_image(root: Path, image_id: str, listed_at: str, problems: list[Problem]) -> _Image | None:
    """One image of a split, or None (and its problem appended) when it cannot be used."""
    xml_path = root / "Annotations" / f"{image_id}.xml"
    if not xml_path.is_file():
        problems.append(Problem("missing_annotation", f"{xml_path}: not found (listed in {listed_at})"))
        return None
    try:
        xml_root, objects = _parse_xml(xml_path)
        size = _size(xml_root, f"{xml_path} <size>")
    except _Malformed as e:
        problems.append(Problem("malformed_label", str(e)))
        return None
    image_dir = root / "JPEGImages"
    file_name = _image_file(image_dir, image_id, (xml_root.findtext("filename") or "").strip() or None)
    if size is None:
        size = image_size(image_dir / file_name)
        if isinstance(size, Problem):
            problems.append(size._replace(where=f"{size.where} ({xml_path} gives no <size>)"))
            return None
    return _Image(file_name, size[0], size[1], objects)


def _split_dict(images: list[_Image], names: list[str], keep_difficult: bool,
                problems: list[Problem]) -> tuple[dict, dict[int, str]]:  # fmt: skip
    """The COCO dict of one split's images, and where each annotation is written."""
    label_of = {name: k for k, name in enumerate(names)}
    records, anns, origins = [], [], {}
    for img in images:
        image_id = len(records) + 1
        records.append({"id": image_id, "file_name": img.file_name, "height": img.height,
                        "width": img.width})  # fmt: skip
        for obj in img.objects:
            if obj.name not in label_of:
                problems.append(Problem("unknown_class", f"{obj.where}: class {obj.name!r} is not "
                                                         f"among the classes {names}"))  # fmt: skip
                continue
            x1, y1, x2, y2 = obj.xyxy
            anns.append(annotation(len(anns) + 1, image_id, label_of[obj.name], [x1, y1, x2 - x1, y2 - y1],
                                   crowd=obj.difficult and not keep_difficult))  # fmt: skip
            origins[len(anns)] = obj.where
    return {"images": records, "annotations": anns, "categories": categories(names)}, origins


def read_voc(root: str | Path, splits: Sequence[str], classes: Sequence[str] = (),
             keep_difficult: bool = False) -> FolderData:  # fmt: skip
    """The ``splits`` of the VOC folder ``root`` as COCO dicts (see the module docstring).

    Raises:
        MissingFileError: a split file is missing (one line naming it).
    """
    root = Path(root)
    problems: list[Problem] = []
    images = {split: [_read_image(root, image_id, at, problems) for image_id, at in split_ids(root, split)]
              for split in splits}  # fmt: skip
    images = {split: [img for img in imgs if img is not None] for split, imgs in images.items()}
    names = list(classes) or sorted({o.name for imgs in images.values() for img in imgs for o in img.objects})
    folder = FolderData("voc", root, names, given_classes=tuple(classes))
    for split, split_images in images.items():
        folder.splits[split], folder.origins[split] = _split_dict(split_images, names, keep_difficult,
                                                                  problems)  # fmt: skip
        folder.image_dirs[split] = root / "JPEGImages"
    folder.problems = problems
    return folder
