"""Pascal VOC and YOLO folders read as COCO (retina/data/voc.py, yolo.py, convert.py, formats.py).

The generated VOC folder (``voc_root``), W x H:
- train: a.jpg 40x30 (size in the xml): dog xmin 1, ymin 1, xmax 10, ymax 20; cat 5, 6, 15, 16,
  difficult. b.png 24x20, no <size> in its xml (read from the file): bird 2, 3, 12, 13.
- val: c.jpg 32x32: dog 11, 11, 30, 30.
Classes, sorted: bird, cat, dog -> labels 0, 1, 2 (category ids 1, 2, 3).

The generated YOLO folder (``yolo_root``), names {0: cat, 1: dog}:
- train: images/train/a.png 200x100, labels/train/a.txt: ``0 0.5 0.5 0.25 0.5`` and the segment
  ``1 0.125 0.5 0.375 0.5 0.25 0.875``; images/train/b.jpg 64x48 without a label file.
- val: images/val/c.png 100x100, labels/val/c.txt: ``1 0.5 0.5 0.5 0.5`` (and a blank line).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from retina.cli import main
from retina.config import ConfigError, DataConfig, config_from_dict, replace
from retina.data import CocoDetection, build_dataset
from retina.data.convert import convert_folder, read_folder
from retina.data.formats import detect_format
from retina.data.voc import read_voc
from retina.data.yolo import label_path, read_yolo
from retina.engine.evaluate import evaluate_detections



def _image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name) + width)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def _xml(objects: list, size: tuple[int, int] | None = None, filename: str | None = None) -> str:
    """A VOC annotation; ``objects``: (name, difficult, (xmin, ymin, xmax, ymax))."""
    lines = ["<annotation>", f"<filename>{filename}</filename>" if filename else ""]
    if size:
        lines.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, difficult, box in objects:
        corners = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        lines.append(f"<object><name>{name}</name><difficult>{difficult}</difficult>"
                     f"<bndbox>{corners}</bndbox></object>")  # fmt: skip
    return "\n".join(lines + ["</annotation>"])


def make_voc(root: Path) -> Path:
    for name, (w, h) in {"a.jpg": (40, 30), "b.png": (24, 20), "c.jpg": (32, 32)}.items():
        _image(root / "JPEGImages" / name, w, h)
    ann = root / "Annotations"
    ann.mkdir(parents=True)
    (ann / "a.xml").write_text(_xml([("dog", 0, (1, 1, 10, 20)), ("cat", 1, (5, 6, 15, 16))], (40, 30)))
    (ann / "b.xml").write_text(_xml([("bird", 0, (2, 3, 12, 13))], filename="b.png"))
    (ann / "c.xml").write_text(_xml([("dog", 0, (11, 11, 30, 30))], (32, 32)))
    sets = root / "ImageSets" / "Main"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("a\nb\n")
    (sets / "val.txt").write_text("c\n")
    return root


def make_yolo(root: Path) -> Path:
    _image(root / "images" / "train" / "a.png", 200, 100)
    _image(root / "images" / "train" / "b.jpg", 64, 48)
    _image(root / "images" / "val" / "c.png", 100, 100)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.25 0.5\n1 0.125 0.5 0.375 0.5 0.25 0.875\n")
    (root / "labels" / "val" / "c.txt").write_text("1 0.5 0.5 0.5 0.5\n\n")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames:\n  0: cat\n  1: dog\n")
    return root


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    return make_voc(tmp_path / "voc")


@pytest.fixture
def yolo_root(tmp_path: Path) -> Path:
    return make_yolo(tmp_path / "yolo")


def _dataset(folder, split: str) -> CocoDetection:
    return CocoDetection(folder.splits[split], folder.image_dirs[split])


# -------------------------------------------------------------------------------------- VOC
def test_voc_corners_classes_and_difficult(voc_root):
    folder = read_voc(voc_root, ("train", "val"))
    assert folder.problems == [] and folder.class_names == ["bird", "cat", "dog"]
    train = _dataset(folder, "train")
    image, target = train[0]  # a.jpg
    assert image.shape == (3, 30, 40) and target["orig_size"] == (30, 40)
    # x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax: dog (1, 1, 10, 20) -> (0, 0, 10, 20);
    # the difficult cat (5, 6, 15, 16) -> (4, 5, 15, 16), an ignore region.
    assert_close(target["boxes"], torch.tensor([[0.0, 0.0, 10.0, 20.0], [4.0, 5.0, 15.0, 16.0]]))
    assert target["labels"].tolist() == [2, 1]  # dog, cat in bird < cat < dog
    assert target["iscrowd"].tolist() == [False, True]
    # b.png: no <size>, 24x20 read from the file; bird (2, 3, 12, 13) -> (1, 2, 12, 13)
    image, target = train[1]
    assert target["orig_size"] == (20, 24) and image.shape == (3, 20, 24)
    assert_close(target["boxes"], torch.tensor([[1.0, 2.0, 12.0, 13.0]]))
    assert folder.splits["train"]["annotations"][0] == {
        "id": 1, "image_id": 1, "category_id": 3, "bbox": [0.0, 0.0, 10.0, 20.0],
        "area": 200.0, "iscrowd": 0}  # 10 x 20  # fmt: skip
    assert folder.origins["train"][2] == f"{voc_root / 'Annotations' / 'a.xml'} object 2"
    val = _dataset(folder, "val")
    assert val.class_names == ["bird", "cat", "dog"]  # every split has all K classes
    assert_close(val[0][1]["boxes"], torch.tensor([[10.0, 10.0, 30.0, 30.0]]))


def test_voc_keep_difficult_and_given_classes(voc_root):
    kept = read_voc(voc_root, ("train",), keep_difficult=True)
    assert [a["iscrowd"] for a in kept.splits["train"]["annotations"]] == [0, 0, 0]
    given = read_voc(voc_root, ("train", "val"), classes=("dog", "cat", "bird"))
    assert given.problems == []
    _, target = _dataset(given, "train")[0]
    assert target["labels"].tolist() == [0, 1]  # dog, cat in the order given
    assert _dataset(given, "train").class_names == ["dog", "cat", "bird"]


def test_voc_unknown_class_names_the_object(voc_root):
    folder = read_voc(voc_root, ("train",), classes=("dog", "bird"))
    assert folder.problems == [("unknown_class", f"{voc_root / 'Annotations' / 'a.xml'} object 2: "
                                                 "class 'cat' is not among the classes ['dog', 'bird']")]
    assert len(folder.splits["train"]["annotations"]) == 2  # the cat is left out
    with pytest.raises(ValueError) as e:
        folder.raise_on_problems()
    assert str(e.value) == (f"{voc_root / 'Annotations' / 'a.xml'} object 2: class 'cat' is not among "
                            f"the classes ['dog', 'bird']; list them all with: retina data check "
                            f"--root {voc_root} --format voc --splits train --classes dog,bird")  # fmt: skip


def test_the_suggested_check_reads_the_folder_as_training_did(voc_root, capsys):
    # a split other than train/val and a class list: the check command in the error repeats
    # both, so it finds the problem training stopped on (without them: no trainval.txt, and
    # no class list to find 'cat' missing from)
    main_dir = voc_root / "ImageSets" / "Main"
    (main_dir / "trainval.txt").write_text((main_dir / "train.txt").read_text())
    folder = read_voc(voc_root, ("trainval", "val"), classes=("dog", "bird"))
    with pytest.raises(ValueError) as e:
        folder.raise_on_problems()
    command = str(e.value).split("list them all with: ")[1]
    assert command == f"retina data check --root {voc_root} --format voc --splits trainval,val --classes dog,bird"
    capsys.readouterr()
    assert main(shlex.split(command)[1:]) == 1
    assert "class 'cat' is not among the classes ['dog', 'bird']" in capsys.readouterr().out


def test_voc_bad_files_are_one_line_problems(voc_root):
    ann = voc_root / "Annotations"
    (ann / "a.xml").write_text("<annotation>\n<object><name>dog</name>\n</annotation>")
    (ann / "b.xml").write_text(_xml([("bird", 0, (2, 3, "x", 13))], (24, 20)))
    (ann / "c.xml").write_text(_xml([("dog", 0, (1, 1, 5, 5))]))  # no size, and no image:
    (voc_root / "JPEGImages" / "c.jpg").unlink()
    (voc_root / "ImageSets" / "Main" / "val.txt").write_text("c\n\nd\n")  # d.xml does not exist
    folder = read_voc(voc_root, ("train", "val"))
    assert folder.problems == [
        ("malformed_label", f"{ann / 'a.xml'}:3:2: not valid XML (mismatched tag)"),
        ("malformed_label", f"{ann / 'b.xml'} object 1: <xmax> is 'x', not a number"),
        ("missing_file", f"{voc_root / 'JPEGImages' / 'c.jpg'}: image not found "
                         f"({ann / 'c.xml'} gives no <size>)"),
        ("missing_annotation", f"{ann / 'd.xml'}: not found (listed in "
                               f"{voc_root / 'ImageSets' / 'Main' / 'val.txt'}:3)"),
    ]  # fmt: skip
    assert folder.splits["train"]["images"] == [] and folder.splits["val"]["images"] == []
    with pytest.raises(FileNotFoundError, match=r"test.txt not found: a VOC folder lists"):
        read_voc(voc_root, ("test",))


# ------------------------------------------------------------------------------------- YOLO
def test_yolo_normalised_boxes_to_pixels(yolo_root):
    folder = read_yolo(yolo_root, ("train", "val"))
    assert folder.problems == [] and folder.class_names == ["cat", "dog"]
    train = _dataset(folder, "train")
    assert [train.coco.imgs[i]["file_name"] for i in train.ids] == ["images/train/a.png",
                                                                   "images/train/b.jpg"]
    image, target = train[0]
    assert image.shape == (3, 100, 200)
    # cat 0.5 0.5 0.25 0.5 on 200 x 100: x1 = (0.5 - 0.25 / 2) * 200 = 75, x2 = 75 + 0.25 * 200
    # = 125, y1 = (0.5 - 0.5 / 2) * 100 = 25, y2 = 25 + 0.5 * 100 = 75.
    # dog segment (0.125, 0.5) (0.375, 0.5) (0.25, 0.875): x in [0.125, 0.375] * 200 = [25, 75],
    # y in [0.5, 0.875] * 100 = [50, 87.5].
    assert_close(target["boxes"], torch.tensor([[75.0, 25.0, 125.0, 75.0], [25.0, 50.0, 75.0, 87.5]]))
    assert target["labels"].tolist() == [0, 1] and target["iscrowd"].tolist() == [False, False]
    image, target = train[1]  # b.jpg: no label file, an image without objects
    assert image.shape == (3, 48, 64) and target["boxes"].shape == (0, 4)
    _, target = _dataset(folder, "val")[0]
    assert_close(target["boxes"], torch.tensor([[25.0, 25.0, 75.0, 75.0]]))  # 0.25..0.75 of 100
    assert folder.origins["val"][1] == f"{yolo_root / 'labels' / 'val' / 'c.txt'}:1"


def test_windows_text_files_read_as_the_same_folder(voc_root, yolo_root):
    # A byte-order mark and CRLF line ends (Windows Notepad's UTF-8) in VOC split files and YOLO
    # label files and image lists: the same records as the plain files; a repeated split line
    # lists its image once
    sets = voc_root / "ImageSets" / "Main"
    plain = read_voc(voc_root, ("train", "val"))
    (sets / "train.txt").write_bytes(b"\xef\xbb\xbfa\r\nb\r\na\r\n")
    windows = read_voc(voc_root, ("train", "val"))
    assert windows.problems == [] and windows.splits == plain.splits
    labels = yolo_root / "labels" / "train" / "a.txt"
    plain = read_yolo(yolo_root, ("train", "val"))
    labels.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes().replace(b"\n", b"\r\n"))
    (yolo_root / "train.txt").write_bytes(b"\xef\xbb\xbfimages/train/a.png\r\nimages/train/b.jpg\r\n")
    (yolo_root / "data.yaml").write_text((yolo_root / "data.yaml").read_text().replace("train: images/train",
                                                                                      "train: train.txt"))
    windows = read_yolo(yolo_root, ("train", "val"))
    assert windows.problems == [] and windows.splits == plain.splits


def test_yolo_yaml_variants(yolo_root):
    # names as a list, a .txt list of images, "path" relative to the yaml, the yaml as root
    (yolo_root / "val.txt").write_text("images/val/c.png\n")
    cfg = yolo_root / "sub" / "set.yaml"
    cfg.parent.mkdir()
    cfg.write_text("path: ..\ntrain: [images/train]\nval: val.txt\nnc: 2\nnames: [cat, dog]\n")
    folder = read_yolo(cfg, ("val",))
    assert folder.class_names == ["cat", "dog"] and folder.root == cfg
    assert folder.splits["val"]["images"][0]["file_name"] == "images/val/c.png"
    assert folder.image_dirs["val"] == cfg.parent / ".."
    cfg.write_text("path: ..\nval: val.txt\nnames: {'1': dog, '0': cat}\n")  # quoted ids, as ultralytics reads
    assert read_yolo(cfg, ("val",)).class_names == ["cat", "dog"]
    assert label_path(Path("/d/images/x/images/a.jpg")) == Path("/d/images/x/labels/a.txt")  # last
    assert label_path(Path("/d/pics/a.png")) == Path("/d/pics/a.txt")  # no images/ folder


@pytest.mark.parametrize("yaml_text, message", [
    ("train: images/train\nnames: [cat]\nnc: 2\n", "nc is 2 but 'names' has 1 names"),
    ("train: images/train\n", "'names' should be a non-empty list"),
    ("train: images/train\nnames: {0: cat, 2: dog}\n", "'names' keys should be the class ids 0..1"),
    ("names: [cat, dog]\n", "no 'train' entry (the images of split 'train')"),
    ("train: nowhere\nnames: [cat, dog]\n", "is neither a folder nor a .txt list of images"),
    ("train: [images/train\nnames: [cat]\n", "YAML syntax error"),
])  # fmt: skip
def test_yolo_bad_yaml_is_one_line(yolo_root, yaml_text, message):
    (yolo_root / "data.yaml").write_text(yaml_text)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        read_yolo(yolo_root, ("train",))
    assert message in str(e.value) and str(yolo_root / "data.yaml") in str(e.value)
    assert "\n" not in str(e.value)


def test_yolo_bad_label_lines_name_file_and_line(yolo_root):
    labels = yolo_root / "labels" / "train" / "a.txt"
    labels.write_text("0 0.5 0.5 0.25\nx 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.1 0.1\n0.5 0.5 0.5 0.1 0.1\n"
                      "0 0.5 nan 0.1 0.1\n1 0.5 0.5 0.5 0.5 0.5\n0 0.5 0.5 0.5 0.5\n")  # fmt: skip
    folder = read_yolo(yolo_root, ("train",))
    fields = "expected 'class cx cy w h' (5) or a segment 'class x1 y1 ... xn yn'"
    assert folder.problems == [
        ("malformed_label", f"{labels}:1: 4 fields; {fields}"),
        ("malformed_label", f"{labels}:2: not numbers: 'x 0.5 0.5 0.2 0.2'"),
        ("unknown_class", f"{labels}:3: class 2 is not a class id 0..1 (2 names in data.yaml)"),
        ("unknown_class", f"{labels}:4: class 0.5 is not a class id 0..1 (2 names in data.yaml)"),
        ("malformed_label", f"{labels}:5: not finite: '0 0.5 nan 0.1 0.1'"),
        ("malformed_label", f"{labels}:6: 6 fields; {fields}"),  # 5 numbers: x3 without y3
    ]  # fmt: skip
    assert len(folder.splits["train"]["annotations"]) == 1  # line 7 only
    assert folder.origins["train"][1] == f"{labels}:7"


# ------------------------------------------------------------------- detection, build, convert
def test_detect_format(voc_root, yolo_root, tmp_path):
    assert detect_format(voc_root) == "voc"
    assert detect_format(yolo_root) == "yolo" and detect_format(yolo_root / "data.yaml") == "yolo"
    assert detect_format(tmp_path) == "coco" and detect_format(tmp_path / "none") == "coco"
    (voc_root / "JPEGImages").rename(voc_root / "images")  # Annotations/ alone is not VOC
    assert detect_format(voc_root) == "coco"


def _data_cfg(root: Path, **keys):
    return config_from_dict({"data": {"dataset": "coco", "root": str(root), "num_workers": 0,
                                      "hflip_prob": 0.0, **keys}})  # fmt: skip


def test_build_dataset_reads_folders(voc_root, yolo_root):
    cfg = _data_cfg(voc_root)  # format auto
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val), train.num_classes) == (2, 1, 3)
    assert train.source == f"voc layout detected in {voc_root}, split 'train'"
    assert val.class_names == ["bird", "cat", "dog"] and val.cat_ids == [1, 2, 3]
    assert build_dataset(_data_cfg(voc_root, format="voc", keep_difficult=True), "train").source == \
        f"voc folder {voc_root}, split 'train'"
    yolo = build_dataset(_data_cfg(yolo_root / "data.yaml"), "val")
    assert yolo.class_names == ["cat", "dog"] and len(yolo) == 1
    # Splits by other names: VOC's trainval / test, or a YOLO yaml's keys
    (voc_root / "ImageSets" / "Main" / "trainval.txt").write_text("a\nb\nc\n")
    assert len(build_dataset(_data_cfg(voc_root, train_split="trainval"), "train")) == 3


def test_config_refuses_keys_the_format_does_not_read():
    with pytest.raises(ConfigError, match=r"--set data.classes=\[cat\]: data.classes=\('cat',\) does "
                                          r"not apply to data.format=yolo \(read for VOC folders only"):
        config_from_dict({}, ["data.format=yolo", "data.classes=[cat]"])
    with pytest.raises(ConfigError, match=r"data.train_ann=.* does not apply to data.format=voc"):
        config_from_dict({}, ["data.format=voc", "data.train_ann=x.json"])
    with pytest.raises(ConfigError, match=r"data.val_split='test' does not apply to data.format=coco"):
        config_from_dict({}, ["data.format=coco", "data.val_split=test"])
    with pytest.raises(ConfigError, match=r"data.format='voc' does not apply to data.dataset=shapes"):
        config_from_dict({}, ["data.dataset=shapes", "data.format=voc"])
    with pytest.raises(ConfigError, match=r"data.classes=\('a', 'a'\) names a class twice"):
        config_from_dict({}, ["data.classes=[a, a]"])
    cfg = config_from_dict({}, ["data.format=voc", "data.classes=[dog, cat]", "data.keep_difficult=true",
                                "data.train_split=trainval", "data.val_split=test"])  # fmt: skip
    assert cfg.data.classes == ("dog", "cat") and cfg.data.keep_difficult


def test_build_dataset_refuses_bad_folders(voc_root, yolo_root):
    (voc_root / "Annotations" / "b.xml").write_text("<annotation>")
    with pytest.raises(ValueError) as e:
        build_dataset(_data_cfg(voc_root), "val")  # any problem of either split stops training
    assert str(e.value).startswith(f"{voc_root / 'Annotations' / 'b.xml'}:1:12: not valid XML")
    assert f"retina data check --root {voc_root} --format voc" in str(e.value)
    with pytest.raises(ValueError, match="data.classes is read for VOC folders only"):
        build_dataset(_data_cfg(yolo_root, classes=["cat", "dog"]), "train")
    with pytest.raises(FileNotFoundError, match="data.yaml not found"):
        build_dataset(_data_cfg(voc_root, format="yolo"), "train")


def test_empty_split_is_refused(voc_root, tmp_path):
    # an empty val split scored AP 0.0 without a word; training now stops before it starts
    (voc_root / "ImageSets" / "Main" / "val.txt").write_text("\n")
    assert len(build_dataset(_data_cfg(voc_root), "train")) == 2
    with pytest.raises(ValueError, match=r"^the val set is empty: voc layout detected in .*split 'val' has no image$"):
        build_dataset(_data_cfg(voc_root), "val")
    from retina.engine.train import Trainer
    from tinyrun import tiny_config

    cfg = replace(tiny_config(tmp_path / "unused"), data=DataConfig(dataset="coco", root=str(voc_root), num_workers=0))
    with pytest.raises(ValueError, match="the val set is empty"):
        Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing trained or written


def test_train_refuses_val_json_with_other_classes(voc_root, tmp_path):
    # COCO json splits each carry their categories; a val json that names category 1 "dog" where
    # the train json names it "bird" would score the model's label 0 (bird) as dog, by position.
    from retina.engine.train import Trainer
    from tinyrun import tiny_config

    folder = read_voc(voc_root, ("train", "val"))
    val = dict(folder.splits["val"], categories=[{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"},
                                                 {"id": 3, "name": "bird"}])  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(folder.splits["train"]))
    (tmp_path / "val.json").write_text(json.dumps(val))
    data = DataConfig(dataset="coco", root=str(tmp_path), format="coco", num_workers=0,
                      train_ann="train.json", val_ann="val.json", train_images=str(voc_root / "JPEGImages"),
                      val_images=str(voc_root / "JPEGImages"))  # fmt: skip
    cfg = replace(tiny_config(tmp_path / "unused"), data=data)
    with pytest.raises(ValueError) as e:
        Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    assert str(e.value) == (f"the train set ({tmp_path / 'train.json'}) has the classes ['bird', 'cat', 'dog'] "
                            f"but the val set ({tmp_path / 'val.json'}) has ['dog', 'cat', 'bird']: both "
                            "splits need the same classes in the same order")
    assert not (tmp_path / "run" / "config.yaml").exists()  # stopped before anything was written
    # the same json for both splits trains
    Trainer(replace(cfg, data=dataclasses.replace(data, val_ann="train.json")), tmp_path / "run2",
            device="cpu", quiet=True)  # fmt: skip

def test_difficult_boxes_are_ignored_by_evaluation(voc_root):
    ds = _dataset(read_voc(voc_root, ("train",)), "train")
    # Detections = the 2 ordinary GT boxes (dog of a, bird of b) + one on a's difficult cat:
    # AP 100 for both classes with GT, and the cat detection, on an ignore region, counts
    # neither as a true nor as a false positive (the cat has no other GT: per-class AP NaN).
    results = [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 20], "score": 0.9},
               {"image_id": 2, "category_id": 1, "bbox": [1, 2, 11, 11], "score": 0.8},
               {"image_id": 1, "category_id": 2, "bbox": [4, 5, 11, 11], "score": 0.7}]
    metrics = evaluate_detections(ds.coco, results)
    assert metrics["AP"] == pytest.approx(100.0)
    assert metrics["per_class"]["dog"] == pytest.approx(100.0)
    assert np.isnan(metrics["per_class"]["cat"])


def test_convert_round_trip(voc_root, yolo_root, tmp_path, capsys):
    for root, fmt in ((voc_root, "voc"), (yolo_root, "yolo")):
        out = tmp_path / f"{fmt}_coco"
        assert main(["data", "convert", "--from", fmt, "--to", "coco", "--root", str(root),
                     "--out", str(out)]) == 0  # fmt: skip
        printed = capsys.readouterr().out.splitlines()
        folder = read_folder(root, fmt, ("train", "val"))
        assert printed[0] == folder.summary()
        assert printed[1].startswith(f"wrote {out / 'instances_train.json'}: 2 images")
        assert printed[-1].startswith(f"train on them with: --set data.root={out} data.format=coco")
        for split in ("train", "val"):
            loaded = CocoDetection(out / f"instances_{split}.json", folder.image_dirs[split])
            memory = _dataset(folder, split)
            assert loaded.class_names == memory.class_names and loaded.ids == memory.ids
            for i in range(len(memory)):
                for key in ("boxes", "labels", "iscrowd"):
                    assert torch.equal(loaded[i][1][key], memory[i][1][key]), (fmt, split, i, key)
        assert json.loads((out / "instances_val.json").read_text()) == folder.splits["val"]


def test_convert_leaves_out_boxes_without_area(voc_root, tmp_path, capsys):
    # c.xml's box with xmax < xmin: corners (20, 11, 15, 30) -> x1 = 19, x2 = 15, width -4, which
    # COCO cannot hold; the folder's own reader drops it when training
    (voc_root / "Annotations" / "c.xml").write_text(_xml([("dog", 0, (20, 11, 15, 30)),
                                                          ("dog", 0, (11, 11, 30, 30))], (32, 32)))
    assert read_folder(voc_root, "voc", ("val",)).splits["val"]["annotations"][0]["bbox"] == [19, 10, -4, 20]
    out = tmp_path / "coco"
    assert main(["data", "convert", "--from", "voc", "--to", "coco", "--root", str(voc_root),
                 "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    assert printed[2].startswith(f"wrote {out / 'instances_val.json'}: 1 images, 1 annotations") and \
        printed[2].endswith("; left out 1 boxes of zero or negative width or height "
                            f"(retina data check --root {voc_root} --format voc names them)")
    assert [a["bbox"] for a in json.loads((out / "instances_val.json").read_text())["annotations"]] == \
        [[10, 10, 20, 20]]


def test_convert_refuses_a_folder_with_problems(voc_root, tmp_path, capsys):
    (voc_root / "Annotations" / "c.xml").unlink()
    with pytest.raises(ValueError, match=r"c.xml: not found \(listed in .*val.txt:1\)"):
        convert_folder(read_folder(voc_root, "auto", ("train", "val")), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["data", "convert", "--root", str(voc_root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retina: error: ") and err.count("\n") == 1 and "c.xml" in err
    assert main(["data", "convert", "--root", str(voc_root)]) == 2
    assert "needs --root DIR (a VOC or YOLO folder) and --out DIR" in capsys.readouterr().err


def test_convert_refuses_a_folder_whose_photo_is_missing(voc_root, tmp_path, capsys):
    # c.xml gives the size, so the folder reads without opening c.jpg; the json would name a
    # photo that is not there
    (voc_root / "JPEGImages" / "c.jpg").unlink()
    assert read_folder(voc_root, "voc", ("train", "val")).problems == []
    assert main(["data", "convert", "--root", str(voc_root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == (f"retina: error: {voc_root / 'JPEGImages' / 'c.jpg'} not found, an image of split 'val'; "
                   f"list them all with: retina data check --root {voc_root} --format voc\n")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("fmt", ["voc", "yolo"])
def test_train_and_evaluate_on_a_folder(fmt, voc_root, yolo_root, tmp_path, capsys):
    from retina.engine.checkpoint import load_checkpoint
    from retina.engine.train import Trainer
    from tinyrun import tiny_config

    root = voc_root if fmt == "voc" else yolo_root
    cfg = tiny_config(tmp_path / "unused", solver={"max_iter": 3, "warmup_iters": 1, "batch_size": 2},
                      train={"checkpoint_period": 100})  # fmt: skip
    cfg = replace(cfg, data=DataConfig(dataset="coco", root=str(root), num_workers=0))
    metrics = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True).train()
    names = ["bird", "cat", "dog"] if fmt == "voc" else ["cat", "dog"]
    # 3 steps learn nothing measurable: the point is that every stage runs on the folder.
    assert 0.0 <= metrics["AP"] <= 100.0 and list(metrics["per_class"]) == names
    ckpt = load_checkpoint(tmp_path / "run" / "model_final.pth")
    assert ckpt["class_names"] == names and ckpt["cat_ids"] == list(range(1, len(names) + 1))
    assert ckpt["config"]["data"]["format"] == "auto"
    if fmt == "voc":  # `retina eval` finds the folder again from the saved config
        out = tmp_path / "eval"
        assert main(["eval", "--weights", str(tmp_path / "run"), "--device", "cpu", "--out", str(out),
                     "--set", "data.num_workers=0"]) == 0  # fmt: skip
        assert json.loads((out / "metrics.json").read_text())["AP"] == pytest.approx(metrics["AP"])
        # the same folder with its classes in another order: label 0 would be scored as "dog"
        capsys.readouterr()
        assert main(["eval", "--weights", str(tmp_path / "run"), "--device", "cpu", "--out", str(out),
                     "--set", "data.num_workers=0", "data.classes=[dog,cat,bird]"]) == 2
        assert re.fullmatch(r"retina: error: \S+ detects \['bird', 'cat', 'dog'\] but the val set "
                            r"\(.*\) has the classes \['dog', 'cat', 'bird'\]: .*\n", capsys.readouterr().err)


# ------------------------------------------------------------------------------ raccoon-voc
def test_raccoon_voc(raccoon_voc):
    folder = read_folder(raccoon_voc, "auto", ("train", "val"))
    assert folder.format == "voc" and folder.problems == [] and folder.class_names == ["raccoon"]
    counts = {s: (len(d["images"]), len(d["annotations"])) for s, d in folder.splits.items()}
    assert counts == {"train": (160, 174), "val": (40, 43)}  # shared/data/README.md
    assert folder.summary(detected=True) == (f"voc layout detected in {raccoon_voc} "
                                             "(160 train / 40 val images, 1 class)")
    train = build_dataset(_data_cfg(raccoon_voc), "train")
    assert train.coco.imgs[1]["file_name"] == "raccoon-1.jpg"  # first id of train.txt
    image, target = CocoDetection(folder.splits["train"], folder.image_dirs["train"])[0]
    # raccoon-1.xml: 650 x 417, xmin 81, ymin 88, xmax 522, ymax 408 -> (80, 87, 522, 408)
    assert image.shape == (3, 417, 650)
    assert_close(target["boxes"], torch.tensor([[80.0, 87.0, 522.0, 408.0]]))
