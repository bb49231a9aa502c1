"""Tests for retina.data: COCO loading, transforms, the shapes generator and build_dataset.

The hand-made set (tests/conftest.py, ``tiny_coco``) has three 40 x 60 (H x W) images:
- id 2, a.png (RGB (10, 20, 30), red marker at row 0, column 0): ann 1 cat 3 [10.5, 5.25, 20, 10]
  and ann 2 cat 7 [50, 30, 20, 20] (crosses the bottom-right corner);
- id 5, b.png (RGBA (100, 150, 200, 128)): ann 3 w = 0, ann 4 left of the image, ann 6 NaN,
  ann 7 infinite width (all four dropped), ann 5 a crowd box [0, 0, 60, 40];
- id 9, c.png (grayscale 77): no annotations.
Categories 3 "cat" and 7 "dog" -> labels 0 and 1.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.testing import assert_close

from retina.config import config_from_dict
from retina.data import (
    CocoDetection,
    build_dataset,
    build_transforms,
    collate,
    ensure_shapes,
    generate_shapes,
)
from retina.data import coco as coco_module
from retina.data import shapes as shapes_module
from retina.data.coco import BadImageError
from retina.data.transforms import hflip, resize
from retina.errors import InputError

H, W = 40, 60
BOXES = torch.tensor([[10.5, 5.25, 30.5, 15.25], [50.0, 30.0, 60.0, 40.0]])  # image 2's targets
BOXES_HALVED = torch.tensor([[5.25, 2.625, 15.25, 7.625], [25.0, 15.0, 30.0, 20.0]])  # x 0.5


def _edit_json(ann_file: Path, edit) -> None:
    data = json.loads(ann_file.read_text())
    edit(data)
    ann_file.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- CocoDetection
def test_index_ids_categories(tiny_coco):
    ds = CocoDetection(*tiny_coco)
    assert len(ds) == 3
    assert ds.ids == [2, 5, 9]  # sorted; the empty image 9 is kept
    assert ds.cat_ids == [3, 7]  # sorted, though listed 7, 3
    assert ds.class_names == ["cat", "dog"]
    assert ds.num_classes == 2


def test_xywh_to_xyxy_clipped_and_contiguous_labels(tiny_coco):
    image, target = CocoDetection(*tiny_coco)[0]  # image id 2
    assert image.dtype == torch.uint8 and image.shape == (3, H, W)
    assert image[:, 0, 0].tolist() == [255, 0, 0] and image[:, 1, 1].tolist() == [10, 20, 30]
    expected = torch.tensor([
        [10.5, 5.25, 10.5 + 20, 5.25 + 10],  # x2 = x + w, y2 = y + h
        [50.0, 30.0, 60.0, 40.0],  # [50, 30, 70, 50] clipped to W = 60, H = 40
    ])  # fmt: skip
    assert target["boxes"].dtype == torch.float32
    assert_close(target["boxes"], expected)
    assert target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [0, 1]  # category 3 -> 0, 7 -> 1
    assert target["iscrowd"].tolist() == [False, False]
    assert target["image_id"] == 2 and isinstance(target["image_id"], int)
    assert target["orig_size"] == (H, W)


def test_degenerate_dropped_and_counted_crowd_kept(tiny_coco):
    ds = CocoDetection(*tiny_coco)
    # ann 3: w = 0; ann 4: [-10, 0, -5, 5] -> [0, 0, 0, 5] after clipping; ann 6: NaN;
    # ann 7: infinite width (would clip to a valid [20, 10, 60, 15] if clipped first).
    assert ds.num_degenerate == 4
    image, target = ds[1]  # image id 5
    assert_close(target["boxes"], torch.tensor([[0.0, 0.0, 60.0, 40.0]]))
    assert target["labels"].tolist() == [0]
    assert target["iscrowd"].dtype == torch.bool
    assert target["iscrowd"].tolist() == [True]


def test_empty_image_gives_empty_targets(tiny_coco):
    _, target = CocoDetection(*tiny_coco)[2]  # image id 9
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["iscrowd"].shape == (0,) and target["iscrowd"].dtype == torch.bool
    assert target["image_id"] == 9


def test_file_without_annotations(tiny_coco):
    ann_file, image_dir = tiny_coco
    _edit_json(ann_file, lambda d: d.pop("annotations"))
    ds = CocoDetection(ann_file, image_dir)
    assert len(ds) == 3 and ds.num_degenerate == 0
    _, target = ds[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_grayscale_and_rgba_become_rgb(tiny_coco):
    ds = CocoDetection(*tiny_coco)
    rgba, _ = ds[1]
    gray, _ = ds[2]
    assert rgba.shape == (3, H, W) and gray.shape == (3, H, W)
    assert rgba[:, 7, 7].tolist() == [100, 150, 200]  # alpha dropped
    assert gray[:, 7, 7].tolist() == [77, 77, 77]  # L -> R = G = B


def test_one_pixel_wide_image_reads_without_a_warning(tmp_path):
    # a 1 x 1 (or 1 x W) image's CHW transpose was a view of PIL's read-only buffer: torch warned
    from retina.data.coco import read_image

    Image.fromarray(np.array([[[9, 8, 7]]], dtype=np.uint8)).save(tmp_path / "dot.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = read_image(tmp_path / "dot.png")
    assert image.tolist() == [[[9]], [[8]], [[7]]]
    image[0, 0, 0] = 1  # writable


def test_unknown_category_names_annotation_and_category(tiny_coco):
    ann_file, image_dir = tiny_coco
    _edit_json(ann_file, lambda d: d["annotations"].append(
        {"id": 11, "image_id": 2, "category_id": 99, "bbox": [1, 1, 2, 2], "area": 4,
         "iscrowd": 0}))  # fmt: skip
    with pytest.raises(ValueError, match="annotation 11 has category_id 99") as e:
        CocoDetection(ann_file, image_dir)
    assert str(ann_file) in str(e.value)


def test_bad_bbox_is_a_value_error(tiny_coco):
    ann_file, image_dir = tiny_coco
    first = json.loads(ann_file.read_text())["annotations"][0]
    _edit_json(ann_file, lambda d: d["annotations"][0].update(bbox=[1, 2, 3]))  # ragged
    with pytest.raises(ValueError, match=rf"annotation {first['id']} \(image {first['image_id']}\) has "
                                         r"bbox \[1, 2, 3\]; COCO boxes are 4 numbers") as e:
        CocoDetection(ann_file, image_dir)
    assert str(e.value).startswith(f"{ann_file}: ")
    # 8 three-number boxes hold 24 = 6 x 4 numbers: must not be read as 6 boxes.
    _edit_json(ann_file, lambda d: [a.update(bbox=[1, 2, 3]) for a in d["annotations"]])
    _edit_json(ann_file, lambda d: d["annotations"].append({**d["annotations"][0], "id": 8}))
    with pytest.raises(ValueError, match="COCO boxes are 4 numbers"):
        CocoDetection(ann_file, image_dir)
    # numpy would read "1" as 1.0
    _edit_json(ann_file, lambda d: [a.update(bbox=["1", 2, 3, 4]) for a in d["annotations"]])
    with pytest.raises(ValueError, match=r"has bbox \['1', 2, 3, 4\]"):
        CocoDetection(ann_file, image_dir)


def test_references_pycocotools_would_get_wrong(tiny_coco):
    ann_file, image_dir = tiny_coco
    original = ann_file.read_text()
    # a repeated image id: the index keeps the last image and hangs the first's boxes on it
    _edit_json(ann_file, lambda d: d["images"].append({**d["images"][0], "file_name": "copy.png"}))
    with pytest.raises(ValueError, match=r"image id \S+ is used by more than one image \('copy.png' "):
        CocoDetection(ann_file, image_dir)
    # an annotation of an image that is not listed: it was dropped without a word
    ann_file.write_text(original)
    _edit_json(ann_file, lambda d: d["annotations"].append({**d["annotations"][0], "id": 77, "image_id": 999}))
    with pytest.raises(ValueError, match="annotation 77 refers to image_id 999, which no image has"):
        CocoDetection(ann_file, image_dir)
    # an image without file_name: eval and `data show` stopped at it with KeyError: 'file_name'
    ann_file.write_text(original)
    _edit_json(ann_file, lambda d: d["images"][1].pop("file_name"))
    with pytest.raises(ValueError, match=r": image id \S+ has file_name None; every image needs one"):
        CocoDetection(ann_file, image_dir)


def test_corrupt_missing_or_resized_image_names_the_file(tiny_coco):
    ann_file, image_dir = tiny_coco
    ds = CocoDetection(ann_file, image_dir)
    (image_dir / "a.png").write_bytes(b"not a png")
    (image_dir / "b.png").unlink()
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(image_dir / "c.png")
    for index, name in ((0, "a.png"), (1, "b.png"), (2, "c.png")):
        with pytest.raises(RuntimeError) as e:
            ds[index]
        message = str(e.value)
        assert str(image_dir / name) in message and "\n" not in message
    with pytest.raises(RuntimeError, match="is 10x10 but"):
        ds[2]


def test_missing_files_and_invalid_json(tiny_coco, tmp_path):
    ann_file, image_dir = tiny_coco
    with pytest.raises(FileNotFoundError, match="annotation file not found") as e:
        CocoDetection(tmp_path / "nope.json", image_dir)
    assert str(tmp_path / "nope.json") in str(e.value)
    with pytest.raises(FileNotFoundError, match="image directory not found") as e:
        CocoDetection(ann_file, tmp_path / "no_images")
    assert str(tmp_path / "no_images") in str(e.value)
    ann_file.write_text('{"images": [')
    with pytest.raises(ValueError, match="not valid JSON") as e:
        CocoDetection(ann_file, image_dir)
    assert str(ann_file) in str(e.value)


def test_cache_images_serves_the_decoded_pixels_and_survives_edits(tiny_coco):
    ann_file, image_dir = tiny_coco
    ds = CocoDetection(ann_file, image_dir)
    read = [ds[i][0] for i in range(len(ds))]
    report = ds.cache_images(threads=2)
    # three 40x60 images, 3 bytes a pixel
    assert (report.images, report.unreadable, report.nbytes) == (3, 0, 3 * 40 * 60 * 3)
    assert "3 images cached in RAM" in str(report)
    for name in ("a.png", "b.png", "c.png"):
        (image_dir / name).unlink()  # served from memory from now on
    for i in range(len(ds)):
        image = ds[i][0]
        assert torch.equal(image, read[i])
        image.zero_()  # a transform writing into its input
        assert torch.equal(ds[i][0], read[i])


def test_cache_images_leaves_an_unreadable_image_to_fail_when_read(tiny_coco):
    ann_file, image_dir = tiny_coco
    (image_dir / "a.png").write_bytes(b"not a png")  # ids sorted: a.png (id 2) is index 0
    ds = CocoDetection(ann_file, image_dir)
    report = ds.cache_images()
    assert (report.images, report.unreadable) == (2, 1) and "1 unreadable left out" in str(report)
    with pytest.raises(BadImageError, match="a.png"):
        ds[0]
    assert ds[1][0].shape == (3, H, W)


def test_cache_images_refused_when_memory_is_short(tiny_coco, monkeypatch):
    ann_file, image_dir = tiny_coco
    ds = CocoDetection(ann_file, image_dir)
    monkeypatch.setattr(coco_module, "available_memory", lambda: 3 * 40 * 60 * 3)  # the 3 images exactly: half is short
    with pytest.raises(InputError, match=r"need 0.0 GiB decoded, more than 50% .* set data.cache=none") as e:
        ds.cache_images()
    assert str(ann_file) in str(e.value) and ds._cached is None
    monkeypatch.setattr(coco_module, "available_memory", lambda: None)  # unknown: no refusal
    assert ds.cache_images().images == 3


def test_collate_keeps_lists(tiny_coco):
    ds = CocoDetection(*tiny_coco)
    images, targets = collate([ds[0], ds[2]])
    assert isinstance(images, list) and isinstance(targets, list)
    assert [t["image_id"] for t in targets] == [2, 9]
    assert images[1].shape == (3, H, W)
    assert collate([]) == ([], [])


def test_dataset_pickles_for_worker_processes(tiny_coco):
    ds = CocoDetection(*tiny_coco, transforms=build_transforms((20,), 100, 0.0, train=True))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.ids == ds.ids and clone.num_degenerate == 4
    image, target = clone[0]
    assert image.shape == (3, 20, 30)  # scale = min(20 / 40, 100 / 60) = 0.5
    assert_close(target["boxes"], BOXES_HALVED)


# ---------------------------------------------------------------------------------- transforms


def _sample() -> tuple[torch.Tensor, dict]:
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    image[:] = torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1)
    image[:, 0, 0] = torch.tensor([255, 0, 0], dtype=torch.uint8)
    target = {"boxes": BOXES.clone(), "labels": torch.tensor([0, 1]), "image_id": 2,
              "orig_size": (H, W)}  # fmt: skip
    return image, target


def test_hflip_by_hand():
    image, target = _sample()
    flipped, t = build_transforms((H,), 1000, hflip_prob=1.0, train=True)(image, target)
    # x1' = W - x2, x2' = W - x1 with W = 60: [60 - 30.5, ., 60 - 10.5, .], [60 - 60, ., 60 - 50, .]
    assert_close(t["boxes"], torch.tensor([[29.5, 5.25, 49.5, 15.25], [0.0, 30.0, 10.0, 40.0]]))
    assert flipped.shape == (3, H, W)  # min size 40 = H: scale 1, no resize
    assert flipped[:, 0, W - 1].tolist() == [255, 0, 0]  # the marker moved to the last column
    assert t["labels"].tolist() == [0, 1] and t["orig_size"] == (H, W)
    assert_close(target["boxes"], BOXES)  # the input target is not modified


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 50), st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_hflip_twice_is_identity(width, fractions):
    x1, x2 = sorted(fractions[:2])
    y1, y2 = sorted(fractions[2:])
    boxes = torch.tensor([[x1, y1, x2, y2]], dtype=torch.float64) * width
    image = torch.arange(3 * 2 * width, dtype=torch.int64).view(3, 2, width)
    once_image, once = hflip(image, {"boxes": boxes})
    twice_image, twice = hflip(once_image, once)
    assert bool((once["boxes"][:, 2] >= once["boxes"][:, 0]).all())
    assert_close(twice["boxes"], boxes)
    assert torch.equal(twice_image, image)


def test_resize_shorter_side_by_hand():
    image, target = _sample()
    out, t = resize(image, target, min_size=20, max_size=1000)
    # scale = min(20 / 40, 1000 / 60) = 0.5 -> (20, 30); boxes halved
    assert out.shape == (3, 20, 30) and out.dtype == torch.uint8
    assert_close(t["boxes"], BOXES_HALVED)
    assert out[:, 10, 15].tolist() == [10, 20, 30]  # a uniform region stays uniform
    assert t["orig_size"] == (H, W)


def test_resize_capped_by_max_size_by_hand():
    image, target = _sample()
    out, t = resize(image, target, min_size=80, max_size=90)
    # scale = min(80 / 40, 90 / 60) = min(2, 1.5) = 1.5 -> (60, 90)
    assert out.shape == (3, 60, 90)
    expected = torch.tensor([[15.75, 7.875, 45.75, 22.875], [75.0, 45.0, 90.0, 60.0]])
    assert_close(t["boxes"], expected)


def test_resize_scale_one_is_a_no_op():
    image, target = _sample()
    out, t = resize(image, target, min_size=40, max_size=1000)  # scale = 40 / 40 = 1
    assert out is image and t["boxes"] is target["boxes"]


def test_empty_boxes_survive_train_transform():
    image, target = _sample()
    target["boxes"] = torch.zeros(0, 4)
    out, t = build_transforms((20,), 1000, 1.0, train=True)(image, target)
    assert out.shape == (3, 20, 30) and t["boxes"].shape == (0, 4)


def test_eval_transform_is_identity():
    image, target = _sample()
    out, t = build_transforms((20,), 1000, hflip_prob=1.0, train=False)(image, target)
    assert out is image and t is target


def test_train_transform_random_and_reproducible():
    transform = build_transforms((20, 40), 1000, hflip_prob=0.5, train=True)

    def run() -> list[tuple[tuple[int, ...], bool]]:
        torch.manual_seed(0)
        results = []
        for _ in range(20):
            out, t = transform(*_sample())
            # Flipped iff the first box starts at (W - 30.5) * scale, scale = out width / W.
            scale = out.shape[-1] / W
            results.append((tuple(out.shape[-2:]), bool(t["boxes"][0, 0] == 29.5 * scale)))
        return results

    first = run()
    assert run() == first
    assert {size for size, _ in first} == {(20, 30), (40, 60)}
    assert {flipped for _, flipped in first} == {True, False}


# ---------------------------------------------------------------------------------- shapes
def test_shape_masks_by_hand():
    square = shapes_module._shape_mask(0, x0=2, y0=3, side=4, size=10)
    assert int(square.sum()) == 16 and bool(square[3:7, 2:6].all())
    # circle of radius 2: the pixel centres of a 4 x 4 block are at +-0.5, +-1.5 from its centre;
    # corners 1.5^2 + 1.5^2 = 4.5 > 4 are out, every other 2.5 or 0.5 <= 4 is in: 16 - 4 = 12.
    circle = shapes_module._shape_mask(1, x0=0, y0=0, side=4, size=10)
    assert int(circle.sum()) == 12 and not circle[0, 0] and circle[0, 1]
    # triangle: row centre y = 0.5, 1.5, 2.5, 3.5 has half-width y / 2 = 0.25, 0.75, 1.25, 1.75
    # around x = 2; column centres are 0.5 and 1.5 away: 0 + 2 + 2 + 4 = 8 pixels, top row empty.
    triangle = shapes_module._shape_mask(2, x0=0, y0=0, side=4, size=10)
    assert triangle[:4, :4].sum(axis=1).tolist() == [0, 2, 2, 4] and int(triangle.sum()) == 8


def test_tiny_shapes_is_valid_coco(tiny_shapes):
    meta = json.loads((tiny_shapes / "meta.json").read_text())
    assert meta == {"num_train": 16, "num_val": 8, "image_size": 64, "seed": 0, "version": shapes_module.VERSION}
    ds = CocoDetection(tiny_shapes / "annotations" / "instances_train.json", tiny_shapes / "train")
    assert len(ds) == 16 and ds.cat_ids == [1, 2, 3]
    assert ds.class_names == ["square", "circle", "triangle"] and ds.num_degenerate == 0
    val = CocoDetection(tiny_shapes / "annotations" / "instances_val.json", tiny_shapes / "val")
    assert len(val) == 8
    for image_id in ds.ids:
        anns = ds.coco.imgToAnns[image_id]
        assert 0 <= len(anns) <= 4
        for a in anns:
            x, y, w, h = a["bbox"]
            assert 1 <= w <= round(0.8 * 64) and 1 <= h <= round(0.8 * 64)  # side <= 51 px
            assert 0 <= x and x + w <= 64 and 0 <= y and y + h <= 64
            assert 0 < a["area"] <= w * h and a["iscrowd"] == 0


def test_shapes_boxes_are_tight(tiny_shapes):
    ds = CocoDetection(tiny_shapes / "annotations" / "instances_train.json", tiny_shapes / "train")
    # Background pixels stay within TEXTURE + NOISE of the base colour (so within
    # 2 * TEXTURE + NOISE = 44 of the background's median); object pixels are >= MIN_CONTRAST (80)
    # from the base colour, so >= 80 - NOISE - TEXTURE = 56 from that median.
    limit = 2 * shapes_module.TEXTURE + shapes_module.NOISE
    for i in range(len(ds)):
        image, target = ds[i]
        pixels = image.permute(1, 2, 0).to(torch.int64)  # (64, 64, 3)
        inside = torch.zeros(64, 64, dtype=torch.bool)
        for x1, y1, x2, y2 in target["boxes"].to(torch.int64).tolist():
            inside[y1:y2, x1:x2] = True
        background = pixels[~inside].median(dim=0).values  # (3,)
        differs = (pixels - background).abs().float().mean(-1) > limit  # (64, 64)
        # Outside every box there is only background ...
        assert not bool(differs[~inside].any())
        # ... and each box's outermost rows and columns hold a non-background pixel.
        for x1, y1, x2, y2 in target["boxes"].to(torch.int64).tolist():
            edges = [differs[y1, x1:x2], differs[y2 - 1, x1:x2], differs[y1:y2, x1],
                     differs[y1:y2, x2 - 1]]  # fmt: skip
            assert all(bool(e.any()) for e in edges)


def test_shapes_sizes_and_empty_images():
    rng = np.random.default_rng(0)
    counts, sides = [], []
    for _ in range(300):
        _, objects = shapes_module.draw_image(rng, 128)
        counts.append(len(objects))
        sides += [max(o["bbox"][2:]) for o in objects]
    # 5% of 300 images are drawn empty: 15 expected; binomial sd = sqrt(300 * .05 * .95) = 3.8
    assert 5 <= counts.count(0) <= 27
    assert max(counts) == 4
    # sides are log-uniform in [10, 0.8 * 128 = 102.4] px (a triangle's tight box can be a px less)
    assert 9 <= min(sides) <= 12 and 90 <= max(sides) <= 103
    assert shapes_module.side_range(128) == (10.0, 102.4) and shapes_module.side_range(512) == (10.0, 120.0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_shapes_deterministic_and_independent_of_count(tmp_path):
    a = _files(generate_shapes(tmp_path / "a", num_train=3, num_val=1, image_size=32, seed=1))
    b = _files(generate_shapes(tmp_path / "b", num_train=3, num_val=1, image_size=32, seed=1))
    assert a == b  # same seed: identical bytes, json included
    more = generate_shapes(tmp_path / "c", num_train=5, num_val=2, image_size=32, seed=1)
    assert (more / "train" / "000002.png").read_bytes() == a["train/000002.png"]
    assert (more / "val" / "000000.png").read_bytes() == a["val/000000.png"]

    def anns_of(files: dict[str, bytes], image_id: int) -> list[dict]:
        data = json.loads(files["annotations/instances_train.json"])
        return [x for x in data["annotations"] if x["image_id"] == image_id]

    for image_id in (1, 2, 3):
        assert anns_of(_files(more), image_id) == anns_of(a, image_id)
    assert sum(len(anns_of(a, i)) for i in (1, 2, 3)) > 0
    other = generate_shapes(tmp_path / "d", num_train=3, num_val=1, image_size=32, seed=2)
    assert (other / "train" / "000000.png").read_bytes() != a["train/000000.png"]


def test_ensure_shapes_reuses_or_refuses(tiny_shapes, capsys):
    meta = tiny_shapes / "meta.json"
    mtime = meta.stat().st_mtime_ns
    params = {"num_train": 16, "num_val": 8, "image_size": 64, "seed": 0}
    assert ensure_shapes(tiny_shapes, **params) == tiny_shapes
    assert capsys.readouterr().err == "" and meta.stat().st_mtime_ns == mtime  # not regenerated
    with pytest.raises(ValueError) as e:
        ensure_shapes(tiny_shapes, **{**params, "num_train": 17})
    message = str(e.value)
    assert str(tiny_shapes) in message and "num_train=16" in message and "num_train=17" in message
    assert "\n" not in message


def test_ensure_shapes_generates_and_survives_interruption(tmp_path, capsys, monkeypatch):
    root = tmp_path / "shapes"
    ensure_shapes(root, num_train=2, num_val=1, image_size=32, seed=0)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "generating" in err and str(root) in err and "2 train" in err
    assert len(list((root / "train").glob("*.png"))) == 2

    calls = []

    def failing_png(image):  # the 2nd image write is "killed"
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return b"png"

    monkeypatch.setattr(shapes_module, "_png_bytes", failing_png)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(root, num_train=4, num_val=1, image_size=32, seed=0)
    assert not (root / "meta.json").exists()  # the old marker went first: no stale "complete"
    monkeypatch.undo()
    ensure_shapes(root, num_train=4, num_val=1, image_size=32, seed=0)  # regenerates, no error
    assert json.loads((root / "meta.json").read_text())["num_train"] == 4


# ---------------------------------------------------------------------------- build_dataset
def test_build_dataset_shapes(tiny_shapes_overrides, tiny_shapes):
    cfg = config_from_dict({}, [*tiny_shapes_overrides, "model.input.min_size=32",
                                "model.input.max_size=64", "data.hflip_prob=0.0"])  # fmt: skip
    train = build_dataset(cfg, "train")
    val = build_dataset(cfg, "val")
    assert len(train) == 16 and len(val) == 8 and train.num_classes == 3
    raw = CocoDetection(tiny_shapes / "annotations" / "instances_train.json", tiny_shapes / "train")
    image, target = train[0]
    # scale = min(32 / 64, 64 / 64) = 0.5; no flip (hflip_prob 0)
    assert image.shape == (3, 32, 32)
    assert_close(target["boxes"], raw[0][1]["boxes"] * 0.5)
    assert target["orig_size"] == (64, 64)
    val_image, val_target = val[0]
    assert val_image.shape == (3, 64, 64) and val_target["orig_size"] == (64, 64)  # no resize


def test_build_dataset_coco(tiny_coco):
    ann_file, image_dir = tiny_coco
    root = ann_file.parent.parent
    cfg = config_from_dict({"data": {"dataset": "coco", "root": str(root),
                                     "val_ann": "annotations/instances.json",
                                     "val_images": "images"}})  # fmt: skip
    val = build_dataset(cfg, "val")
    assert val.ids == [2, 5, 9] and val.class_names == ["cat", "dog"]
    with pytest.raises(FileNotFoundError) as e:
        build_dataset(cfg, "train")  # default annotations/instances_train2017.json is absent
    message = str(e.value)
    assert str(root / "annotations" / "instances_train2017.json") in message
    assert "data/README.md" in message and "\n" not in message
