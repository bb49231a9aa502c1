"""``retina data show``: the files it writes, that they hold the training stream's own samples
(the trainer's first batch), and where the boxes are drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from retina.cli import main
from retina.config import config_to_dict
from retina.data import build_dataset, generate_shapes
from retina.data.show import draw_sample, samples
from retina.engine.train import Trainer
from retina.viz import PALETTE
from tinyrun import TINY_DATA, tiny_config

AUGMENT = {"photometric_prob": 0.5, "zoom_out_prob": 0.5, "crop_prob": 0.5, "scale_jitter": [0.5, 1.5]}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, **TINY_DATA)
    cfg = tiny_config(root, data={"augment": AUGMENT}, solver={"batch_size": 4})
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return cfg, path


def read_png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)  # (3, H, W)


def test_show_writes_one_png_per_sample_and_a_grid(config, tmp_path, capsys):
    cfg, path = config
    out = tmp_path / "show"
    assert main(["data", "show", "--config", str(path), "--num", "5", "--out", str(out)]) == 0
    drawn = sorted(out.glob("sample_*.png"))
    assert len(drawn) == 5 and (out / "grid.png").is_file()
    assert "5 train samples" in capsys.readouterr().out
    # 5 images of 64 x 64 (the training size; jitter crops or pads back to it), ceil(sqrt(5)) = 3
    # per row: 3 columns x 2 rows of 64 px cells with 4 px padding around and between them:
    # width 3 * (64 + 4) + 4 = 208, height 2 * (64 + 4) + 4 = 140.
    assert read_png(out / "grid.png").shape == (3, 140, 208)
    # Each file is the training stream's sample k, drawn: the trainer's first batch, in order.
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    images, targets = next(iter(trainer._loader()))  # batch of 4: the stream's positions 0..3
    stream, class_names = samples(cfg, "train", 5)
    for k, (image, target) in enumerate(stream[:4]):
        assert torch.equal(image, images[k]) and torch.equal(target["boxes"], targets[k]["boxes"])
        assert drawn[k].name == f"sample_{k:03d}_id{target['image_id']}.png"
        assert torch.equal(read_png(drawn[k]), draw_sample(image, target, class_names))


def test_box_edges_are_drawn_where_the_boxes_are_crowd_in_grey():
    image = torch.zeros(3, 100, 120, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[20.0, 30.0, 60.0, 90.0], [70.0, 40.0, 110.0, 95.0]]),
              "labels": torch.tensor([1, 0]), "iscrowd": torch.tensor([False, True])}
    drawn = draw_sample(image, target, ["cat", "dog"])
    # A 100 px shorter side draws 1 px lines (round(100 / 250) = 0 -> at least 1): the left edge
    # of box 0 is column 20, rows 30..90, in class 1's colour; the crowd box's right edge,
    # column 110, rows 40..95, in grey (128, 128, 128).
    assert drawn[:, 60, 20].tolist() == list(PALETTE[1])
    assert drawn[:, 70, 110].tolist() == [128, 128, 128]
    assert drawn[:, 60, 40].tolist() == [0, 0, 0]  # inside a box: untouched


def test_val_split_is_drawn_as_read(config, tmp_path):
    cfg, path = config
    out = tmp_path / "val"
    assert main(["data", "show", "--config", str(path), "--split", "val", "--num", "2", "--out", str(out)]) == 0
    shown, class_names = samples(cfg, "val", 2)
    val = build_dataset(cfg, "val")
    drawn = sorted(out.glob("sample_*.png"))
    assert len(drawn) == 2
    for k in range(2):
        image, target = val[k]  # as read: no transform
        assert torch.equal(shown[k][0], image)
        assert torch.equal(read_png(drawn[k]), draw_sample(image, target, class_names))


def test_bad_num_is_one_line(config, capsys):
    _, path = config
    assert main(["data", "show", "--config", str(path), "--num", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "retina: error: --num 0: draw at least one sample"


def test_show_on_raccoon_voc(tmp_path, raccoon_voc):
    out = tmp_path / "raccoon"
    argv = ["data", "show", "--config", "shapes", "--num", "2", "--out", str(out), "--set",
            f"data.root={raccoon_voc}", "data.dataset=coco", "data.shapes.image_size=160",
            "model.input.min_size=[96]", "model.input.max_size=400", "data.augment.crop_prob=0.5"]
    assert main(argv) == 0
    drawn = sorted(out.glob("sample_*.png"))
    assert len(drawn) == 2 and min(read_png(drawn[0]).shape[-2:]) == 96  # the training size
