"""Tests for retina.model.resize (the one resize rule) and for who applies it: the data
pipeline for training (the model takes training images as they arrive), the model at inference
(``inference_size``), with no draw outside the seeded sample stream."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from retina.config import ConfigError, load_config
from retina.data import build_transforms
from retina.model import build_model
from retina.model.resize import axis_scale, eval_size, resize_scale, resized_size

TINY = ["model.backbone.depth=18", "model.fpn.channels=32", "model.head.num_convs=1",
        "model.num_classes=3", "model.input.max_size=200"]


def test_resized_size_by_hand():
    # 90 x 118 to 96: s = min(96 / 90, 160 / 118) = 1.0667; 118 * 1.0667 = 125.87 -> 126 rounded,
    # 125 floored (torchvision)
    assert resized_size(90, 118, 96, 160) == (96, 126)
    assert resized_size(90, 118, 96, 160, "torchvision") == (96, 125)
    # capped: s = min(80 / 40, 90 / 60) = 1.5 -> (60, 90)
    assert resize_scale(40, 60, 80, 90) == 1.5 and resized_size(40, 60, 80, 90) == (60, 90)
    # 100 x 70 to 64: s = 64 / 70; 100 * 64 / 70 = 91.43 -> 91
    assert resized_size(100, 70, 64, 1000) == (91, 64)
    # s = 1000 / 1001 = 0.999001, within 1e-3 of 1: kept as it is ("round"); 800 / 801 = 0.99875
    # is not: 1000 * 0.99875 = 998.75 -> 999
    assert resized_size(1001, 1300, 1000, 2000) == (1001, 1300)
    assert resized_size(801, 1000, 800, 1333) == (800, 999)
    # an extreme aspect ratio keeps at least a pixel: 2 x 2000 capped at 100 -> 0.1 px -> 1
    assert resized_size(2, 2000, 8, 100) == (1, 100)


def test_axis_scale_follows_the_rounded_size():
    # 100 x 70 -> 91 x 64: x times 64 / 70, y times 91 / 100 (not the nominal 64 / 70 on both)
    assert_close(axis_scale((91, 64), (100, 70)), torch.tensor([64 / 70, 91 / 100, 64 / 70, 91 / 100]))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 2000), st.integers(8, 1000), st.integers(8, 2000))
def test_a_resized_image_is_kept_as_it_is(height, width, min_size, max_size):
    # the rule is idempotent: what it gives, it leaves alone (a resized image is at its size)
    once = resized_size(height, width, min_size, max_size)
    assert resized_size(*once, min_size, max_size) == once


def model_at(*overrides: str):
    torch.manual_seed(0)
    return build_model(load_config(None, TINY + list(overrides)))


def test_training_with_several_sizes_keeps_the_pipelines_size_and_draws_nothing(monkeypatch):
    def no_global_rng(*args, **kwargs):
        raise AssertionError("Python's global RNG was used")

    for name in ("choice", "random", "randint", "uniform"):
        monkeypatch.setattr(random, name, no_global_rng)
    model = model_at("model.input.min_size=[64,96,128]").train()
    transform = build_transforms((64, 96, 128), 200, 0.5, train=True)
    images = [torch.randint(0, 256, (3, 90, 118), dtype=torch.uint8),
              torch.randint(0, 256, (3, 300, 150), dtype=torch.uint8)]
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])}
    for seed in range(6):
        torch.manual_seed(seed)  # what the sample stream does per sample
        pairs = [transform(img, dict(target)) for img in images]
        _, sizes, scales, new_targets = model.preprocess([p[0] for p in pairs], [p[1] for p in pairs])
        assert sizes == [tuple(p[0].shape[-2:]) for p in pairs] and scales == [1.0, 1.0]
        for (_, t), new in zip(pairs, new_targets):
            assert torch.equal(new["boxes"], t["boxes"])


@pytest.mark.parametrize("sizes", ["[64]", "[64,96]"])
def test_training_takes_each_image_at_the_size_it_arrives(sizes):
    # the training size is the data pipeline's: the model resizes nothing in training, with one
    # training size or several, and guesses nothing about what the pipeline did
    model = model_at(f"model.input.min_size={sizes}").train()
    target = [{"boxes": torch.tensor([[0.0, 0.0, 118.0, 90.0]]), "labels": torch.tensor([0])}]
    _, image_sizes, scales, new = model.preprocess([torch.zeros(3, 90, 118, dtype=torch.uint8)], target)
    assert image_sizes == [(90, 118)] and scales == [1.0]  # 90 is none of the training sizes
    assert torch.equal(new[0]["boxes"], target[0]["boxes"])
    losses = model([torch.zeros(3, 90, 118, dtype=torch.uint8)], target)
    assert torch.isfinite(losses["loss_cls"])


def test_the_pipeline_resizes_a_raw_training_image():
    # 90 x 118 to 64: s = 64 / 90; 118 * 64 / 90 = 83.9 -> 84; the boxes by the same per-axis factors
    from retina.data.transforms import resize

    target = {"boxes": torch.tensor([[0.0, 0.0, 118.0, 90.0]]), "labels": torch.tensor([0])}
    image, new = resize(torch.zeros(3, 90, 118, dtype=torch.uint8), target, 64, 200)
    assert image.shape == (3, 64, 84)
    assert_close(new["boxes"], torch.tensor([[0.0, 0.0, 84.0, 64.0]]))  # the edges stay on the edges


def test_eval_resizes_to_the_test_size_and_maps_back():
    model = model_at("model.input.min_size=[64,96]", "model.inference.score_thresh=0.0").eval()
    image = torch.randint(0, 256, (3, 150, 190), dtype=torch.uint8)
    # test size min_size[-1] = 96: s = 96 / 150; 190 * 0.64 = 121.6 -> 122
    assert model.preprocess([image])[1] == [(96, 122)]
    with torch.no_grad():
        boxes = model([image])[0]["boxes"]
    assert len(boxes) > 0 and boxes[:, 2].max() <= 190 and boxes[:, 3].max() <= 150


def test_test_size_keys_set_the_inference_size_only():
    model = model_at("model.input.min_size=[64,96]", "model.input.test_min_size=80",
                     "model.input.test_max_size=100").eval()
    image = torch.randint(0, 256, (3, 150, 190), dtype=torch.uint8)
    # s = min(80 / 150, 100 / 190) = 0.5263 (the cap binds): 150 * 0.5263 = 78.95 -> 79, 100
    assert model.eval_size == (80, 100)
    assert model.inference_size(150, 190) == (79, 100) and model.preprocess([image])[1] == [(79, 100)]
    # training keeps the training sizes: an image at min_size 64 (cap 200) is left as it is
    assert model.train().preprocess([torch.rand(3, 64, 81)])[1] == [(64, 81)]
    assert eval_size((64, 96), 200, None, None) == (96, 200)  # unset: the last training size
    assert eval_size((64, 96), 200, 80, None) == (80, 200)


def test_test_size_keys_are_range_checked():
    with pytest.raises(ConfigError, match="model.input.test_min_size"):
        load_config(None, TINY + ["model.input.test_min_size=0"])


def test_uint8_and_float_in_0_1_are_the_same_image_other_dtypes_refused():
    model = model_at("model.input.min_size=[64]", "model.inference.score_thresh=0.0").eval()
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    with torch.no_grad():
        as_uint8, as_float = model([image])[0], model([image.float() / 255])[0]
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(as_uint8[key], as_float[key]), key
    with pytest.raises(ValueError, match="uint8 .* or float in \\[0, 1\\], got torch.int64"):
        model([image.long()])
    with pytest.raises(ValueError, match=r"\(3, H, W\) .* image 0 is \(50, 70, 3\)"):
        model([image.permute(1, 2, 0)])
