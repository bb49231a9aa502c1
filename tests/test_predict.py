"""Tests for retina.engine.predict: listing inputs (files, folders, globs), detections.json,
drawn images, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from retina.data.coco import read_image, upright_size
from retina.data.formats import image_size
from retina.engine.predict import list_images, predict_paths
from retina.errors import InputError


class FixedModel(nn.Module):
    """Returns the same two detections for every image: one above and one below the 0.3
    threshold; records each input's (dtype, shape, max)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.dtype, tuple[int, ...], float]] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        self.seen += [(im.dtype, tuple(im.shape), float(im.max())) for im in images]
        return [
            {
                "boxes": torch.tensor([[4.0, 6.0, 20.0, 30.0], [1.0, 1.0, 2.0, 2.0]]),
                "scores": torch.tensor([0.93, 0.1]),
                "labels": torch.tensor([1, 0]),
            }
            for _ in images
        ]


def gray_png(path: Path, h: int, w: int, value: int = 128) -> None:
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(path)


def test_list_images_file_dir_and_errors(tmp_path: Path):
    for name in ["b.png", "a.JPG", "c.bmp", "d.jpeg", "e.webp", "f.TIF", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()  # a directory with an image suffix is not an image
    assert list_images(tmp_path) == [tmp_path / n for n in ["a.JPG", "b.png", "c.bmp", "d.jpeg", "e.webp", "f.TIF"]]
    assert list_images(tmp_path / "b.png") == [tmp_path / "b.png"]
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        list_images(tmp_path / "missing.jpg")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        list_images(empty)


def test_predict_writes_json_and_drawn_images(tmp_path: Path):
    src = tmp_path / "in"
    src.mkdir()
    gray_png(src / "one.png", 40, 50)
    gray_png(src / "two.png", 32, 32, value=255)
    out = tmp_path / "out"
    model = FixedModel()
    dets = predict_paths(model, list_images(src), out, class_names=["circle", "square"],
                         cat_ids=[3, 9], device="cpu", score_thresh=0.3, batch_size=1)  # fmt: skip
    # only score 0.93 >= 0.3 survives; [4, 6, 20, 30] XYXY -> [4, 6, 16, 24] XYWH; label 1 -> id 9
    expected = [
        {"file_name": name, "bbox": [4.0, 6.0, 16.0, 24.0], "score": 0.93, "category_id": 9,
         "category_name": "square"}  # fmt: skip
        for name in ["one.png", "two.png"]
    ]
    assert dets == expected
    assert json.loads((out / "detections.json").read_text()) == expected
    # inputs reached the model as decoded, uint8 (the model converts them itself)
    assert model.seen == [(torch.uint8, (3, 40, 50), 128.0), (torch.uint8, (3, 32, 32), 255.0)]
    drawn = read_image(out / "one.png")  # a PNG input is drawn as PNG: lossless
    assert drawn.shape == (3, 40, 50)
    # label 1 is drawn in palette colour (60, 180, 75): green well above red along the box's left
    # edge x = 4, y = 6..30; the gray background has G == R (ideal G - R = 180 - 60 = 120; > 30
    # is asked, the line's antialiasing aside).
    edge = drawn[:, 8:28, 4].float().mean(dim=1)  # (3,) mean RGB along the edge
    assert edge[1] - edge[0] > 30
    # the box's inside and a corner far from box and label (which goes below the box: no room
    # above it) stay gray 128, exactly: PNG
    for y, x in [(18, 12), (2, 45)]:
        assert drawn[:, y, x].tolist() == [128, 128, 128]
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "one.png", "two.png"]


def test_predict_unreadable_image_names_file_and_keeps_the_others(tmp_path: Path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    gray_png(src / "a.png", 20, 30)
    (src / "b.png").write_bytes(b"not an image at all")
    gray_png(src / "c.png", 20, 30)
    out = tmp_path / "out"
    model = FixedModel()
    with pytest.raises(ValueError, match=r"^1 of 3 images could not be read or run \(the first: bad image "
                                         r".*b\.png: cannot read it: .*\); the detections of the other 2 "
                                         r"are in .*detections\.json$") as info:
        predict_paths(model, list_images(src), out, ["a", "b"], [1, 2], "cpu", batch_size=2)
    assert "\n" not in str(info.value)  # one line
    assert capsys.readouterr().err.startswith("warning: skipping bad image ")
    # a and c were detected, drawn and written, in input order; b is neither
    assert [d["file_name"] for d in json.loads((out / "detections.json").read_text())] == ["a.png", "c.png"]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png", "detections.json"]
    assert len(model.seen) == 2


class OneSizeModel(FixedModel):
    """A static export: refuses images of another size than 20 x 30, as ``ExportedDetector`` does."""

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        for im in images:
            if tuple(im.shape[-2:]) != (20, 30):
                raise InputError(f"exported for input [1, 3, 20, 30]; got {tuple(im.shape)}")
        return super().forward(images)


def test_predict_skips_images_the_model_refuses_and_keeps_the_others(tmp_path: Path, capsys):
    # a static export stopped at the first image of another size and wrote nothing
    src = tmp_path / "in"
    src.mkdir()
    for name, (h, w) in {"a.png": (20, 30), "b.png": (40, 30), "c.png": (20, 30)}.items():
        gray_png(src / name, h, w)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"^1 of 3 images could not be read or run \(the first: .*b\.png: "
                                         r"exported for input \[1, 3, 20, 30\]; got \(3, 40, 30\)\)"):
        predict_paths(OneSizeModel(), list_images(src), out, ["a", "b"], [1, 2], "cpu", batch_size=3)
    assert "warning: skipping " in capsys.readouterr().err
    assert [d["file_name"] for d in json.loads((out / "detections.json").read_text())] == ["a.png", "c.png"]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png", "detections.json"]


def test_predict_that_reads_no_image_writes_nothing_and_says_so_in_one_line(tmp_path: Path, capsys):
    (tmp_path / "README.md").write_text("# not an image")
    (tmp_path / "b.png").write_bytes(b"not an image either")
    out = tmp_path / "out"
    for paths, head in (([tmp_path / "README.md"], "the image could not"),
                        ([tmp_path / "README.md", tmp_path / "b.png"], "none of the 2 images could")):
        with pytest.raises(InputError, match=rf"^{head} be read or run \(bad image .*README\.md: cannot read "
                                             rf"it: .*\); nothing was written$"):
            predict_paths(FixedModel(), paths, out, ["a", "b"], [1, 2], "cpu")
        assert not out.exists()  # no folder, no detections.json
        assert capsys.readouterr().err == ""  # no warning beside the error


def test_predict_draws_each_image_in_its_own_format(tmp_path: Path):
    # a.png and a.jpg keep their own names and formats; D.JPG and d.jpg in two folders are one name to a case-insensitive file system: the second gets _2; .mpo (a
    # JPEG of several frames) is not written by write_image: drawn as JPEG
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    inputs = {"a.png": "PNG", "a.jpg": "JPEG", "c.bmp": "BMP", "e.webp": "WEBP", "f.tif": "TIFF",
              "d1/D.JPG": "JPEG", "d2/d.jpg": "JPEG", "m.mpo": "JPEG"}
    for rel, fmt in inputs.items():
        Image.fromarray(np.full((16, 20, 3), 128, dtype=np.uint8)).save(tmp_path / rel, format=fmt)
    out = tmp_path / "out"
    predict_paths(FixedModel(), [tmp_path / rel for rel in inputs], out, ["a", "b"], [1, 2], "cpu")
    expected = {"a.png": "PNG", "a.jpg": "JPEG", "c.bmp": "BMP", "e.webp": "WEBP", "f.tif": "TIFF",
                "D.JPG": "JPEG", "d_2.jpg": "JPEG", "m.jpg": "JPEG"}
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected, "detections.json"])
    for name, fmt in expected.items():
        with Image.open(out / name) as im:
            assert (im.format, im.size) == (fmt, (20, 16)), name


def test_read_image_bmp(tmp_path: Path):
    # the datasets' decoder (PIL) reads BMP too: uint8 RGB (3, H, W)
    array = np.zeros((5, 7, 3), dtype=np.uint8)
    array[2, 3] = (10, 20, 30)
    Image.fromarray(array).save(tmp_path / "x.bmp")
    image = read_image(tmp_path / "x.bmp")
    assert image.dtype == torch.uint8 and image.shape == (3, 5, 7)
    assert image[:, 2, 3].tolist() == [10, 20, 30]


def test_read_image_16_bit_gray_keeps_its_top_byte(tmp_path: Path):
    # PIL's convert("RGB") clips 16-bit values to 255 (an almost white image); v >> 8 keeps them
    Image.fromarray(np.array([[0, 256, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    image = read_image(tmp_path / "g16.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 1, 4)
    assert image.tolist() == [[[0, 1, 128, 255]]] * 3


def test_read_image_applies_exif_orientation(tmp_path: Path):
    # a phone photo stored 7 wide x 5 high with EXIF orientation 6 ("rotate 90 degrees clockwise
    # to view"): viewers, labelling tools and detectron2 see it 5 wide x 7 high. A clockwise quarter
    # turn of an H-high image moves pixel (row r, col c) to (row c, col H - 1 - r): (2, 3) -> (3, 2).
    array = np.zeros((5, 7, 3), dtype=np.uint8)
    array[2, 3] = (10, 20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(tmp_path / "phone.png", exif=exif)
    image = read_image(tmp_path / "phone.png")
    assert image.shape == (3, 7, 5)
    assert image[:, 3, 2].tolist() == [10, 20, 30] and int(image.sum()) == 60
    with Image.open(tmp_path / "phone.png") as im:
        assert im.size == (7, 5) and upright_size(im) == (5, 7)
    assert image_size(tmp_path / "phone.png") == (5, 7)  # what VOC / YOLO folders check against
    # without the tag, the stored pixels as they are
    Image.fromarray(array).save(tmp_path / "plain.png")
    assert read_image(tmp_path / "plain.png")[:, 2, 3].tolist() == [10, 20, 30]


def test_predict_refuses_to_overwrite_input(tmp_path: Path):
    jpg = tmp_path / "photo.jpg"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(jpg)
    with pytest.raises(ValueError, match="overwrite"):
        predict_paths(FixedModel(), [jpg], tmp_path, ["a", "b"], [1, 2], "cpu")
    assert json.dumps(read_image(jpg).shape) == "[3, 8, 8]"  # input untouched


# ------------------------------------------------------------------- several inputs and globs
def image_tree(root: Path) -> Path:
    """root/a.jpg, root/d1/{b.png, notes.txt}, root/d2/{b.png, e.JPG}, root/deep/x/y.png."""
    for rel in ["a.jpg", "d1/b.png", "d1/notes.txt", "d2/b.png", "d2/e.JPG", "deep/x/y.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    return root


def test_list_images_several_paths_and_globs_in_order_once(tmp_path: Path):
    r = image_tree(tmp_path)
    # a file, a glob of files, a directory, a recursive glob, the first file again (kept once)
    found = list_images([r / "a.jpg", f"{r}/d1/*", r / "d2", f"{r}/**/y.png", str(r / "a.jpg")])
    assert found == [r / "a.jpg", r / "d1/b.png", r / "d2/b.png", r / "d2/e.JPG", r / "deep/x/y.png"]
    # a glob matching folders lists each (deep/ holds no image directly: nothing from it)
    assert list_images(f"{r}/d*") == [r / "d1/b.png", r / "d2/b.png", r / "d2/e.JPG"]


def test_list_images_errors_name_the_culprit_in_one_line(tmp_path: Path):
    r = image_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="no file or directory matches .*nothing/\\*.png") as e:
        list_images([r / "a.jpg", f"{r}/nothing/*.png"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no .* images in .*d1/\\*.txt"):  # matches, none an image
        list_images(f"{r}/d1/*.txt")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        list_images([r / "d1", r / "missing.png"])


def test_same_names_in_two_folders_get_distinct_outputs_and_records(tmp_path: Path):
    for folder in ["d1", "d2"]:
        (tmp_path / folder).mkdir()
        gray_png(tmp_path / folder / "b.png", 16, 16)
    gray_png(tmp_path / "d2" / "c.png", 16, 16)
    paths = list_images([tmp_path / "d1", tmp_path / "d2"])
    out = tmp_path / "out"
    dets = predict_paths(FixedModel(), paths, out, ["circle", "square"], [3, 9], "cpu")
    # both b.png are drawn (a shared stem gets the suffix, a shared name a count); in the JSON
    # they are told apart by their paths
    assert sorted(p.name for p in out.glob("*.png")) == ["b.png", "b_2.png", "c.png"]
    assert [d["file_name"] for d in dets] == [str(tmp_path / "d1/b.png"), str(tmp_path / "d2/b.png"),
                                              "c.png"]


def test_cli_predict_takes_several_inputs(tmp_path: Path, monkeypatch, capsys):
    from retina import cli, commands

    r = tmp_path / "in"
    (r / "d").mkdir(parents=True)
    for rel in ["one.png", "d/two.png", "d/three.png"]:
        gray_png(r / rel, 20, 24)
    model = FixedModel()
    monkeypatch.setattr(commands, "load_weights", lambda args: (model, None, ["circle", "square"], [3, 9], "cpu"))
    out = tmp_path / "out"
    assert cli.main(["predict", "-w", "unused.pth", "--input", str(r / "one.png"), f"{r}/d/t*.png",
                     "--out", str(out), "--score-thresh", "0.05"]) == 0
    # 3 images x 2 detections (scores 0.93 and 0.1, both >= 0.05)
    assert "6 detections in 3 images" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == ["one.png", "three.png", "two.png"]


def test_cli_predict_names_a_path_that_matches_nothing_before_loading(tmp_path: Path, capsys):
    from retina.cli import main

    gray_png(tmp_path / "a.png", 8, 8)
    # the weights do not exist either: the inputs are checked first
    code = main(["predict", "-w", str(tmp_path / "none.pth"), "--input", str(tmp_path),
                 f"{tmp_path}/nope/*.jpg"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err == f"retina: error: no file or directory matches {tmp_path}/nope/*.jpg"


class SizeScoreModel(nn.Module):
    """One detection per image whose score is the image's height / 100; records each call's shapes."""

    def __init__(self):
        super().__init__()
        self.calls: list[list[tuple[int, ...]]] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        self.calls.append([tuple(im.shape) for im in images])
        return [{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "scores": torch.tensor([im.shape[1] / 100]),
                 "labels": torch.tensor([0])} for im in images]


def test_predict_calls_the_model_once_per_image_size_and_keeps_input_order(tmp_path: Path):
    # a batch of sizes 40x50, 32x32, 40x50: the model sees [40x50, 40x50] then [32x32] (no padding
    # between sizes), and each record still carries its own image's score (height / 100)
    for name, h, w in [("a.png", 40, 50), ("b.png", 32, 32), ("c.png", 40, 50)]:
        gray_png(tmp_path / name, h, w)
    model = SizeScoreModel()
    dets = predict_paths(model, list_images(tmp_path), tmp_path / "out", class_names=["x"], cat_ids=[1],
                         device="cpu", score_thresh=0.0, batch_size=3)  # fmt: skip
    assert model.calls == [[(3, 40, 50), (3, 40, 50)], [(3, 32, 32)]]
    assert [(d["file_name"], d["score"]) for d in dets] == [("a.png", 0.4), ("b.png", 0.32), ("c.png", 0.4)]


def test_unused_dir_keeps_earlier_outputs(tmp_path: Path):
    from retina.io import unused_dir

    base = tmp_path / "runs" / "predict"
    assert unused_dir(base) == base and not base.parent.exists()  # does not exist; nothing made
    base.mkdir(parents=True)
    assert unused_dir(base) == base  # exists, empty
    (base / "detections.json").write_text("[]")
    (base.parent / "predict2").write_text("a file, not a folder")
    (base.parent / "predict3").mkdir()
    assert unused_dir(base) == base.parent / "predict3"  # the first free or empty one after it


def test_cli_predict_writes_under_runs_and_keeps_an_earlier_prediction(tmp_path: Path, monkeypatch, capsys):
    from retina import cli, commands

    gray_png(tmp_path / "one.png", 20, 24)
    model = FixedModel()
    monkeypatch.setattr(commands, "load_weights", lambda args: (model, None, ["circle", "square"], [3, 9], "cpu"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["predict", "-w", "unused.pth", "--input", "one.png"]) == 0
    first = (tmp_path / "runs/predict/detections.json").read_text()
    assert cli.main(["predict", "-w", "unused.pth", "--input", "one.png", "--score-thresh", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "1 detections in 1 images -> runs/predict/detections.json" in out
    assert "2 detections in 1 images -> runs/predict2/detections.json" in out
    assert (tmp_path / "runs/predict/detections.json").read_text() == first  # the first run's, untouched
    assert len(json.loads((tmp_path / "runs/predict2/detections.json").read_text())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "runs"]  # nothing else in the cwd


def test_cli_predict_that_reads_no_image_makes_no_folder(tmp_path: Path, monkeypatch, capsys):
    from retina import cli, commands

    (tmp_path / "README.md").write_text("# a project")
    monkeypatch.setattr(commands, "load_weights", lambda args: (FixedModel(), None, ["a", "b"], [1, 2], "cpu"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["predict", "-w", "unused.pth", "--input", "README.md"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retina: error: the image could not be read or run (bad image README.md: ")
    assert err.endswith("); nothing was written\n") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no runs/predict
