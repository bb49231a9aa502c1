"""``retina data check``: find what is wrong with a dataset before training on it.

A COCO json file is checked as it is; a VOC or YOLO folder is read as COCO (``convert.py``), the
records it could not read are counted under the first three kinds below, and the COCO dicts of its
splits are then checked as a json would be, every example naming the xml object or the label
``file:line`` the box comes from.

This module owns the list of dataset problems and which of them are errors, the checks of the
image files and the report; ``check_records.py`` checks the records of a COCO dict (images,
annotations and their boxes, categories). The rule: an
**error** stops training or silently corrupts it (the loader refuses the json, an image fails to
load, annotations are lost or attached to the wrong thing); a **warning** is something the loader
handles in a defined way (drops or clips the box, keeps the image as a negative) that is still
worth a look.

Errors:
- ``malformed_label``: a VOC xml that does not parse or lacks a field (names the file, and the
  line or object), a YOLO label line of the wrong length or with a non-number (``file:line``)
- ``missing_annotation``: a VOC image id listed in a split file without its xml
- ``unknown_class``: a VOC object name outside ``data.classes``; a YOLO class id outside 0..K-1
- ``bad_record``: an image without id, file_name or positive integer height / width; an
  annotation without id, image_id, category_id or a 4-number bbox; a category without id
- ``duplicate_image_id``, ``duplicate_annotation_id``, ``duplicate_category_id``: an id used by
  several records (counted once per id)
- ``unknown_image_id``: an annotation whose image_id no image has (the loader would drop it)
- ``unknown_category``: an annotation whose category_id no category has (the loader refuses it)
- ``missing_file``: no file at image_dir / file_name
- ``unreadable_image``: the file does not decode (corrupt, truncated, not an image)
- ``size_mismatch``: the file's width x height differs from the json's

Warnings:
- ``category_name``: a category without a name (its class is shown as its id), or a name that
  several categories share
- ``nonfinite_box``: NaN or infinity in bbox (dropped by the loader)
- ``degenerate_box``: width or height <= 0 (dropped)
- ``tiny_box``: width or height in (0, 1) px (dropped)
- ``box_outside``: the box lies entirely outside its image (dropped)
- ``box_partly_outside``: the box crosses the image border (clipped)
- ``image_without_annotations``: kept as a negative example

Box checks use the json numbers as written ([x, y, w, h]); one annotation may count under
several kinds (a tiny box partly outside), except that non-finite and degenerate boxes are not
checked further. Images are decoded completely, so a truncated file is found (JPEGs at 1/8
scale: the whole stream is still read), on up to 8 threads: 5000 640x480 JPEGs take ~10 s on
one core (1.2 s reading headers only, ``decode=False``).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence

from PIL import Image

from retina.data.check_records import check_annotations, check_categories, check_image_records, has_size
from retina.data.coco import load_coco_json, upright_size
from retina.data.convert import read_folder
from retina.errors import InputError, MissingFileError, RetinaError

ERROR, WARNING = "error", "warning"

# kind -> (severity, title), in report order
KINDS: dict[str, tuple[str, str]] = {
    "malformed_label": (ERROR, "malformed annotation files or label lines"),
    "missing_annotation": (ERROR, "listed images without their annotation file"),
    "unknown_class": (ERROR, "objects of unknown classes"),
    "bad_record": (ERROR, "malformed image or annotation records"),
    "duplicate_image_id": (ERROR, "duplicate image ids"),
    "duplicate_annotation_id": (ERROR, "duplicate annotation ids"),
    "duplicate_category_id": (ERROR, "duplicate category ids"),
    "unknown_image_id": (ERROR, "annotations of unknown image ids"),
    "unknown_category": (ERROR, "annotations of unknown category ids"),
    "missing_file": (ERROR, "missing image files"),
    "unreadable_image": (ERROR, "unreadable or corrupt images"),
    "size_mismatch": (ERROR, "image sizes that disagree with the json"),
    "category_name": (WARNING, "categories without a name or with another's name"),
    "nonfinite_box": (WARNING, "boxes with non-finite numbers"),
    "degenerate_box": (WARNING, "boxes of zero or negative width or height"),
    "tiny_box": (WARNING, "boxes under 1 px wide or high"),
    "box_outside": (WARNING, "boxes entirely outside their image"),
    "box_partly_outside": (WARNING, "boxes partly outside their image"),
    "image_without_annotations": (WARNING, "images without annotations"),
}


@dataclass
class Finding:
    """One kind of problem: how many, and the first ``max_examples`` as one-line strings."""

    kind: str
    severity: str
    title: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    ann_file: Path
    image_dir: Path
    num_images: int
    num_annotations: int
    num_categories: int
    findings: dict[str, Finding]  # every kind of KINDS, in that order, count 0 included
    description: str = ""  # what was checked, when not a json file (a folder's one-line summary)

    def count(self, kind: str) -> int:
        return self.findings[kind].count

    def examples(self, kind: str) -> list[str]:
        return self.findings[kind].examples

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings.values() if f.count and f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings.values() if f.count and f.severity == WARNING]

    @property
    def exit_status(self) -> int:
        """1 when there are errors, 0 for warnings only (or nothing)."""
        return 1 if self.errors else 0


class _Collector:
    def __init__(self, max_examples: int) -> None:
        self.max_examples = max_examples
        self.findings = {k: Finding(k, sev, title) for k, (sev, title) in KINDS.items()}

    def add(self, kind: str, example: str) -> None:
        finding = self.findings[kind]
        finding.count += 1
        if len(finding.examples) < self.max_examples:
            finding.examples.append(example)


def inspect_image(path: Path, decode: bool = True) -> tuple[str, str, Optional[tuple[int, int]]]:
    """(status, reason, (width, height)) of one file: status "ok", "missing" or "unreadable"."""
    try:
        with Image.open(path) as im:
            size = upright_size(im)
            if decode:
                # JPEG: decoding at 1/8 scale still reads (and checks) the whole stream but
                # skips most of the IDCT: 1.3x faster on noisy 640x480 files, more on photos.
                im.draft(None, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
                im.load()
    except FileNotFoundError:
        return "missing", "not found", None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return "unreadable", " ".join((str(e) or type(e).__name__).split()), None
    return "ok", "", size


def _check_files(images: list, image_dir: Path, out: _Collector, decode: bool, workers: int,
                 progress: bool, said_by: str = "the json") -> None:  # fmt: skip
    records = [img for img in images
               if isinstance(img, dict) and isinstance(img.get("file_name"), str)]
    paths = [image_dir / img["file_name"] for img in records]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL decodes without the GIL
        results: Iterable = pool.map(lambda p: inspect_image(p, decode), paths)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(paths), desc="images", unit="img", file=sys.stderr)
        for img, path, (status, reason, size) in zip(records, paths, results):
            where = f"image {img.get('id')!r}: {path}"
            if status == "missing":
                out.add("missing_file", where)
            elif status == "unreadable":
                out.add("unreadable_image", f"{where}: {reason}")
            elif has_size(img) and size != (img["width"], img["height"]):
                out.add("size_mismatch", f"{where} is {size[0]}x{size[1]} (WxH), {said_by} says "
                                         f"{img['width']}x{img['height']}")  # fmt: skip


def check_dataset(ann_file: str | Path, image_dir: str | Path, max_examples: int = 5, *,
                  decode: bool = True, workers: Optional[int] = None,
                  progress: bool = False) -> CheckReport:  # fmt: skip
    """Every problem of ``ann_file`` + ``image_dir`` (see the module table), counted.

    Args:
        decode: decode every image completely (finds truncated files); False reads headers only.
        workers: threads reading images (default: up to 8, one per CPU).
    Raises:
        MissingFileError / InputError: one line, when the json or the folder cannot be used.
    """
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    if not ann_file.is_file():
        raise MissingFileError(f"annotation file not found: {ann_file}")
    if not image_dir.is_dir():
        raise MissingFileError(f"image directory not found: {image_dir}")
    data = load_coco_json(ann_file)
    if not isinstance(data.get("images"), list):
        raise InputError(f"{ann_file}: no 'images' list; is this a COCO annotation file?")
    out = _Collector(max_examples)
    sizes = _check_coco(data, ann_file, image_dir, out, decode, workers, progress)
    return CheckReport(ann_file, image_dir, *sizes, out.findings)


def _records(data: dict, key: str, ann_file: Path) -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise InputError(f"{ann_file}: '{key}' should be a list")
    return value


def _check_coco(data: dict, ann_file: Path, image_dir: Path, out: _Collector, decode: bool,
                workers: Optional[int], progress: bool, origins: Optional[dict] = None,
                said_by: str = "the json", report_categories: bool = True
                ) -> tuple[int, int, int]:  # fmt: skip
    """Every problem of one COCO dict (``ann_file`` names it in messages) into ``out``;
    (images, annotations, categories) counted."""
    images = data["images"]
    anns, cats = _records(data, "annotations", ann_file), _records(data, "categories", ann_file)
    by_id = check_image_records(images, out.add)
    # the splits of a folder share one category list: its problems are reported once
    cat_ids = check_categories(cats, out.add if report_categories else lambda kind, example: None)
    annotated = check_annotations(anns, by_id, set(cat_ids), out.add, origins)
    for image_id, img in by_id.items():
        if image_id not in annotated:
            out.add("image_without_annotations", f"image {image_id!r}: {img.get('file_name')}")
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    _check_files(images, image_dir, out, decode, workers, progress, said_by)
    return len(images), len(anns), len(cats)


def check_folder(root: str | Path, fmt: Literal["auto", "voc", "yolo"] = "auto",
                 splits: Sequence[str] = ("train", "val"), classes: Sequence[str] = (),
                 keep_difficult: bool = False, max_examples: int = 5, *, decode: bool = True,
                 workers: Optional[int] = None, progress: bool = False) -> CheckReport:  # fmt: skip
    """Every problem of the ``splits`` of a VOC or YOLO folder (``fmt`` "auto": detected),
    counted over all of them; arguments as ``read_folder`` and ``check_dataset``.

    Raises:
        FileNotFoundError / ValueError: one line, when the folder cannot be read at all.
    """
    folder = read_folder(root, fmt, splits, classes, keep_difficult)
    out = _Collector(max_examples)
    for problem in folder.problems:
        out.add(problem.kind, problem.where)
    totals = [0, 0, len(folder.class_names)]
    for i, (split, data) in enumerate(folder.splits.items()):
        n_images, n_anns, _ = _check_coco(data, folder.root, folder.image_dirs[split], out, decode,
                                          workers, progress, folder.origins[split], "its annotation",
                                          report_categories=i == 0)  # fmt: skip
        totals[0] += n_images
        totals[1] += n_anns
    image_dir = next(iter(folder.image_dirs.values()), folder.root)
    return CheckReport(folder.root, image_dir, *totals, out.findings,
                       description=folder.summary(detected=fmt == "auto"))


def format_report(report: CheckReport) -> str:
    """Human-readable report: a summary line, then each kind found with its first examples."""
    what = report.description or f"{report.ann_file} with images in {report.image_dir}"
    lines = [f"checked {what}: {report.num_images} images, {report.num_annotations} annotations, "
             f"{report.num_categories} categories"]  # fmt: skip
    for finding in report.errors + report.warnings:
        lines.append(f"{finding.severity.upper():8s}{finding.count:>7d}  {finding.title} "
                     f"[{finding.kind}]")  # fmt: skip
        lines += [f"{'':17s}{example}" for example in finding.examples]
        if finding.count > len(finding.examples):
            lines.append(f"{'':17s}... and {finding.count - len(finding.examples)} more")
    n_err = sum(f.count for f in report.errors)
    n_warn = sum(f.count for f in report.warnings)
    if not n_err and not n_warn:
        lines.append("no problems found")
    else:
        lines.append(f"{n_err} errors, {n_warn} warnings"
                     + ("" if n_err else " (warnings only: the dataset can be trained on)"))
    return "\n".join(lines)


def data_check_cli(ann: Optional[str | Path] = None, images: Optional[str | Path] = None, *,
                   root: Optional[str | Path] = None, fmt: Literal["auto", "voc", "yolo"] = "auto",
                   splits: Sequence[str] = ("train", "val"), classes: Sequence[str] = (),
                   keep_difficult: bool = False) -> int:  # fmt: skip
    """``retina data check --ann A.json --images DIR`` or ``retina data check --root DIR
    [--format voc|yolo]``: print the report; the exit status.

    1 when errors were found, 0 for warnings only or none; 2 (with one line on stderr) when the
    json, the folder or the image folder cannot be read at all.
    """
    try:
        if root is not None:
            report = check_folder(root, fmt, splits, classes, keep_difficult,
                                  progress=sys.stderr.isatty())  # fmt: skip
        else:
            report = check_dataset(ann, images, progress=sys.stderr.isatty())
    except RetinaError as e:  # only errors meant for users; a bug keeps its traceback
        print(f"retina: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_report(report))
    return report.exit_status
