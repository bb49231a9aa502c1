"""Tests for retina.data.check (``retina data check``), BadImageError and SkipBadImages.

The broken set (``broken_coco``): images of 20 x 30 (H x W) px, categories 1 and 2.
- image 1 ok.png: ann 10 fine; 11 category 99; 12 w = 0; 13 w = -2; 14 w = 0.5; 15 [25, 15, 10, 10]
  crosses the right and bottom edges (35 > 30, 25 > 20); 16 x = 40 >= 30 (outside); 17 w = NaN.
- image 1 again (dup.png, a valid file): a duplicate image id.
- image 2 missing.png (no file): ann 18, and a second annotation with id 10 (duplicate id).
- image 3 corrupt.png (text bytes), image 4 truncated.png (half a PNG), image 5 wrong_size.png
  (10 x 10 on disk), each with one fine annotation (19, 20, 21).
- image 6 empty.png: no annotations.
- ann 22 points at image 77, which does not exist.
Errors: 1 duplicate image id, 1 duplicate annotation id, 1 unknown image id, 1 unknown category,
1 missing file, 2 unreadable, 1 size mismatch. Warnings: 1 non-finite, 2 degenerate, 1 tiny,
1 outside, 1 partly outside, 1 image without annotations.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from retina.config import ConfigError, config_from_dict
from retina.data import (
    BadImageError,
    CocoDetection,
    SkipBadImages,
    TooManyBadImages,
    build_dataset,
    collate,
)
from retina.data.check import (KINDS, check_dataset, check_folder, data_check_cli, format_report,
                               inspect_image)

H, W = 20, 30


def _ann(ann_id, image_id, bbox, category_id=1):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": 0, "iscrowd": 0}  # fmt: skip


def _image(image_id, name, height=H, width=W):
    return {"id": image_id, "file_name": name, "height": height, "width": width}


def _save(path: Path, height=H, width=W) -> None:
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(path)


@pytest.fixture
def broken_coco(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "broken"  # beside tiny_coco's files when a test uses both
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    for name in ("ok.png", "dup.png", "empty.png"):
        _save(image_dir / name)
    (image_dir / "corrupt.png").write_bytes(b"this is not an image")
    _save(root / "full.png")
    full = (root / "full.png").read_bytes()
    (image_dir / "truncated.png").write_bytes(full[: len(full) // 2])
    _save(image_dir / "wrong_size.png", 10, 10)
    data = {
        "images": [_image(1, "ok.png"), _image(1, "dup.png"), _image(2, "missing.png"),
                   _image(3, "corrupt.png"), _image(4, "truncated.png"),
                   _image(5, "wrong_size.png"), _image(6, "empty.png")],
        "annotations": [
            _ann(10, 1, [2, 3, 10, 5]), _ann(11, 1, [1, 1, 5, 5], category_id=99),
            _ann(12, 1, [5, 5, 0, 4]), _ann(13, 1, [5, 5, -2, 4]), _ann(14, 1, [4, 4, 0.5, 3]),
            _ann(15, 1, [25, 15, 10, 10], 2), _ann(16, 1, [40, 2, 5, 5], 2),
            _ann(17, 1, [1, 1, float("nan"), 2], 2),
            _ann(18, 2, [1, 1, 5, 5]), _ann(10, 2, [2, 2, 5, 5]),
            _ann(19, 3, [1, 1, 5, 5]), _ann(20, 4, [1, 1, 5, 5]), _ann(21, 5, [1, 1, 5, 5]),
            _ann(22, 77, [1, 1, 5, 5]),
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, image_dir


EXPECTED_COUNTS = {
    "malformed_label": 0, "missing_annotation": 0, "unknown_class": 0,  # VOC / YOLO folders only
    "bad_record": 0, "duplicate_image_id": 1, "duplicate_annotation_id": 1,
    "duplicate_category_id": 0, "unknown_image_id": 1, "unknown_category": 1, "missing_file": 1,
    "unreadable_image": 2, "size_mismatch": 1, "category_name": 0, "nonfinite_box": 1,
    "degenerate_box": 2,
    "tiny_box": 1, "box_outside": 1, "box_partly_outside": 1, "image_without_annotations": 1,
}  # fmt: skip


# ------------------------------------------------------------------------------ check_dataset
def test_broken_set_counts_and_examples(broken_coco):
    ann_file, image_dir = broken_coco
    report = check_dataset(ann_file, image_dir, workers=2)
    assert {k: report.count(k) for k in KINDS} == EXPECTED_COUNTS
    assert (report.num_images, report.num_annotations, report.num_categories) == (7, 14, 2)
    assert report.examples("duplicate_image_id") == ["image id 1: 2 records"]
    assert report.examples("duplicate_annotation_id") == ["annotation id 10: 2 records"]
    assert report.examples("unknown_image_id") == ["annotation 22: image_id 77"]
    assert report.examples("unknown_category") == ["annotation 11 (image 1): category_id 99"]
    assert report.examples("missing_file") == [f"image 2: {image_dir / 'missing.png'}"]
    corrupt, truncated = report.examples("unreadable_image")  # in json order
    assert corrupt.startswith(f"image 3: {image_dir / 'corrupt.png'}: ")
    assert truncated.startswith(f"image 4: {image_dir / 'truncated.png'}: ")
    assert report.examples("size_mismatch") == [
        f"image 5: {image_dir / 'wrong_size.png'} is 10x10 (WxH), the json says 30x20"]
    assert report.examples("degenerate_box") == ["annotation 12 (image 1): bbox [5, 5, 0, 4]",
                                                 "annotation 13 (image 1): bbox [5, 5, -2, 4]"]
    assert report.examples("tiny_box") == ["annotation 14 (image 1): bbox [4, 4, 0.5, 3]"]
    assert report.examples("nonfinite_box") == ["annotation 17 (image 1): bbox [1, 1, nan, 2]"]
    assert report.examples("box_outside") == [
        "annotation 16 (image 1): bbox [40, 2, 5, 5], image 30x20 (WxH)"]
    assert report.examples("box_partly_outside") == [
        "annotation 15 (image 1): bbox [25, 15, 10, 10], image 30x20 (WxH)"]
    assert report.examples("image_without_annotations") == ["image 6: empty.png"]
    # errors first, in table order; then warnings
    assert [f.kind for f in report.errors] == [
        "duplicate_image_id", "duplicate_annotation_id", "unknown_image_id", "unknown_category",
        "missing_file", "unreadable_image", "size_mismatch"]
    assert len(report.warnings) == 6
    assert report.exit_status == 1


def test_format_report_limits_examples(broken_coco):
    report = check_dataset(*broken_coco, max_examples=1)
    assert report.count("degenerate_box") == 2 and len(report.examples("degenerate_box")) == 1
    text = format_report(report)
    lines = text.splitlines()
    degenerate = lines.index(next(ln for ln in lines if "[degenerate_box]" in ln))
    assert lines[degenerate].split()[:2] == ["WARNING", "2"]
    assert lines[degenerate + 1].strip() == "annotation 12 (image 1): bbox [5, 5, 0, 4]"
    assert lines[degenerate + 2].strip() == "... and 1 more"
    # 1 + 1 + 1 + 1 + 1 + 2 + 1 errors; 1 + 2 + 1 + 1 + 1 + 1 warnings
    assert lines[-1] == "8 errors, 7 warnings"


def test_warnings_only_exit_0_errors_exit_1(tiny_coco, broken_coco, capsys):
    # The shared tiny set only has warnings: 2 non-finite boxes, 1 w = 0, 1 box left of the
    # image, 1 box over the bottom-right corner, 1 image without annotations.
    assert data_check_cli(*tiny_coco) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == ("0 errors, 6 warnings "
                                    "(warnings only: the dataset can be trained on)")
    assert data_check_cli(*broken_coco) == 1
    assert "ERROR" in capsys.readouterr().out


def test_clean_set_reports_nothing(tmp_path):
    _save(tmp_path / "a.png")
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [_image(1, "a.png")],
                               "annotations": [_ann(1, 1, [0, 0, 30, 20])],  # the whole image
                               "categories": [{"id": 1, "name": "thing"}]}))  # fmt: skip
    report = check_dataset(ann, tmp_path)
    assert report.errors == [] and report.warnings == [] and report.exit_status == 0
    assert format_report(report).splitlines()[-1] == "no problems found"


def test_category_names_missing_or_shared_are_warnings(tmp_path):
    # both passed; training then showed class '1', and two "cat" classes could not be told apart
    _save(tmp_path / "a.png")
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [_image(1, "a.png")], "annotations": [_ann(1, 1, [0, 0, 30, 20])],
                               "categories": [{"id": 1}, {"id": 2, "name": "cat"}, {"id": 3, "name": "cat"},
                                              {"id": 4, "name": " "}]}))  # fmt: skip
    report = check_dataset(ann, tmp_path)
    assert report.examples("category_name") == [
        "categories[0] (id 1): no name; the class is shown as its id",
        "categories[3] (id 4): no name; the class is shown as its id",
        "2 categories are named 'cat': their classes cannot be told apart in results",
    ]
    assert report.errors == [] and report.exit_status == 0


def test_malformed_records(tmp_path):
    _save(tmp_path / "a.png")
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({
        "images": [_image(1, "a.png"), {"id": 2, "file_name": "a.png", "width": W}, "oops"],
        "annotations": [_ann(1, 1, [0, 0, 3]), {"id": 2, "image_id": 1, "bbox": [0, 0, 1, 1]},
                        _ann(3, 1, [0, 0, "5", 5])],
        "categories": [{"id": 1}, {"name": "no id"}],
    }))  # fmt: skip
    report = check_dataset(ann, tmp_path, max_examples=10)
    assert report.examples("bad_record") == [
        "images[1] (id 2): missing or invalid height",
        "images[2]: not an object",
        "categories[1]: missing or invalid id",
        "annotations[0] (id 1): missing or invalid bbox (4 numbers)",
        "annotations[1] (id 2): missing or invalid category_id",
        "annotations[2] (id 3): missing or invalid bbox (4 numbers)",
    ]
    # every annotation is malformed, so images 1 and 2 have none; image 2's file is a.png
    # but, without a height, is not compared with the json
    assert report.count("image_without_annotations") == 2
    assert report.count("size_mismatch") == 0 and report.exit_status == 1


def test_unusable_inputs_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert data_check_cli(tmp_path / "nope.json", tmp_path / "images") == 2
    err = capsys.readouterr().err
    assert err == f"retina: error: annotation file not found: {tmp_path / 'nope.json'}\n"
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n')
    assert data_check_cli(bad, tmp_path / "images") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"retina: error: {bad}: not valid JSON") and err.count("\n") == 1
    bad.write_text('{"annotations": []}')
    assert data_check_cli(bad, tmp_path / "images") == 2
    assert "no 'images' list" in capsys.readouterr().err
    bad.write_text('{"images": []}')
    assert data_check_cli(bad, tmp_path / "no_dir") == 2
    err = capsys.readouterr().err
    assert err == f"retina: error: image directory not found: {tmp_path / 'no_dir'}\n"


def test_truncated_jpeg_needs_a_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert inspect_image(tmp_path / "a.jpg") == ("ok", "", (96, 64))  # (W, H)
    assert inspect_image(tmp_path / "cut.jpg", decode=False) == ("ok", "", (96, 64))  # header fine
    status, reason, size = inspect_image(tmp_path / "cut.jpg")
    assert (status, size) == ("unreadable", None) and "truncated" in reason
    assert inspect_image(tmp_path / "none.jpg") == ("missing", "not found", None)


# ------------------------------------------------------------------- VOC and YOLO folders
def test_check_voc_folder_names_files_and_objects(tmp_path, capsys):
    from test_voc_yolo import make_voc

    root = make_voc(tmp_path / "voc")  # a, b train; c val (tests/test_voc_yolo.py)
    ann = root / "Annotations"
    assert data_check_cli(root=root) == 0  # clean
    out = capsys.readouterr().out.splitlines()
    assert out == [f"checked voc layout detected in {root} (2 train / 1 val images, 3 classes): "
                   "3 images, 4 annotations, 3 categories", "no problems found"]  # fmt: skip
    # a.xml: not XML; b.xml: bird box crossing the right edge (xmax 30 > 24) and an object
    # without <bndbox>; val lists d, which has no xml; c.jpg replaced by a 10x10 file.
    (ann / "a.xml").write_text("<annotation>\n  <object>\n</annotation>\n")
    (ann / "b.xml").write_text("<annotation><object><name>bird</name><bndbox><xmin>2</xmin>"
                               "<ymin>3</ymin><xmax>30</xmax><ymax>13</ymax></bndbox></object>"
                               "<object><name>bird</name></object></annotation>")  # fmt: skip
    (root / "ImageSets" / "Main" / "val.txt").write_text("c\nd\n")
    _save(root / "JPEGImages" / "c.jpg", 10, 10)
    report = check_folder(root, "voc", workers=1)
    counts = {k: report.count(k) for k in KINDS if report.count(k)}
    assert counts == {"malformed_label": 2, "missing_annotation": 1, "size_mismatch": 1}
    assert report.examples("malformed_label") == [
        f"{ann / 'a.xml'}:3:2: not valid XML (mismatched tag)",
        f"{ann / 'b.xml'} object 2: no <bndbox>"]  # b.xml is left out whole  # fmt: skip
    assert report.examples("missing_annotation") == [
        f"{ann / 'd.xml'}: not found (listed in {root / 'ImageSets' / 'Main' / 'val.txt'}:2)"]
    assert report.examples("size_mismatch") == [
        f"image 1: {root / 'JPEGImages' / 'c.jpg'} is 10x10 (WxH), its annotation says 32x32"]
    assert report.exit_status == 1
    # Box warnings name the xml object: b.xml without its second object, box (1, 2, 30, 13)
    (ann / "a.xml").write_text("<annotation><size><width>40</width><height>30</height></size>"
                               "</annotation>")  # fmt: skip
    (ann / "b.xml").write_text((ann / "b.xml").read_text().replace("<object><name>bird</name>"
                                                                   "</object>", ""))  # fmt: skip
    (root / "ImageSets" / "Main" / "val.txt").write_text("")
    report = check_folder(root, "auto", workers=1)
    assert report.examples("box_partly_outside") == [
        f"{ann / 'b.xml'} object 1: bbox [1.0, 2.0, 29.0, 11.0], image 24x20 (WxH)"]
    assert report.examples("image_without_annotations") == ["image 1: a.jpg"]
    assert report.exit_status == 0


def test_check_yolo_folder_names_label_lines(tmp_path, capsys):
    from test_voc_yolo import make_yolo

    root = make_yolo(tmp_path / "yolo")
    labels = root / "labels" / "train" / "a.txt"
    # line 1 fine; line 2: 4 fields; line 3: class 7 of 2; line 4: x2 = (0.9 + 0.2 / 2) * 200
    # = 200 and x1 = 160, inside; line 5: cx 1.0, w 0.4: x in [160, 240], past W = 200.
    # line 6: x2 = (0.9 + 0.2000004 / 2) * 200 = 200.00004, past W by 4e-5 px (label rounding):
    # within EDGE_TOL, no warning
    labels.write_text("0 0.5 0.5 0.25 0.5\n0 0.5 0.5 0.2\n7 0.5 0.5 0.1 0.1\n1 0.9 0.5 0.2 0.2\n"
                      "1 1.0 0.5 0.4 0.2\n1 0.9 0.5 0.2000004 0.2\n")  # fmt: skip
    assert data_check_cli(root=root, fmt="yolo") == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"checked yolo folder {root / 'data.yaml'} (2 train / 1 val images, "
                                   "2 classes): 3 images, 5 annotations, 2 categories")  # fmt: skip
    assert f"{labels}:2: 4 fields; expected 'class cx cy w h' (5)" in out
    assert f"{labels}:3: class 7 is not a class id 0..1 (2 names in data.yaml)" in out
    report = check_folder(root, "yolo", workers=1)
    assert report.count("malformed_label") == 1 and report.count("unknown_class") == 1
    assert report.examples("box_partly_outside") == [
        f"{labels}:5: bbox [160.0, 40.0, 80.0, 20.0], image 200x100 (WxH)"]
    assert report.examples("image_without_annotations") == ["image 2: images/train/b.jpg"]


def test_check_folder_reports_a_shared_class_name_once(tmp_path):
    # both splits carry the folder's one class list: its repeated name is one finding, not two
    from test_voc_yolo import make_yolo

    root = make_yolo(tmp_path / "yolo")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [cat, cat]\n")
    report = check_folder(root, "yolo", workers=1)
    assert report.count("category_name") == 1
    assert report.examples("category_name") == [
        "2 categories are named 'cat': their classes cannot be told apart in results"]


def test_check_folder_unusable_inputs_exit_2(tmp_path, capsys):
    assert data_check_cli(root=tmp_path) == 2  # neither VOC nor YOLO
    err = capsys.readouterr().err
    assert err.startswith(f"retina: error: {tmp_path}: neither a VOC folder") and err.count("\n") == 1
    assert data_check_cli(root=tmp_path, fmt="voc") == 2
    assert "ImageSets/Main/train.txt not found" in capsys.readouterr().err
    assert data_check_cli(root=tmp_path, fmt="yolo") == 2
    assert f"{tmp_path / 'data.yaml'} not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------ BadImageError
def test_bad_image_error_names_file_and_id(tiny_coco):
    ann_file, image_dir = tiny_coco
    ds = CocoDetection(ann_file, image_dir)  # ids [2, 5, 9]: a.png, b.png, c.png
    (image_dir / "b.png").unlink()
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(image_dir / "c.png")
    (image_dir / "a.png").write_bytes(b"junk")
    with pytest.raises(BadImageError) as e:
        ds[1]
    assert str(e.value) == f"bad image {image_dir / 'b.png'} (image id 5): file not found"
    assert (e.value.path, e.value.image_id) == (image_dir / "b.png", 5)
    with pytest.raises(BadImageError) as e:
        ds[2]
    assert str(e.value) == (f"bad image {image_dir / 'c.png'} (image id 9): it is 10x10 but "
                            f"{ann_file} says 40x60 (HxW)")  # fmt: skip
    with pytest.raises(BadImageError) as e:
        ds[0]
    assert str(e.value).startswith(f"bad image {image_dir / 'a.png'} (image id 2): cannot read")
    assert "\n" not in str(e.value) and isinstance(e.value, RuntimeError)


def test_bad_image_error_from_a_loader_worker_is_one_line(tiny_coco):
    ann_file, image_dir = tiny_coco
    (image_dir / "a.png").unlink()  # image id 2, index 0
    loader = DataLoader(CocoDetection(ann_file, image_dir), batch_size=1, num_workers=1,
                        collate_fn=collate)  # fmt: skip
    # The worker's exception is rebuilt in this process as BadImageError(<its traceback>).
    with pytest.raises(BadImageError) as e:
        next(iter(loader))
    assert str(e.value) == f"bad image {image_dir / 'a.png'} (image id 2): file not found"
    assert (e.value.path, e.value.image_id) == (image_dir / "a.png", 2)


def test_errors_rebuilt_from_a_traceback_keep_the_last_line():
    traceback = ("Caught TooManyBadImages in DataLoader worker process 0.\nOriginal Traceback "
                 "(most recent call last):\n  File \"x.py\", line 1\nretina.data.robust."
                 "TooManyBadImages: too many bad images: 3 of the 100 images read by this process "
                 "were bad (3.0% > data.max_bad_fraction=0.01); last bad image /d/a b.png "
                 "(image id 7): file not found; check the data\n")  # fmt: skip
    e = TooManyBadImages(traceback)
    assert str(e).startswith("too many bad images: 3 of the 100") and "\n" not in str(e)
    assert (e.path, e.image_id, e.bad) == (Path("/d/a b.png"), 7, None)
    assert pickle.loads(pickle.dumps(e)).image_id == 7


# ------------------------------------------------------------------------------ SkipBadImages
class FakeImages(Dataset):
    """``ds[i] == i`` except the indices in ``bad``, which raise BadImageError for /d/{i}.png."""

    num_classes = 3

    def __init__(self, size: int, bad: set[int]) -> None:
        self.size, self.bad = size, bad

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> int:
        if i in self.bad:
            raise BadImageError.of(Path(f"/d/{i}.png"), i, "file not found")
        return i


def test_skip_replaces_with_next_readable_index(caplog):
    ds = SkipBadImages(FakeImages(5, bad={1, 2, 4}), max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="retina.data"):
        assert ds[1] == 3  # 1 and 2 bad -> 3
    assert (ds.bad, ds.read) == (2, 3)
    assert caplog.messages == [
        "skipping bad image /d/1.png (image id 1): file not found "
        "[1 bad of 1 read in this process]",
        "skipping bad image /d/2.png (image id 2): file not found "
        "[2 bad of 2 read in this process]",
    ]
    assert ds[4] == 0  # wraps around
    assert ds[1] == 3  # deterministic: same index, same replacement
    assert (ds.bad, ds.read) == (5, 8)
    assert len(ds) == 5 and ds.num_classes == 3  # attributes of the wrapped dataset
    copy = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker gets
    assert copy[2] == 3 and copy.num_classes == 3


def test_too_many_bad_images_after_min_reads():
    # Calls ds[0..97] read 98 indices plus one replacement read for each of the bad 3 and 10:
    # read 100 (in call 97) sees bad = 2 > 0.01 * 100 = 1 -> stop. Before read 100: no check.
    ds = SkipBadImages(FakeImages(200, bad={3, 10}), max_bad_fraction=0.01)
    for i in range(97):
        assert ds[i] == (i + 1 if i in (3, 10) else i)
    with pytest.raises(TooManyBadImages) as e:
        ds[97]
    message = str(e.value)
    assert message == ("too many bad images: 2 of the 100 images read by this process were bad "
                       "(2.0% > data.max_bad_fraction=0.01); last bad image /d/10.png (image id "
                       "10): file not found; check the data with `retina data check`")  # fmt: skip
    assert (e.value.bad, e.value.read, e.value.image_id) == (2, 100, 10)
    assert isinstance(e.value, BadImageError)
    # One bad image in 100 reads is exactly 1 %, not more: no stop.
    ok = SkipBadImages(FakeImages(200, bad={3}), max_bad_fraction=0.01)
    assert [ok[i] for i in range(150)][3] == 4 and (ok.bad, ok.read) == (1, 151)


def test_every_image_bad_stops_before_min_reads():
    ds = SkipBadImages(FakeImages(3, bad={0, 1, 2}), max_bad_fraction=0.5)
    with pytest.raises(TooManyBadImages, match=r"^too many bad images: none of the 3 images "
                                               r"could be read; last bad image /d/1.png"):
        ds[2]  # tries 2, 0, 1
    with pytest.raises(ValueError, match="max_bad_fraction"):
        SkipBadImages(FakeImages(3, set()), max_bad_fraction=1.5)


def test_build_dataset_wraps_train_when_skipping(tiny_shapes_overrides):
    skip = config_from_dict({}, [*tiny_shapes_overrides, "data.on_bad_image=skip",
                                 "data.max_bad_fraction=0.2"])  # fmt: skip
    train = build_dataset(skip, "train")
    assert isinstance(train, SkipBadImages) and train.max_bad_fraction == 0.2
    assert train.num_classes == 3 and len(train) == 16
    assert isinstance(build_dataset(skip, "val"), CocoDetection)  # never on validation
    default = config_from_dict({}, tiny_shapes_overrides)
    assert default.data.on_bad_image == "error" and default.data.max_bad_fraction == 0.01
    assert isinstance(build_dataset(default, "train"), CocoDetection)


def test_on_bad_image_config_checks():
    with pytest.raises(ConfigError, match=r"data.on_bad_image='drop' should be one of "
                                          r"\['error', 'skip'\]"):  # fmt: skip
        config_from_dict({}, ["data.on_bad_image=drop"])
    with pytest.raises(ConfigError, match=r"data.max_bad_fraction=1.5 must be in \[0, 1\]"):
        config_from_dict({"data": {"max_bad_fraction": 1.5}})


# ------------------------------------------------------------------- during training (end to end)
@pytest.fixture
def shapes_with_a_bad_image(tmp_path):
    """A fresh 64-image shapes set whose first training image is corrupt; (root, path, id)."""
    from retina.data import generate_shapes
    from tinyrun import TINY_DATA

    root = generate_shapes(tmp_path / "shapes", **TINY_DATA)
    first = json.loads((root / "annotations" / "instances_train.json").read_text())["images"][0]
    path = root / "train" / first["file_name"]
    path.write_bytes(b"not a png any more")
    return root, path, first["id"]


def test_training_on_bad_image_error_stops_with_checkpoint(shapes_with_a_bad_image, tmp_path):
    from retina.engine.checkpoint import last_checkpoint, load_checkpoint
    from retina.engine.train import Trainer, TrainingError
    from tinyrun import tiny_config

    root, path, image_id = shapes_with_a_bad_image
    # 8 iterations of 8 images read the 64 images once: the bad one is met.
    cfg = tiny_config(root, solver={"max_iter": 8, "warmup_iters": 2},
                      train={"checkpoint_period": 100, "eval_at_end": False})  # fmt: skip
    with pytest.raises(TrainingError) as e:
        Trainer(cfg, tmp_path / "run", device="cpu", quiet=True).train()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"bad image {path} (image id {image_id}): cannot read it: ")
    saved = last_checkpoint(tmp_path / "run")  # the work done before the bad batch
    assert saved is not None and f"checkpoint {saved}" in message
    assert load_checkpoint(saved)["iteration"] < 8
    assert not (tmp_path / "run" / "model_final.pth").exists()


def test_training_on_bad_image_skip_finishes_and_logs(shapes_with_a_bad_image, tmp_path, caplog):
    from retina.engine.checkpoint import load_checkpoint
    from retina.engine.train import Trainer
    from tinyrun import tiny_config

    root, path, image_id = shapes_with_a_bad_image
    cfg = tiny_config(root, solver={"max_iter": 8, "warmup_iters": 2},
                      data={"on_bad_image": "skip"},
                      train={"checkpoint_period": 100, "eval_at_end": False})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="retina.data"):
        Trainer(cfg, tmp_path / "run", device="cpu", quiet=True).train()
    assert load_checkpoint(tmp_path / "run" / "model_final.pth")["iteration"] == 8
    # one bad read among the 64 + 1 reads: under min_reads (100), so no stop
    [line] = caplog.messages
    assert re.fullmatch(rf"skipping bad image {re.escape(str(path))} \(image id {image_id}\): "
                        r"cannot read it: .+ \[1 bad of \d+ read in this process\]", line)
