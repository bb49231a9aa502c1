"""YOLO folders (the ultralytics layout): ``data.yaml`` + image folders + parallel ``labels/``.

This module owns reading one into COCO-format dicts (``read_yolo``; conventions in ``formats.py``).

- ``data.yaml``: ``names`` (a list, or a mapping 0..K-1 -> name; ``nc``, when given, must agree),
  one entry per split (``train``, ``val``, ...): an image folder (searched recursively), a .txt
  file listing images (relative lines are relative to it), or a list of those. Entries are
  relative to ``path`` when the yaml has one (itself relative to the yaml's folder), else to the
  yaml's folder; an entry ``../x`` that does not exist is also tried as ``x`` there (Roboflow's
  exports write ``../train/images`` beside the yaml, and ultralytics accepts it).
- Labels: image ``.../images/<rest>/a.jpg`` -> ``.../labels/<rest>/a.txt`` (the last ``images``
  folder of the path becomes ``labels``; with none, ``a.txt`` beside the image), one object a
  line, ``class cx cy w h`` normalised by the image's width and height; a line
  ``class x1 y1 x2 y2 ... xn yn`` (n >= 3, a segment) counts as the box around its points. A
  missing label file or an empty one is an image without objects.
- Pixels: x1 = (cx - w / 2) * W, y1 = (cy - h / 2) * H, width w * W, height h * H; W and H from
  the image file's header (PIL reads no pixels).
- Class ids must be whole numbers in 0..K-1; a line of another length, or a field that is not a
  finite number, is an error naming ``file:line``.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import yaml

from retina.config import yaml_load
from retina.data.formats import IMAGE_SUFFIXES, FolderData, Problem, annotation, categories, image_size
from retina.errors import InputError, MissingFileError


def yaml_path(root: Path) -> Path:
    """The data.yaml of ``root``: ``root`` itself when it is a .yaml file, else ``root/data.yaml``."""
    path = root if root.suffix in (".yaml", ".yml") else root / "data.yaml"
    if not path.is_file():
        raise MissingFileError(f"{path} not found: a YOLO folder describes its splits and class "
                                "names in a data.yaml")  # fmt: skip
    return path


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise InputError(f"{where}: YAML syntax error: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: should be a mapping with 'names' and one entry per split")
    return data


def class_names(data: dict, path: Path) -> list[str]:
    """The K names of ``data['names']`` (a list, or a mapping 0..K-1 -> name, keys numbers or
    quoted numbers) in class-id order."""
    names: Any = data.get("names")
    if isinstance(names, dict):
        # quoted keys ('0': cat) are class ids too, as ultralytics reads them (int(k))
        names = {int(k) if isinstance(k, str) and k.strip().isdigit() else k: v for k, v in names.items()}
        if set(names) != set(range(len(names))):
            raise InputError(f"{path}: 'names' keys should be the class ids 0..{len(names) - 1}, "
                             f"got {sorted(names, key=str)}")  # fmt: skip
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list) or not names:
        raise InputError(f"{path}: 'names' should be a non-empty list of class names (or a "
                         "mapping class id -> name)")  # fmt: skip
    if "nc" in data and data["nc"] != len(names):
        raise InputError(f"{path}: nc is {data['nc']!r} but 'names' has {len(names)} names")
    return [str(n) for n in names]


def _existing(base: Path, entry: str) -> Path:
    path = base / entry
    if not path.exists() and entry.startswith("../") and (base / entry[3:]).exists():
        return base / entry[3:]
    return path


def list_images(base: Path, entry: Any, where: str) -> list[Path]:
    """The image files of one split entry (a folder, a .txt list or a list of those), sorted."""
    entries = entry if isinstance(entry, list) else [entry]
    files: list[Path] = []
    for item in entries:
        if not isinstance(item, str):
            raise InputError(f"{where}: {item!r} should be a folder or a .txt file of image paths")
        path = _existing(base, item)
        if path.is_dir():
            files += [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_file() and path.suffix == ".txt":
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
            files += [path.parent / ln for ln in lines if ln]
        else:
            raise MissingFileError(f"{where}: {path} is neither a folder nor a .txt list of images")
    return sorted(set(files))


def label_path(image: Path) -> Path:
    """``.../images/<rest>/a.jpg`` -> ``.../labels/<rest>/a.txt`` (ultralytics' img2label_paths)."""
    parts = list(image.parts)
    if "images" in parts[:-1]:
        parts[len(parts) - 2 - parts[:-1][::-1].index("images")] = "labels"
    return Path(*parts).with_suffix(".txt")


def _parse_line(fields: list[str], num_classes: int, where: str) -> tuple[int, list[float]] | Problem:
    """(class id, normalised [x1, y1, w, h]) of one label line, or its ``Problem``."""
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        return Problem("malformed_label", f"{where}: {len(fields)} fields; expected 'class cx cy w h' "
                                          f"(5) or a segment 'class x1 y1 ... xn yn'")  # fmt: skip
    try:
        numbers = [float(f) for f in fields]
    except ValueError:
        return Problem("malformed_label", f"{where}: not numbers: {' '.join(fields)!r}")
    if not all(math.isfinite(v) for v in numbers):
        return Problem("malformed_label", f"{where}: not finite: {' '.join(fields)!r}")
    cls, values = numbers[0], numbers[1:]
    if cls != int(cls) or not 0 <= cls < num_classes:
        return Problem("unknown_class", f"{where}: class {fields[0]} is not a class id 0..{num_classes - 1} "
                                        f"({num_classes} names in data.yaml)")  # fmt: skip
    if len(values) == 4:
        cx, cy, w, h = values
        return int(cls), [cx - w / 2, cy - h / 2, w, h]
    xs, ys = values[0::2], values[1::2]
    return int(cls), [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _read_labels(path: Path, num_classes: int, problems: list[Problem]) -> list[tuple[int, list[float], str]]:
    """(class id, normalised [x1, y1, w, h], "file:line") of every good line; none when there is
    no file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        problems.append(Problem("malformed_label", f"{path}: cannot read it: {e}"))
        return []
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            parsed = _parse_line(line.split(), num_classes, f"{path}:{i}")
            if isinstance(parsed, Problem):
                problems.append(parsed)
            else:
                out.append((*parsed, f"{path}:{i}"))
    return out


def _split_dict(files: list[Path], sizes: list, base: Path, names: list[str],
                problems: list[Problem]) -> tuple[dict, dict[int, str]]:  # fmt: skip
    images, anns, origins = [], [], {}
    for path, size in zip(files, sizes):
        if isinstance(size, Problem):
            problems.append(size)
            continue
        width, height = size
        image_id = len(images) + 1
        name = path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for cls, (x, y, w, h), where in _read_labels(label_path(path), len(names), problems):
            xywh = [x * width, y * height, w * width, h * height]
            anns.append(annotation(len(anns) + 1, image_id, cls, xywh, crowd=False))
            origins[len(anns)] = where
    return {"images": images, "annotations": anns, "categories": categories(names)}, origins


def read_yolo(root: str | Path, splits: Sequence[str], workers: int = 8) -> FolderData:
    """The ``splits`` of the YOLO folder (or data.yaml) ``root`` as COCO dicts (module docstring);
    image headers are read on ``workers`` threads.

    Raises:
        MissingFileError / InputError: data.yaml or a split's images cannot be found or read
            (one line naming the file and key).
    """
    path = yaml_path(Path(root))
    data = _read_yaml(path)
    names = class_names(data, path)
    base = path.parent / str(data["path"]) if data.get("path") else path.parent
    folder = FolderData("yolo", path, names)
    for split in splits:
        if not data.get(split):
            raise InputError(f"{path}: no '{split}' entry (the images of split {split!r})")
        files = list_images(base, data[split], f"{path}: {split}")
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL reads without the GIL
            sizes = list(pool.map(image_size, files))
        folder.splits[split], folder.origins[split] = _split_dict(files, sizes, base, names,
                                                                  folder.problems)  # fmt: skip
        folder.image_dirs[split] = base
    return folder
