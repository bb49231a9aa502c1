"""The dense benchmark: many classes of small objects on larger images, generated in COCO format.

Built to carry COCO's *imbalance* on a CPU, not its look (the shapes set has 3 classes and ~3k
anchors per image: its negatives carry ~60% of the initial CE, COCO's over 97%). What it matches:

- many classes: K = up to 80 (8 shapes x 10 colours, colour-major: the first K are taken);
- COCO's relative object sizes: the side sqrt(w h) / image side is log-normal with COCO's area
  quantiles (41% small, 34% medium, 24% large at 640 px: sides below 5.8% and 17.3% of the
  image), drawn between ``MIN_SIDE_PX`` and ``MAX_SIDE_FRACTION`` of the image; aspect ratios
  h / w from 1/2 to 2;
- COCO's crowding: about 7 objects per image on average, 5% of images empty, 10% crowded (15-40
  objects, mostly small), the rest 1 + Poisson(4.5); overlaps up to box IoU ``MAX_IOU``.

Layout and guarantees as ``shapes.py`` (written by ``generate_dense(out_dir, ...)``)::

    out_dir/train/000000.png ...  out_dir/val/000000.png ...   image_size x image_size RGB, PNG
    out_dir/annotations/instances_{train,val}.json              COCO, category ids 1..K
    out_dir/meta.json                                           written last: a complete set

Image k of a split is drawn from its own RNG seeded by (seed, split, k): the same whatever the
split sizes; boxes are the tight box of each object's visible pixels (exact, from the masks).

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
from retina.io import atomic_write, write_json
from retina.log import stamped

SHAPES = ("box", "ellipse", "triangle", "diamond", "cross", "ring", "frame", "bowtie")
COLOURS: dict[str, tuple[int, int, int]] = {  # saturated, >= 60 apart per class pair (max channel)
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 230, 40),
    "green": (40, 180, 50), "cyan": (40, 210, 220), "blue": (40, 60, 220),
    "purple": (120, 40, 180), "magenta": (230, 50, 200), "white": (245, 245, 245),
    "black": (15, 15, 15),
}
MAX_CLASSES = len(SHAPES) * len(COLOURS)  # 80, as COCO
VERSION = 1  # bump when the drawing changes, so an old set on disk is refused, not reused
SPLITS: dict[str, int] = {"train": 0, "val": 1}  # split code mixed into each image's seed

EMPTY_FRACTION = 0.05  # images without objects (pure negatives)
CROWDED_FRACTION = 0.10  # crowded images ...
CROWDED_OBJECTS = (15, 40)  # ... with this many objects drawn (uniform); placements may fail
POISSON_EXTRA = 4.5  # other images: 1 + Poisson(4.5); ~7 placed per image on average (COCO: 7.3)
# log(side / image side) ~ N(mu, sigma), solved from COCO's quantiles P(side < 0.058) = 0.41 and
# P(side < 0.173) = 0.76: z = -0.228 and 0.706, so sigma = (log 0.173 - log 0.058) / 0.934 = 1.17
# and mu = log 0.058 + 0.228 sigma = -2.58 (a median side of 7.6% of the image).
LOG_SIDE_MU, LOG_SIDE_SIGMA = -2.58, 1.17
MIN_SIDE_PX = 8.0  # smaller draws are redrawn: below this a shape is a few noisy pixels
MAX_SIDE_FRACTION = 0.8
MAX_ASPECT = 2.0  # h / w log-uniform in [1/2, 2] (the anchors' ratios)
MAX_IOU = 0.3  # a placement overlapping an earlier box more than this is retried ...
MAX_OCCLUSION = 0.3  # ... as is one hiding more than this fraction of an earlier object
PLACEMENT_TRIES = 10
COLOUR_JITTER = 12  # per-object, per-channel colour offset: classes stay apart (>= 60)
NOISE = 5  # per-pixel noise in [-NOISE, NOISE]
TEXTURE = 18  # smooth background texture amplitude, upsampled from a TEXTURE_GRID^2 grid
TEXTURE_GRID = 6


def class_names(num_classes: int) -> list[str]:
    """The first ``num_classes`` of colour x shape, colour-major: "red box", "red ellipse", ..."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise InputError(f"data.dense.num_classes={num_classes}: the dense set has 1..{MAX_CLASSES} classes")
    return [f"{c} {s}" for c in COLOURS for s in SHAPES][:num_classes]


# --------------------------------------------------------------------------------- drawing
def shape_mask(kind: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of one filled shape in its box, tested at pixel centres in
    box coordinates u, v in (0, 1)."""
    u = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width - 0.5  # (1, w), centred
    v = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height - 0.5  # (h, 1)
    r2 = u * u + v * v
    if kind == "box":
        return np.ones((height, width), dtype=bool)
    if kind == "ellipse":
        return r2 <= 0.25
    if kind == "triangle":  # apex up: |u| <= (v + 1/2) / 2
        return np.abs(u) <= (v + 0.5) / 2
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= 0.5
    if kind == "cross":  # a plus of arms 1/3 wide
        return (np.abs(u) <= 1 / 6) | (np.abs(v) <= 1 / 6)
    if kind == "ring":  # ellipse annulus, inner radius 0.6 of the outer
        return (r2 <= 0.25) & (r2 >= 0.09)
    if kind == "frame":  # box outline, a quarter of each half-side thick
        return (np.abs(u) >= 0.375) | (np.abs(v) >= 0.375)
    if kind == "bowtie":  # two triangles meeting at the centre, points inward
        return np.abs(v) <= np.abs(u)
    raise ValueError(f"unknown shape {kind!r}")


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one XYXY box with (M, 4) boxes -> (M,)."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    return inter / (area + np.prod(boxes[:, 2:] - boxes[:, :2], axis=1) - inter)


def _num_objects(rng: np.random.Generator) -> int:
    draw = rng.random()
    if draw < EMPTY_FRACTION:
        return 0
    if draw < EMPTY_FRACTION + CROWDED_FRACTION:
        return int(rng.integers(CROWDED_OBJECTS[0], CROWDED_OBJECTS[1] + 1))
    return 1 + int(rng.poisson(POISSON_EXTRA))


def _box_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(width, height) of one object: COCO-like side (log-normal, redrawn outside the range)."""
    low, high = MIN_SIDE_PX, MAX_SIDE_FRACTION * size
    side = high
    for _ in range(100):
        side = size * float(np.exp(rng.normal(LOG_SIDE_MU, LOG_SIDE_SIGMA)))
        if low <= side <= high:
            break
    aspect = float(np.exp(rng.uniform(-np.log(MAX_ASPECT), np.log(MAX_ASPECT))))  # h / w
    width, height = side / np.sqrt(aspect), side * np.sqrt(aspect)
    return (max(2, min(size, round(width))), max(2, min(size, round(height))))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float: a greyish tint plus a smooth texture (bilinear from a coarse grid)."""
    base = rng.uniform(70, 185) + rng.uniform(-15, 15, size=3)  # low saturation: colours stand out
    grid = rng.uniform(-TEXTURE, TEXTURE, size=(TEXTURE_GRID, TEXTURE_GRID, 3))
    t = np.linspace(0, TEXTURE_GRID - 1, size)
    weights = np.maximum(0, 1 - np.abs(t[:, None] - np.arange(TEXTURE_GRID)[None, :]))  # (size, G)
    return base + np.einsum("yi,ijc,xj->yxc", weights, grid, weights, optimize=True)


def draw_image(rng: np.random.Generator, size: int, num_classes: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image from ``rng``: (size, size, 3) uint8 and its M objects ``{"category_id"
    (1..K), "bbox": [x, y, w, h], "area"}`` (area: visible pixels). A placement that fails all
    its tries is dropped, so a crowded image holds fewer objects than drawn."""
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    image = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int64)  # the object that owns each pixel
    labels: list[int] = []
    visible: list[int] = []  # pixels each object still shows
    full: list[int] = []  # pixels of each object's own mask
    boxes = np.zeros((0, 4))  # (M, 4) XYXY placement boxes
    for _ in range(_num_objects(rng)):
        label = int(rng.integers(0, num_classes))
        colour = palette[label // len(SHAPES)] + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        for _ in range(PLACEMENT_TRIES):
            w, h = _box_size(rng, size)
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = np.array([x0, y0, x0 + w, y0 + h], dtype=np.float64)
            if len(boxes) and _box_iou(box, boxes).max() > MAX_IOU:
                continue
            mask = shape_mask(SHAPES[label % len(SHAPES)], w, h)  # (h, w)
            region = owner[y0:y0 + h, x0:x0 + w]  # a view
            covered = np.bincount(region[mask & (region >= 0)], minlength=len(labels))
            if len(labels) and (np.asarray(visible) - covered < (1 - MAX_OCCLUSION) * np.asarray(full)).any():
                continue
            visible = [v - int(c) for v, c in zip(visible, covered)] + [int(mask.sum())]
            full.append(int(mask.sum()))
            region[mask] = len(labels)
            image[y0:y0 + h, x0:x0 + w][mask] = colour
            labels.append(label)
            boxes = np.concatenate([boxes, box[None]])
            break
    noise = rng.integers(-NOISE, NOISE + 1, size=(size, size, 3))
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    objects = []
    for k, label in enumerate(labels):
        x0, y0, x1, y1 = (int(c) for c in boxes[k])
        mine = owner[y0:y1, x0:x1] == k
        cols, rows = np.flatnonzero(mine.any(axis=0)), np.flatnonzero(mine.any(axis=1))
        x, y = x0 + int(cols[0]), y0 + int(rows[0])
        w, h = x0 + int(cols[-1]) + 1 - x, y0 + int(rows[-1]) + 1 - y  # pixel edges: tight, exact
        objects.append({"category_id": label + 1, "bbox": [x, y, w, h], "area": float(mine.sum())})
    return image, objects


# --------------------------------------------------------------------------------- writing
def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # lossless: exact edges
    return buf.getvalue()


def _generate_split(out_dir: Path, split: str, num_images: int, size: int, num_classes: int,
                    seed: int) -> dict:
    images, annotations = [], []
    for index in range(num_images):
        image, objects = draw_image(np.random.default_rng([seed, SPLITS[split], index]), size, num_classes)
        file_name = f"{index:06d}.png"
        atomic_write(out_dir / split / file_name, _png_bytes(image), fsync=False)  # regenerable
        images.append({"id": index + 1, "file_name": file_name, "height": size, "width": size})
        annotations += [{"id": len(annotations) + j + 1, "image_id": index + 1, **obj, "iscrowd": 0}
                        for j, obj in enumerate(objects)]
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(class_names(num_classes))]
    return {"images": images, "annotations": annotations, "categories": categories}


def _meta(num_train: int, num_val: int, image_size: int, num_classes: int, seed: int) -> dict[str, int]:
    return {"num_train": num_train, "num_val": num_val, "image_size": image_size,
            "num_classes": num_classes, "seed": seed, "version": VERSION}


def generate_dense(out_dir: str | Path, num_train: int, num_val: int, image_size: int,
                   num_classes: int, seed: int) -> Path:
    """Write the dense set to ``out_dir`` (see the module docstring); returns ``out_dir``.
    ``meta.json`` is removed first and written last, so an interrupted run never looks complete."""
    if image_size < 32:
        raise InputError(f"data.dense.image_size={image_size} is too small for the dense dataset (>= 32)")
    class_names(num_classes)  # range check
    out_dir = Path(out_dir)
    (out_dir / "meta.json").unlink(missing_ok=True)
    for split, num_images in (("train", num_train), ("val", num_val)):
        coco = _generate_split(out_dir, split, num_images, image_size, num_classes, seed)
        write_json(out_dir / "annotations" / f"instances_{split}.json", coco, fsync=False)
    write_json(out_dir / "meta.json", _meta(num_train, num_val, image_size, num_classes, seed), indent=2,
               fsync=False)
    return out_dir


def ensure_dense(root: str | Path, num_train: int, num_val: int, image_size: int, num_classes: int,
                 seed: int) -> Path:
    """Return ``root`` holding the dense set with these parameters, generating it if missing.

    Raises:
        InputError: ``root`` holds a complete set made with other parameters (one line naming the
            root and the first mismatching key); it is never overwritten silently.
    """
    root = Path(root)
    wanted = _meta(num_train, num_val, image_size, num_classes, seed)
    if (root / "meta.json").is_file():
        try:
            found = json.loads((root / "meta.json").read_text())
        except json.JSONDecodeError:
            found = {}
        for key, value in wanted.items():
            if found.get(key) != value:
                origin = "this retina draws" if key == "version" else f"data.dense.{key} asks"
                raise InputError(f"{root}: the dense dataset there has {key}={found.get(key)!r} but "
                                 f"{origin} for {key}={value!r}; delete {root} to regenerate it, or "
                                 "set data.root to another directory")
        return root
    print(stamped(f"generating dense dataset in {root}: {num_train} train + {num_val} val images of "
                  f"{image_size}x{image_size}, {num_classes} classes"), file=sys.stderr)
    return generate_dense(root, num_train, num_val, image_size, num_classes, seed)
