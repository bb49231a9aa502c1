"""Tests for retina.engine.predict: listing inputs, detections.json, drawn images, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.io import ImageReadMode, decode_image, write_png

from retina.engine.predict import list_images, predict_paths, read_image


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
    write_png(torch.full((3, h, w), value, dtype=torch.uint8), str(path))


def test_list_images_file_dir_and_errors(tmp_path: Path):
    for name in ["b.png", "a.JPG", "c.bmp", "d.jpeg", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()  # a directory with an image suffix is not an image
    assert list_images(tmp_path) == [tmp_path / n for n in ["a.JPG", "b.png", "c.bmp", "d.jpeg"]]
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
    # inputs reached the model as float [0, 1]: 255 -> 1.0, 128 -> 128/255
    assert model.seen == [(torch.float32, (3, 40, 50), pytest.approx(128 / 255)),
                          (torch.float32, (3, 32, 32), 1.0)]  # fmt: skip
    drawn = decode_image(str(out / "one.jpg"), mode=ImageReadMode.RGB)
    assert drawn.shape == (3, 40, 50)
    # label 1 is drawn in palette colour (60, 180, 75): green well above red along the box's left
    # edge x = 4, y = 6..30; the gray background has G == R. JPEG smears a 1-px line, hence the
    # margin (ideal G - R = 180 - 60 = 120; > 30 is asked).
    edge = drawn[:, 8:28, 4].float().mean(dim=1)  # (3,) mean RGB along the edge
    assert edge[1] - edge[0] > 30
    far = drawn[:, 38, 48].int()  # far from the box: still gray 128
    assert (far - 128).abs().max() < 10
    assert (out / "two.jpg").is_file()


def test_predict_unreadable_image_names_file(tmp_path: Path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(RuntimeError, match="broken.png") as info:
        predict_paths(FixedModel(), [bad], tmp_path / "out", ["a", "b"], [1, 2], "cpu")
    assert "\n" not in str(info.value)  # one line


def test_read_image_bmp_falls_back_to_pil(tmp_path: Path):
    # torchvision.io cannot decode BMP; read_image must still give uint8 RGB (3, H, W)
    array = np.zeros((5, 7, 3), dtype=np.uint8)
    array[2, 3] = (10, 20, 30)
    Image.fromarray(array).save(tmp_path / "x.bmp")
    image = read_image(tmp_path / "x.bmp")
    assert image.dtype == torch.uint8 and image.shape == (3, 5, 7)
    assert image[:, 2, 3].tolist() == [10, 20, 30]


def test_predict_refuses_to_overwrite_input(tmp_path: Path):
    jpg = tmp_path / "photo.jpg"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(jpg)
    with pytest.raises(ValueError, match="overwrite"):
        predict_paths(FixedModel(), [jpg], tmp_path, ["a", "b"], [1, 2], "cpu")
    assert json.dumps(read_image(jpg).shape) == "[3, 8, 8]"  # input untouched
