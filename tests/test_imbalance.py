"""``retina analyze imbalance``: counts on a small anchor grid derived by hand, the CE shares at
the prior and after "training" (a head whose logits are a known constant), COCO's anchor count,
the same grid read with absent classes (``data.shapes.extra_classes``), and ``--grid``."""

from __future__ import annotations

import math

import pytest
import torch

from retina.cli import main
from retina.config import config_from_dict, find_config, load_config
from retina.model import build_model
from retina.studies.imbalance import (Imbalance, anchors_per_image, coco_imbalance, initial_negative_share,
                                      measure, with_extra_classes)

# One FPN level, P4 (stride 16), on 64 x 64 images: a 4 x 4 grid of cells, offset 0.5 so the cell
# centres are 8, 24, 40, 56. Two anchors per cell (scales 1 and 1.5 of size 16, ratio 1): a
# 16 x 16 anchor that tiles the image and a concentric 24 x 24 one. R = 4 * 4 * 2 = 32. K = 3.
TINY_GRID = ["model.num_classes=3", "model.backbone.depth=18", "model.backbone.weights=null",
             "model.backbone.norm=bn", "model.fpn.channels=8", "model.fpn.min_level=4", "model.fpn.max_level=4",
             "model.anchors.sizes=[16]", "model.anchors.scales=[1,1.5]", "model.anchors.ratios=[1]",
             "model.anchors.offset=0.5", "model.head.num_convs=0", "model.input.min_size=[64]",
             "model.input.max_size=64", "model.input.size_divisibility=16"]
K, R = 3, 32
LOG_1_PI = -math.log(1 - 0.01)  # -log(1 - pi) = 0.01005: the CE of a negative pair at the prior
LOG_PI = -math.log(0.01)  # -log(pi) = 4.605: the CE of a positive pair at the prior


def _image(boxes: list[list[float]], labels: list[int]):
    return (torch.zeros(3, 64, 64, dtype=torch.uint8),
            {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)})


# Image 0: one box [16, 16, 32, 32] (class 2), exactly the small anchor of cell (1, 1): IoU 1,
# foreground. The large anchor of that cell, [12, 12, 36, 36], holds the box: IoU 256 / 576 =
# 0.444, in [0.4, 0.5): ignored. Every other anchor overlaps it by IoU <= 64 / 768 = 0.083:
# background. So 1 positive, 1 ignored, 30 background anchors.
# Image 1: no box; all 32 anchors background.
DATASET = [_image([[16, 16, 32, 32]], [2]), _image([], [])]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(config_from_dict({}, TINY_GRID)).eval()


def test_counts_on_a_hand_made_grid(tiny_model):
    stats, shares = measure(tiny_model, DATASET, 2, 0.01, torch.device("cpu"))
    assert shares is None  # no trained weights asked for
    # Per image, means of the two images: anchors (32 + 32) / 2; ignored (1 + 0) / 2; positives
    # (1 + 0) / 2; negative pairs: image 0 (32 - 1 ignored) * 3 - 1 positive = 92, image 1
    # 32 * 3 = 96, mean 94. Ratio of the means 94 / 0.5 = 188.
    assert stats == Imbalance(images=2, num_classes=K, prior=0.01, anchors=32.0, ignored=0.5, positives=0.5,
                              negative_pairs=94.0)
    assert stats.ratio == 188.0
    # Image 0 alone: 92 negative pairs, 1 positive.
    one, _ = measure(tiny_model, DATASET, 1, 0.01, torch.device("cpu"))
    assert (one.anchors, one.ignored, one.positives, one.negative_pairs) == (32.0, 1.0, 1.0, 92.0)


def test_initial_share_of_the_negatives_by_hand():
    # Image 0 at the prior: 30 background anchors x K pairs each -log(1 - pi), and the positive
    # anchor -log(pi) + (K - 1)(-log(1 - pi)); the ignored anchor costs nothing. The negatives'
    # share = (30 K + K - 1)(-log(1 - pi)) / ((30 K + K - 1)(-log(1 - pi)) - log(pi))
    #       = 92 x 0.0100503 / (92 x 0.0100503 + 4.60517) = 0.924631 / 5.529801 = 0.16721
    negatives = (30 * K + K - 1) * LOG_1_PI
    expected = negatives / (negatives + LOG_PI)
    assert initial_negative_share(92, 1, 0.01) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.16721, abs=1e-5)
    # No prior (bias 0): p = 0.5, every pair costs log 2, so the share is Q / (Q + P) = 92 / 93.
    assert initial_negative_share(92, 1, 0.5) == pytest.approx(92 / 93, rel=1e-12)
    assert initial_negative_share(0, 0, 0.01) == 0.0  # nothing to share
    # A COCO-like image, R = 100,000 anchors, K = 80, 100 positives: Q = 7,999,900;
    # 7,999,900 x 0.0100503 = 80,401.6 against 100 x 4.60517 = 460.5 -> 99.43%.
    assert initial_negative_share(7_999_900, 100, 0.01) == pytest.approx(80401.6 / (80401.6 + 460.517), rel=1e-5)


def test_trained_shares_with_a_constant_logit(tiny_model):
    """A head whose class logits are all b: p = sigmoid(b) everywhere, so the CE of each pair is known."""
    head = tiny_model.head.cls_logits
    saved = head.weight.detach().clone(), head.bias.detach().clone()
    try:
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(math.log(0.05 / 0.95))  # p = 0.05 < 0.1: every negative is easy
            _, easy = measure(tiny_model, DATASET, 2, 0.01, torch.device("cpu"), trained=True)
            head.bias.fill_(math.log(0.2 / 0.8))  # p = 0.2: no negative is easy
            _, hard = measure(tiny_model, DATASET, 2, 0.01, torch.device("cpu"), trained=True)
    finally:
        with torch.no_grad():
            head.weight.copy_(saved[0])
            head.bias.copy_(saved[1])
    # Totals over both images: 188 negative pairs at -log(1 - 0.05) = 0.051293 each, 1 positive at
    # -log(0.05) = 2.995732: easy share = 188 x 0.051293 / (188 x 0.051293 + 2.995732)
    #                                   = 9.643151 / 12.638883 = 0.76298
    neg, pos = 188 * -math.log(0.95), -math.log(0.05)
    assert easy.easy_negative_share == pytest.approx(neg / (neg + pos), rel=1e-5)
    assert easy.negative_share == pytest.approx(neg / (neg + pos), rel=1e-5)
    assert easy.easy_fraction == 1.0
    # p = 0.2: 188 x -log(0.8) = 41.951 against -log(0.2) = 1.609: negatives carry 96.3%, easy none.
    neg, pos = 188 * -math.log(0.8), -math.log(0.2)
    assert hard.negative_share == pytest.approx(neg / (neg + pos), rel=1e-5)
    assert (hard.easy_negative_share, hard.easy_fraction) == (0.0, 0.0)


def test_coco_figures_from_the_anchor_count():
    cfg = load_config(find_config("retinanet_r50_fpn_1x_coco"))
    # 800 x 1333 padded to multiples of 128: 896 x 1408. Cells per level P3..P7 (stride 8..128):
    # 112 x 176 + 56 x 88 + 28 x 44 + 14 x 22 + 7 x 11 = 19,712 + 4,928 + 1,232 + 308 + 77
    # = 26,257; x 9 anchors = 236,313.
    assert anchors_per_image(cfg, 800, 1333) == 236_313
    coco = coco_imbalance(cfg, positives=100)
    # Q = 236,313 x 80 - 100 = 18,904,940 negative pairs; 1:189,049.
    assert (coco.anchors, coco.negative_pairs, coco.ratio) == (236_313.0, 18_904_940.0, 189_049.4)
    # 18,904,940 x 0.0100503 = 189,999.7 against 100 x 4.60517 = 460.5: 99.758%
    assert coco.initial_negative_share == pytest.approx(189999.7 / (189999.7 + 460.517), rel=1e-6)


def test_cli_prints_the_table(tiny_shapes_overrides, capsys):
    assert main(["analyze", "imbalance", "--config", "shapes", "--num-images", "4", "--device", "cpu",
                 "--set", *tiny_shapes_overrides, "model.input.min_size=[64]", "model.input.max_size=64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| set | images | K | anchors R |") and "| shapes | 4 | 3 |" in out
    assert main(["analyze", "imbalance"]) == 2  # needs a config, a run or --coco
    assert "needs --config C, --weights RUN or --coco" in capsys.readouterr().err


def test_cli_with_trained_weights(tiny_shapes_overrides, tmp_path, capsys):
    """Two training steps of a tiny model, then the imbalance of its run: the trained shares too."""
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {backbone: {depth: 18}, fpn: {channels: 16, max_level: 5}, "
                      "anchors: {sizes: [8, 16, 32]}, head: {num_convs: 1, norm: gn}, "
                      "input: {min_size: [64], max_size: 64, size_divisibility: 32}}\n"
                      "data: {num_workers: 0}\nsolver: {batch_size: 2, max_iter: 2, warmup_iters: 1}\n"
                      "train: {log_period: 1, tb_images: 0, eval_at_end: false}\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--device", "cpu",
                 "--set", *tiny_shapes_overrides]) == 0
    capsys.readouterr()
    assert main(["analyze", "imbalance", "--weights", str(run), "--num-images", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| run |"))
    assert row.startswith("| run | 4 | 3 |") and row.endswith("% |")  # a trained share, not "-"
    assert "run: after training, negatives carry" in out


def _shapes_split(root, extra_classes: int):
    """DATASET's two images as a shapes split read with ``extra_classes`` absent classes: black
    64 x 64 PNGs, image 1 with one circle (category 2, label 1) at [16, 16, 32, 32]."""
    from PIL import Image

    from retina.data.coco import CocoDetection
    from retina.data.shapes import categories, with_absent_classes

    root.mkdir(exist_ok=True)
    for name in ("0.png", "1.png"):
        Image.new("RGB", (64, 64)).save(root / name)
    coco = {"images": [{"id": 1, "file_name": "0.png", "width": 64, "height": 64},
                       {"id": 2, "file_name": "1.png", "width": 64, "height": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [16, 16, 16, 16],
                             "area": 256, "iscrowd": 0}],
            "categories": categories(0)}
    return CocoDetection(with_absent_classes(coco, extra_classes), root)


@pytest.mark.parametrize("extra, k, negative_pairs, share", [
    # E = 0, K = 3: image 0 (32 - 1 ignored) x 3 - 1 positive = 92, image 1 32 x 3 = 96: mean 94.
    # share = 94 x 0.0100503 / (94 x 0.0100503 + 0.5 x 4.60517) = 0.944732 / 3.247317 = 0.29093
    (0, 3, (92 + 96) / 2, 0.29093),
    # E = 5, K = 8: (32 - 1) x 8 - 1 = 247 and 32 x 8 = 256: mean 251.5, i.e. 94 + 5 x (32 - 0.5).
    # share = 251.5 x 0.0100503 / (251.5 x 0.0100503 + 0.5 x 4.60517) = 2.527659 / 4.830245 = 0.52330
    (5, 8, (247 + 256) / 2, 0.52330),
])
def test_absent_classes_add_negative_pairs_only(tmp_path, extra, k, negative_pairs, share):
    """The hand-made grid above read as a shapes split with E absent classes: K = 3 + E comes
    from the data, and only Q grows, by (R - ignored) per absent class; R, ignored and P stay."""
    dataset = _shapes_split(tmp_path / "split", extra)
    assert dataset.num_classes == k
    torch.manual_seed(0)
    cfg = config_from_dict({}, [*TINY_GRID, f"model.num_classes={dataset.num_classes}"])
    model = build_model(cfg).eval()
    stats, _ = measure(model, dataset, 2, 0.01, torch.device("cpu"))
    # R = 32 per image; image 0: 1 ignored, 1 positive; image 1: none; means 0.5 and 0.5.
    assert stats == Imbalance(images=2, num_classes=k, prior=0.01, anchors=32.0, ignored=0.5, positives=0.5,
                              negative_pairs=negative_pairs)
    neg, pos = negative_pairs * LOG_1_PI, 0.5 * LOG_PI
    assert stats.initial_negative_share == pytest.approx(neg / (neg + pos), rel=1e-12)
    assert stats.initial_negative_share == pytest.approx(share, abs=1e-5)


def test_more_absent_classes_derived_from_one_measurement():
    # The grid above at E = 0 (94 negative pairs, R 32, 0.5 ignored, 0.5 positive per image) with
    # 5 absent classes more: K 8 and 94 + 5 x (32 - 0.5) = 251.5, as measured at E = 5 above.
    at_0 = Imbalance(images=2, num_classes=3, prior=0.01, anchors=32.0, ignored=0.5, positives=0.5,
                     negative_pairs=94.0)
    assert with_extra_classes(at_0, 5) == Imbalance(images=2, num_classes=8, prior=0.01, anchors=32.0, ignored=0.5,
                                                    positives=0.5, negative_pairs=251.5)
    assert with_extra_classes(at_0, 5).initial_negative_share == pytest.approx(0.52330, abs=1e-5)


def test_cli_grid_parses_and_gives_one_row_per_value(tiny_shapes_overrides, capsys):
    from retina.cli import build_parser

    args = build_parser().parse_args(["analyze", "imbalance", "--config", "shapes", "--grid", "a=1,2", "b=3",
                                      "--grid", "c=4"])
    assert args.grid == ["a=1,2", "b=3", "c=4"]  # nargs="+", and repeated flags add up
    assert main(["analyze", "imbalance", "--config", "shapes", "--num-images", "2", "--device", "cpu",
                 "--set", *tiny_shapes_overrides, "model.input.min_size=[64]", "model.input.max_size=64",
                 "--grid", "data.shapes.extra_classes=0,5"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("| shapes extra_classes=0", "2", "3"),
                                                  ("| shapes extra_classes=5", "2", "8")]  # K = 3 + E
    assert rows[0][3:5] == rows[1][3:5]  # the same anchors R and positives P
    assert main(["analyze", "imbalance", "--weights", "some_run",
                 "--grid", "data.shapes.extra_classes=0,5"]) == 2
    assert "a grid is measured on --config C, without --weights" in capsys.readouterr().err
