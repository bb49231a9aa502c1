"""The record checks of ``retina data check``: the images, annotations (with their boxes) and
categories of one COCO dict, as the json writes them. Each problem found is handed to ``add(kind,
example)``: ``kind`` one of ``retina.data.check.KINDS``, ``example`` one line naming the record."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Iterable, Optional

from retina.data.coco import is_number

Add = Callable[[str, str], None]  # add(kind, example): one problem found

# A box may pass the border by this much (px) before it is "partly outside": normalised YOLO
# labels written with 6 decimals put a box touching the edge of a 4000 px image up to 4e-3 px past it.
EDGE_TOL = 0.01


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_id(v: Any) -> bool:
    return _is_int(v) or isinstance(v, str)


def has_size(img: dict) -> bool:
    """Whether the record gives a positive integer height and width."""
    return all(_is_int(img.get(k)) and img[k] > 0 for k in ("height", "width"))


def _duplicates(ids: Iterable[Any], kind: str, what: str, add: Add) -> None:
    for value, n in Counter(ids).items():
        if n > 1:
            add(kind, f"{what} id {value!r}: {n} records")


def check_image_records(images: list, add: Add) -> dict[Any, dict]:
    """Image records by id (the first of duplicates); reports malformed ones."""
    by_id: dict[Any, dict] = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            add("bad_record", f"images[{i}]: not an object")
            continue
        problems = [] if _is_id(img.get("id")) else ["id"]
        problems += [] if isinstance(img.get("file_name"), str) else ["file_name"]
        problems += [k for k in ("height", "width") if not (_is_int(img.get(k)) and img[k] > 0)]
        if problems:
            add("bad_record", f"images[{i}] (id {img.get('id')!r}): missing or invalid "
                              f"{', '.join(problems)}")  # fmt: skip
        if _is_id(img.get("id")):
            by_id.setdefault(img["id"], img)
    _duplicates((img["id"] for img in images if isinstance(img, dict) and _is_id(img.get("id"))),
                "duplicate_image_id", "image", add)  # fmt: skip
    return by_id


def _check_box(ann: dict, img: Optional[dict], add: Add, origin: Optional[str] = None) -> None:
    x, y, w, h = ann["bbox"]
    name = origin or f"annotation {ann['id']!r} (image {ann['image_id']!r})"
    where = f"{name}: bbox {ann['bbox']}"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        add("nonfinite_box", where)
        return
    if w <= 0 or h <= 0:
        add("degenerate_box", where)
        return
    if w < 1 or h < 1:
        add("tiny_box", where)
    if img is None or not has_size(img):
        return
    width, height = img["width"], img["height"]
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        add("box_outside", f"{where}, image {width}x{height} (WxH)")
    elif min(x, y) < -EDGE_TOL or x + w > width + EDGE_TOL or y + h > height + EDGE_TOL:
        add("box_partly_outside", f"{where}, image {width}x{height} (WxH)")


def check_annotations(anns: list, images: dict, cat_ids: set, add: Add,
                      origins: Optional[dict] = None) -> set:  # fmt: skip
    """Reports annotation problems; returns the image ids that have at least one annotation.
    ``origins`` (annotation id -> where it is written) names the boxes of a VOC / YOLO folder."""
    annotated = set()
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            add("bad_record", f"annotations[{i}]: not an object")
            continue
        bbox = ann.get("bbox")
        problems = [k for k in ("id", "image_id", "category_id") if not _is_id(ann.get(k))]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(is_number, bbox))):
            problems.append("bbox (4 numbers)")
        if problems:
            add("bad_record", f"annotations[{i}] (id {ann.get('id')!r}): missing or invalid "
                              f"{', '.join(problems)}")  # fmt: skip
            continue
        img = images.get(ann["image_id"])
        if img is None:
            add("unknown_image_id", f"annotation {ann['id']!r}: image_id {ann['image_id']!r}")
        else:
            annotated.add(ann["image_id"])
        if ann["category_id"] not in cat_ids:
            add("unknown_category", f"annotation {ann['id']!r} (image {ann['image_id']!r}): "
                                    f"category_id {ann['category_id']!r}")  # fmt: skip
        _check_box(ann, img, add, (origins or {}).get(ann["id"]))
    _duplicates((a["id"] for a in anns if isinstance(a, dict) and _is_id(a.get("id"))),
                "duplicate_annotation_id", "annotation", add)  # fmt: skip
    return annotated


def check_categories(cats: list, add: Add) -> list:
    """The valid category ids of ``cats``; ids missing, invalid or repeated and names missing
    or repeated handed to ``add``."""
    for i, cat in enumerate(cats):
        if not (isinstance(cat, dict) and _is_id(cat.get("id"))):
            add("bad_record", f"categories[{i}]: missing or invalid id")
    cat_ids = [c["id"] for c in cats if isinstance(c, dict) and _is_id(c.get("id"))]
    _duplicates(cat_ids, "duplicate_category_id", "category", add)
    names = Counter(c.get("name") for c in cats if isinstance(c, dict) and isinstance(c.get("name"), str))
    for i, cat in enumerate(cats):
        if isinstance(cat, dict) and not (isinstance(cat.get("name"), str) and cat["name"].strip()):
            add("category_name", f"categories[{i}] (id {cat.get('id')!r}): no name; "
                                 f"the class is shown as its id")
    for name, n in names.items():
        if n > 1:
            add("category_name", f"{n} categories are named {name!r}: their classes cannot be "
                                 f"told apart in results")
    return cat_ids
