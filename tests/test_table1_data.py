"""The dense benchmark's generator (retina/data/dense.py): masks by hand, class names, exact and
deterministic annotations, COCO layout, refusal of a set made with other settings, loading it
through ``data.dataset: dense``, and its COCO-like statistics."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from retina.config import config_from_dict
from retina.data import build_dataset, ensure_dense, generate_dense
from retina.data import dense
from retina.errors import InputError


# ------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("kind, width, height, expected", [
    # 4 x 4: centred pixel coordinates u, v in {-.375, -.125, .125, .375}; |u| + |v| <= .5
    ("diamond", 4, 4, [[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]]),
    # 3 x 3: u, v in {-1/3, 0, 1/3}; an arm holds |u| <= 1/6 or |v| <= 1/6: the middle row/column
    ("cross", 3, 3, [[0, 1, 0], [1, 1, 1], [0, 1, 0]]),
    # 4 wide, 2 high: v in {-.25, .25}, half-width (v + .5) / 2 = .125, .375
    ("triangle", 4, 2, [[0, 1, 1, 0], [1, 1, 1, 1]]),
    # 5 x 5: u, v in {-.4, -.2, 0, .2, .4}; .09 <= u^2 + v^2 <= .25 (e.g. (.4, .2): .20 in,
    # (.2, .2): .08 out, (.4, .4): .32 out)
    ("ring", 5, 5, [[0, 1, 1, 1, 0], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [0, 1, 1, 1, 0]]),
    # 4 x 4 frame: |u| or |v| >= .375: the border
    ("frame", 4, 4, [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]),
    # 4 x 2 bowtie: |v| <= |u| with v = +-.25: the outer columns (|u| = .375) only
    ("bowtie", 4, 2, [[1, 0, 0, 1], [1, 0, 0, 1]]),
    ("box", 2, 3, [[1, 1], [1, 1], [1, 1]]),
])
def test_shape_masks_by_hand(kind, width, height, expected):
    mask = dense.shape_mask(kind, width, height)
    assert mask.shape == (height, width) and mask.astype(int).tolist() == expected


def test_class_names_colour_major_up_to_80():
    names = dense.class_names(80)
    assert len(names) == 80 == dense.MAX_CLASSES == len(set(names))
    # 8 shapes per colour: class 8 is the second colour's first shape
    assert (names[0], names[7], names[8], names[79]) == ("red box", "red bowtie", "orange box", "black bowtie")
    assert dense.class_names(3) == ["red box", "red ellipse", "red triangle"]
    for bad in (0, 81):
        with pytest.raises(InputError, match=f"data.dense.num_classes={bad}: the dense set has 1..80"):
            dense.class_names(bad)


def test_colours_stay_apart_beyond_jitter_and_noise():
    # Two classes' colours differ by >= 60 in some channel; jitter (+-12 each) and noise (+-5
    # each) move them at most 2 x (12 + 5) = 34 closer.
    palette = np.array(list(dense.COLOURS.values()))
    gap = min(np.abs(a - b).max() for a, b in itertools.combinations(palette, 2))
    assert gap >= 60 > 2 * (dense.COLOUR_JITTER + dense.NOISE)


# ----------------------------------------------------------------------------------- images
def test_draw_image_is_deterministic_with_tight_boxes():
    image, objects = dense.draw_image(np.random.default_rng([0, 0, 3]), 128, 80)
    again, objects2 = dense.draw_image(np.random.default_rng([0, 0, 3]), 128, 80)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert np.array_equal(image, again) and objects == objects2
    for obj in objects:
        x, y, w, h = obj["bbox"]
        assert 1 <= obj["category_id"] <= 80
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w >= 1 and h >= 1
        assert 0 < obj["area"] <= w * h  # visible pixels inside the tight box


def test_statistics_are_coco_like():
    """100 images of 256 px: empty and crowded images, ~7 objects per image, many small ones."""
    counts, sides = [], []
    for i in range(100):
        _, objects = dense.draw_image(np.random.default_rng([0, 0, i]), 256, 80)
        counts.append(len(objects))
        sides += [np.sqrt(o["bbox"][2] * o["bbox"][3]) for o in objects]
    counts, sides = np.array(counts), np.array(sides)
    assert (counts == 0).any() and (counts >= 15).any()  # empty and crowded images
    assert 5 <= counts.mean() <= 9  # COCO: 7.3 boxes per image
    assert sides.min() >= dense.MIN_SIDE_PX / np.sqrt(2) - 1  # the 8 px side, aspect up to 2
    # COCO: 41% of sides under 5.8% of the image (small), 76% under 17.3%; the 8 px floor (3.1%
    # of 256) removes some of the smallest, so at least 20% small and 65% up to medium here.
    assert (sides < 0.058 * 256).mean() >= 0.2 and (sides < 0.173 * 256).mean() >= 0.65


# ---------------------------------------------------------------------------------- dataset
def test_generate_layout_and_independence_of_split_sizes(tmp_path):
    root = generate_dense(tmp_path / "a", num_train=4, num_val=2, image_size=64, num_classes=10, seed=0)
    ann = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in ann["categories"]] == dense.class_names(10)
    assert [c["id"] for c in ann["categories"]] == list(range(1, 11))
    assert [im["file_name"] for im in ann["images"]] == [f"00000{i}.png" for i in range(4)]
    assert all(1 <= a["category_id"] <= 10 and a["iscrowd"] == 0 for a in ann["annotations"])
    assert [a["id"] for a in ann["annotations"]] == list(range(1, len(ann["annotations"]) + 1))
    assert json.loads((root / "meta.json").read_text()) == {
        "num_train": 4, "num_val": 2, "image_size": 64, "num_classes": 10, "seed": 0, "version": dense.VERSION}
    # Image k is the same whatever the split sizes: a set of 2 train images holds the first 2.
    small = generate_dense(tmp_path / "b", num_train=2, num_val=1, image_size=64, num_classes=10, seed=0)
    for name in ("000000.png", "000001.png"):
        assert (small / "train" / name).read_bytes() == (root / "train" / name).read_bytes()
    small_ann = json.loads((small / "annotations" / "instances_train.json").read_text())
    assert [a["bbox"] for a in small_ann["annotations"]] == [
        a["bbox"] for a in ann["annotations"] if a["image_id"] <= 2]
    # The val split draws from other seeds than train.
    assert (root / "val" / "000000.png").read_bytes() != (root / "train" / "000000.png").read_bytes()


def test_ensure_reuses_and_refuses_other_settings(tmp_path):
    root = ensure_dense(tmp_path, 2, 1, 64, 5, 0)
    stamp = (root / "train" / "000000.png").stat().st_mtime_ns
    assert ensure_dense(tmp_path, 2, 1, 64, 5, 0) == root  # complete: reused as it is
    assert (root / "train" / "000000.png").stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="num_classes=5 but data.dense.num_classes asks for num_classes=6"):
        ensure_dense(tmp_path, 2, 1, 64, 6, 0)
    with pytest.raises(InputError, match="image_size=16 is too small"):
        generate_dense(tmp_path / "c", 1, 1, 16, 5, 0)


def test_build_dataset_generates_and_loads_dense(tmp_path):
    cfg = config_from_dict({}, ["data.dataset=dense", f"data.root={tmp_path / 'dense'}", "data.dense.num_train=3",
                                "data.dense.num_val=2", "data.dense.image_size=64", "data.dense.num_classes=12"])
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val), train.num_classes, val.num_classes) == (3, 2, 12, 12)
    assert train.class_names == dense.class_names(12)
    image, target = val[0]
    assert tuple(image.shape) == (3, 64, 64) and target["boxes"].shape[1] == 4
    assert (target["labels"] < 12).all()


def test_cli_data_dense_generates_the_configs_set_once_and_refuses_another(tmp_path, capsys):
    from retina.cli import main

    tiny = ["data.dense.num_train=3", "data.dense.num_val=2", "data.dense.image_size=64", "data.dense.num_classes=12"]
    root = tmp_path / "dense"
    assert main(["data", "dense", "--out", str(root), "--set", *tiny]) == 0
    assert f"dense dataset ready in {root}" in capsys.readouterr().out
    meta = json.loads((root / "meta.json").read_text())
    assert (meta["num_train"], meta["num_val"], meta["image_size"], meta["num_classes"]) == (3, 2, 64, 12)
    assert len(json.loads((root / "annotations" / "instances_val.json").read_text())["images"]) == 2
    # the same request again is a no-op; another one is a one-line error naming the folder and key
    assert main(["data", "dense", "--out", str(root), "--set", *tiny]) == 0
    assert main(["data", "dense", "--out", str(root), "--set", *tiny[:3], "data.dense.num_classes=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(root) in err and "num_classes=12" in err
