"""The bundled synthetic dataset: coloured squares, circles and triangles in COCO format.

A tiny detector can learn it on a CPU in minutes, so the whole pipeline (data -> train -> eval)
runs anywhere. Layout written by ``generate_shapes(out_dir, ...)``::

    out_dir/train/000000.png ...            image_size x image_size RGB
    out_dir/val/000000.png ...
    out_dir/annotations/instances_train.json
    out_dir/annotations/instances_val.json
    out_dir/meta.json                        written last: its presence marks a complete set

Every image is drawn from its own RNG seeded by (seed, split, index), so image k of a split is the
same whatever ``num_train`` / ``num_val`` are. Boxes are the tight box of each object's visible
pixels (exact, from the mask), COCO ``[x, y, w, h]`` in pixel-edge coordinates. Images are PNG,
not JPEG: lossless, so no compression ringing blurs the edges those exact boxes are measured on.

Each image: a smooth textured background, 0-4 objects (about 5% of images are empty), sides
log-uniform from 10 to min(120, 0.8 x image_size) px, overlaps allowed up to box IoU 0.2.

Absent classes (``data.shapes.extra_classes``, E): the imbalance knob of the Table 1 study. The
class list grows to K = 3 + E with categories ``absent 4`` .. ``absent K`` that no object is ever
of, so every anchor gets E more pure easy negatives (as COCO's 80 classes give every anchor 79),
while the images, boxes, anchors and positives, hence what the detector must recognise, stay
the same. They are added to the COCO dict when the set is read (``with_absent_classes``): one set
on disk serves every E. The evaluation is unchanged by them: COCOeval averages over the classes
that have ground truth, skipping those without (their precision stays -1), detections predicted
for them included. What they can change is the detector's own output: its per-image top-k
(``model.inference.detections_per_img``) spans all K classes, so absent-class detections scored
above real ones take places in it, a cost of the imbalance the loss must train away.

Shape legend: M objects of one image.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retina.errors import InputError
from retina.io import atomic_write
from retina.log import stamped

CLASS_NAMES = ("square", "circle", "triangle")  # category ids 1, 2, 3
ABSENT_NAME = "absent {}"  # the name of absent category id k > 3
VERSION = 2  # bump when the drawing changes, so an old set on disk is refused, not reused
SPLITS: dict[str, int] = {"train": 0, "val": 1}  # split code mixed into each image's seed

MAX_OBJECTS = 4
EMPTY_FRACTION = 0.05  # images with no object: all-negative examples, as COCO has
SIDE_PX = (10.0, 120.0)  # object side in pixels, log-uniform (more small objects, as in COCO) ...
MAX_SIDE_FRACTION = 0.8  # ... and at most this fraction of the image
MAX_IOU = 0.2  # a placement overlapping an earlier box more than this is retried
MAX_OCCLUSION = 0.25  # nor may it hide more than this fraction of an earlier object's pixels
PLACEMENT_TRIES = 10
MIN_CONTRAST = 80  # per-channel mean |object - background| colour difference
NOISE = 4  # per-pixel noise in [-NOISE, NOISE], added to the whole image
TEXTURE = 20  # smooth background texture: colour blobs of amplitude <= TEXTURE per channel
TEXTURE_GRID = 5  # the texture is bilinearly upsampled from a TEXTURE_GRID^2 random grid


# --------------------------------------------------------------------------------- drawing
def _shape_mask(kind: int, x0: int, y0: int, side: int, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one filled shape in the square [x0, x0+side) x [y0, y0+side).

    Pixel (row y, column x) is tested at its centre (x + 0.5, y + 0.5).
    """
    ys = np.arange(size, dtype=np.float32)[:, None] + 0.5 - y0  # (size, 1), relative to the square
    xs = np.arange(size, dtype=np.float32)[None, :] + 0.5 - x0  # (1, size)
    s = float(side)
    if kind == 0:  # square
        return (xs >= 0) & (xs < s) & (ys >= 0) & (ys < s)
    if kind == 1:  # circle inscribed in the square
        r = s / 2
        return (xs - r) ** 2 + (ys - r) ** 2 <= r * r
    # Triangle pointing up: apex (s/2, 0), base from (0, s) to (s, s). Inside when below both
    # edges: |x - s/2| <= y / 2.
    return (ys < s) & (np.abs(xs - s / 2) <= ys / 2)


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one XYXY box with (M, 4) boxes -> (M,)."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / (area + areas - inter)


def side_range(size: int) -> tuple[float, float]:
    """(min, max) object side in pixels for an image of ``size`` pixels."""
    high = min(SIDE_PX[1], MAX_SIDE_FRACTION * size)
    return min(SIDE_PX[0], high), high


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) smooth colour variation in [-TEXTURE, TEXTURE]: a coarse random grid
    upsampled bilinearly (separable: rows and columns by the same interpolation matrix)."""
    grid = rng.uniform(-TEXTURE, TEXTURE, size=(TEXTURE_GRID, TEXTURE_GRID, 3))
    t = np.linspace(0, TEXTURE_GRID - 1, size)  # pixel -> grid coordinate
    weights = np.maximum(0, 1 - np.abs(t[:, None] - np.arange(TEXTURE_GRID)[None, :]))  # (size, G)
    return np.einsum("yi,ijc,xj->yxc", weights, grid, weights)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    for _ in range(20):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - background).mean() >= MIN_CONTRAST:
            return colour
    # Fallback: each channel at the far end from the background (difference >= 128 per channel).
    return np.where(background > 127, 0, 255)


def draw_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image from ``rng``.

    Returns:
        (size, size, 3) uint8 image and M objects ``{"category_id", "bbox": [x, y, w, h],
        "area"}`` (area: visible pixel count), M in 0..4 (0 in about EMPTY_FRACTION of images);
        a placement that fails all its tries is dropped, so an image can (rarely) hold fewer
        objects than drawn. Objects may overlap (box IoU <= MAX_IOU).
    """
    background = rng.integers(0, 256, size=3)
    owner = np.full((size, size), -1, dtype=np.int64)  # index of the object that owns a pixel
    kinds: list[int] = []
    colours: list[np.ndarray] = []
    full_pixels: list[int] = []  # pixels of each object's own mask
    boxes = np.zeros((0, 4))  # (M, 4) placement squares, XYXY
    num_objects = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, MAX_OBJECTS + 1))
    low, high = side_range(size)
    for _ in range(num_objects):
        kind = int(rng.integers(0, len(CLASS_NAMES)))
        colour = _contrasting_colour(rng, background)
        for _ in range(PLACEMENT_TRIES):
            side = max(2, round(float(np.exp(rng.uniform(np.log(low), np.log(high))))))
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = np.array([x0, y0, x0 + side, y0 + side], dtype=np.float64)
            if len(boxes) and _box_iou(box, boxes).max() > MAX_IOU:
                continue
            mask = _shape_mask(kind, x0, y0, side, size)
            if kinds:
                # Every earlier object must keep (1 - MAX_OCCLUSION) of its own pixels visible.
                visible = np.bincount(owner[(owner >= 0) & ~mask], minlength=len(kinds))
                if (visible < (1 - MAX_OCCLUSION) * np.asarray(full_pixels)).any():
                    continue
            owner[mask] = len(kinds)
            kinds.append(kind)
            colours.append(colour)
            full_pixels.append(int(mask.sum()))
            boxes = np.concatenate([boxes, box[None]])
            break

    palette = np.stack([*colours, background])  # (M + 1, 3); owner -1 picks the background
    noise = rng.integers(-NOISE, NOISE + 1, size=(size, size, 3))
    texture = np.where((owner < 0)[..., None], _texture(rng, size), 0)  # background only
    image = np.clip(palette[owner] + texture + noise, 0, 255).astype(np.uint8)  # (size, size, 3)
    objects = []
    for k, kind in enumerate(kinds):
        visible = owner == k
        cols = np.flatnonzero(visible.any(axis=0))
        rows = np.flatnonzero(visible.any(axis=1))
        x, y = int(cols[0]), int(rows[0])
        w, h = int(cols[-1]) + 1 - x, int(rows[-1]) + 1 - y  # pixel edges: tight and exact
        objects.append({"category_id": kind + 1, "bbox": [x, y, w, h],
                        "area": float(visible.sum())})  # fmt: skip
    return image, objects


# ------------------------------------------------------------------------------- categories
def class_names(extra_classes: int) -> list[str]:
    """The K = 3 + ``extra_classes`` class names, in category id order (ids 1..K): the three
    shapes, then the absent classes ``absent 4`` .. ``absent K``."""
    if extra_classes < 0:
        raise InputError(f"data.shapes.extra_classes={extra_classes}: must be >= 0")
    absent = range(len(CLASS_NAMES) + 1, len(CLASS_NAMES) + extra_classes + 1)
    return [*CLASS_NAMES, *(ABSENT_NAME.format(k) for k in absent)]


def categories(extra_classes: int) -> list[dict[str, Any]]:
    """COCO ``categories`` of the set with ``extra_classes`` absent classes (ids 1..K)."""
    return [{"id": i + 1, "name": n} for i, n in enumerate(class_names(extra_classes))]


def with_absent_classes(coco: dict, extra_classes: int) -> dict:
    """A shapes split's COCO dict with its categories replaced by ``categories(extra_classes)``;
    images and annotations are shared, not copied.

    Raises:
        InputError: the dict's categories are not the three shapes (not a shapes split).
    """
    if coco.get("categories") != categories(0):
        raise InputError(f"data.shapes.extra_classes={extra_classes}: the annotations' categories are "
                         f"{coco.get('categories')!r}, not the shapes set's {categories(0)!r}")
    return {**coco, "categories": categories(extra_classes)}


# --------------------------------------------------------------------------------- writing
def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Level 1: most of the size gain of zlib at a fraction of the time (the noise barely packs).
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def _generate_split(out_dir: Path, split: str, num_images: int, size: int, seed: int) -> dict:
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, objects = draw_image(_image_rng(seed, split, index), size)
        file_name = f"{index:06d}.png"
        # fsync=False: whole-or-nothing if killed; a cache regenerated at will, written by the thousand
        atomic_write(image_dir / file_name, _png_bytes(image), fsync=False)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj,
                                "iscrowd": 0})  # fmt: skip
    return {"images": images, "annotations": annotations, "categories": categories(0)}


def _meta(num_train: int, num_val: int, image_size: int, seed: int) -> dict[str, int]:
    return {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed,
            "version": VERSION}  # fmt: skip


def generate_shapes(out_dir: str | Path, num_train: int, num_val: int, image_size: int,
                    seed: int) -> Path:  # fmt: skip
    """Write the shapes dataset to ``out_dir`` (see the module docstring); returns ``out_dir``.

    ``meta.json`` is removed first and written last, so an interrupted run never looks complete.
    """
    if image_size < 16:
        raise InputError(f"image_size={image_size} is too small for the shapes dataset (>= 16)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "meta.json"
    meta_path.unlink(missing_ok=True)
    (out_dir / "annotations").mkdir(exist_ok=True)
    for split, num_images in (("train", num_train), ("val", num_val)):
        coco = _generate_split(out_dir, split, num_images, image_size, seed)
        atomic_write(out_dir / "annotations" / f"instances_{split}.json", json.dumps(coco).encode(),
                     fsync=False)
    meta = _meta(num_train, num_val, image_size, seed)
    atomic_write(meta_path, json.dumps(meta, indent=2).encode(), fsync=False)
    return out_dir


def ensure_shapes(root: str | Path, num_train: int, num_val: int, image_size: int,
                  seed: int) -> Path:  # fmt: skip
    """Return ``root`` holding the shapes set with these parameters, generating it if missing.

    Raises:
        InputError: ``root`` holds a complete set made with other parameters (one line, naming
            the root and the first mismatching key); it is never overwritten silently.
    """
    root = Path(root)
    meta_path = root / "meta.json"
    wanted = _meta(num_train, num_val, image_size, seed)
    if meta_path.is_file():
        try:
            found = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            found = {}
        for key, value in wanted.items():
            if found.get(key) != value:
                origin = "this retina draws" if key == "version" else f"data.shapes.{key} asks"
                raise InputError(
                    f"{root}: the shapes dataset there has {key}={found.get(key)!r} but {origin} "
                    f"for {key}={value!r}; delete {root} to regenerate it, or set data.root to "
                    "another directory"
                )
        return root
    print(stamped(f"generating shapes dataset in {root}: {num_train} train + {num_val} val images "
                  f"of {image_size}x{image_size}"), file=sys.stderr)  # fmt: skip
    return generate_shapes(root, num_train, num_val, image_size, seed)
