"""Shared fixtures: a hand-made 3-image COCO set, a tiny generated shapes set, and the real
raccoon-voc photos when they are beside the repository (else the tests that need them skip)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retina.data.shapes import generate_shapes

# The hand-made set: three 40 x 60 (H x W) images, categories 3 "cat" and 7 "dog" (non-contiguous,
# listed out of order), image ids listed out of order (9, 2, 5). Expected targets, derived by hand,
# are in tests/test_data.py.
TINY_H, TINY_W = 40, 60
TINY_COCO = {
    "images": [
        {"id": 9, "file_name": "c.png", "height": TINY_H, "width": TINY_W},  # grayscale, no anns
        {"id": 2, "file_name": "a.png", "height": TINY_H, "width": TINY_W},  # RGB, 2 boxes
        {"id": 5, "file_name": "b.png", "height": TINY_H, "width": TINY_W},  # RGBA, crowd + bad
    ],
    "annotations": [
        # image 5: ids 3, 4, 6, 7 are degenerate; 5 is a crowd box covering the image.
        {"id": 3, "image_id": 5, "category_id": 7, "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0},
        {"id": 4, "image_id": 5, "category_id": 3, "bbox": [-10, 0, 5, 5], "area": 25,
         "iscrowd": 0},
        {"id": 5, "image_id": 5, "category_id": 3, "bbox": [0, 0, 60, 40], "area": 2400,
         "iscrowd": 1},
        {"id": 6, "image_id": 5, "category_id": 7, "bbox": [1, 1, float("nan"), 3], "area": 0,
         "iscrowd": 0},
        {"id": 7, "image_id": 5, "category_id": 7, "bbox": [20, 10, float("inf"), 5], "area": 0,
         "iscrowd": 0},
        # image 2: one box inside, one crossing the bottom-right corner.
        {"id": 1, "image_id": 2, "category_id": 3, "bbox": [10.5, 5.25, 20, 10], "area": 200,
         "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 7, "bbox": [50, 30, 20, 20], "area": 400,
         "iscrowd": 0},
    ],
    "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
}


def _write_tiny_images(image_dir: Path) -> None:
    a = np.zeros((TINY_H, TINY_W, 3), dtype=np.uint8)
    a[:] = (10, 20, 30)
    a[0, 0] = (255, 0, 0)  # a marker in the top-left corner, for the flip test
    Image.fromarray(a).save(image_dir / "a.png")
    b = np.zeros((TINY_H, TINY_W, 4), dtype=np.uint8)
    b[:] = (100, 150, 200, 128)
    Image.fromarray(b, mode="RGBA").save(image_dir / "b.png")
    c = np.full((TINY_H, TINY_W), 77, dtype=np.uint8)
    Image.fromarray(c, mode="L").save(image_dir / "c.png")


@pytest.fixture
def tiny_coco(tmp_path: Path) -> tuple[Path, Path]:
    """(annotation file, image folder) of the hand-made set above, in a fresh tmp dir."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    _write_tiny_images(image_dir)
    ann_file = tmp_path / "annotations" / "instances.json"
    ann_file.parent.mkdir()
    ann_file.write_text(json.dumps(TINY_COCO))  # NaN / Infinity: Python's json reads them back
    return ann_file, image_dir


TINY_SHAPES = {"num_train": 16, "num_val": 8, "image_size": 64, "seed": 0}


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a generated shapes set (``TINY_SHAPES``: 16 train / 8 val images of 64 px).

    Shared by the whole session: treat it as read-only.
    """
    root = tmp_path_factory.mktemp("data") / "shapes"
    return generate_shapes(root, **TINY_SHAPES)


@pytest.fixture(scope="session")
def tiny_shapes_overrides(tiny_shapes: Path) -> list[str]:
    """Dotted config overrides selecting ``tiny_shapes``, e.g. for ``config_from_dict({}, ...)``."""
    return ["data.dataset=shapes", f"data.root={tiny_shapes}",
            *(f"data.shapes.{k}={v}" for k, v in TINY_SHAPES.items())]  # fmt: skip


# Real photos, never copied into the repository: read from ../shared/data/raccoon-voc beside it.
RACCOON_VOC = Path(__file__).resolve().parents[2] / "shared" / "data" / "raccoon-voc"
RACCOON_VOC_MISSING = (
    f"needs the raccoon-voc photos in {RACCOON_VOC}: the 200 photos and VOC xml files of the public "
    "GitHub repository datitran/raccoon_dataset (MIT license), laid out as a Pascal VOC folder "
    "(JPEGImages/, Annotations/, ImageSets/Main/train.txt with 160 ids and val.txt with 40)"
)


@pytest.fixture(scope="session")
def raccoon_voc() -> Path:
    """The raccoon-voc folder (200 photos of one class, 178x154 to 2000x1333 px); skips the test
    with ``RACCOON_VOC_MISSING`` when it is not there, as on a fresh clone."""
    if not RACCOON_VOC.is_dir():
        pytest.skip(RACCOON_VOC_MISSING)
    return RACCOON_VOC
