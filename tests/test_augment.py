"""Photographic augmentations (retina/data/transforms.py): boxes follow the pixels, crowd flags
stay with their boxes, empty images survive, the default draws what flip + resize drew, and the
seeded sample stream makes every draw repeatable.

Where a transform moves the image by an offset we cannot know in advance (zoom-out, crop), the
test images carry their own coordinates: channel 0 holds x, channel 1 holds y and channel 2 is
255 (a marker the black fill does not have), so the offset is read from the output pixels and
the expected boxes are derived from it by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from retina.config import ConfigError, config_from_dict
from retina.data import build_dataset, generate_shapes
from retina.data.transforms import Augmentation, TrainTransform, hflip, identity, resize
from retina.data.sampler import SeededDataset
from tinyrun import TINY_DATA, tiny_config

H, W = 80, 120
BIG = 10_000  # a max_size that never binds


def coord_image(height: int = H, width: int = W) -> torch.Tensor:
    """uint8 (3, H, W): pixel (y, x) = (x, y, 255)."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([xs, ys, torch.full_like(xs, 255)]).to(torch.uint8)


def target_of(boxes: list[list[float]], crowd: list[bool]) -> dict:
    m = len(boxes)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(m, 4),
            "labels": torch.arange(m), "iscrowd": torch.tensor(crowd, dtype=torch.bool),
            "image_id": 7, "orig_size": (H, W)}


BOXES = [[10.0, 10.0, 30.0, 40.0], [60.0, 20.0, 100.0, 70.0], [0.0, 60.0, 12.0, 80.0],
         [100.0, 0.0, 120.0, 8.0], [40.0, 30.0, 80.0, 50.0]]  # fmt: skip
CROWD = [False, True, False, True, False]  # label k is crowd when k is odd


# ------------------------------------------------------------------------------ default
def test_default_draws_exactly_what_flip_and_resize_drew():
    """Augmentation() adds no draw: the same seed gives the same flip and size as the transform
    of before (one rand for the flip, one randint for the size)."""
    image, target = coord_image(), target_of(BOXES, CROWD)
    transform = TrainTransform((64, 96), BIG, 0.5)
    for seed in range(6):
        torch.manual_seed(seed)
        flip = torch.rand(()).item() < 0.5
        min_size = (64, 96)[int(torch.randint(2, ()).item())]
        ref_image, ref_target = hflip(image, target) if flip else (image, target)
        ref_image, ref_target = resize(ref_image, ref_target, min_size, BIG)
        torch.manual_seed(seed)
        out, out_target = transform(image, target)
        assert torch.equal(out, ref_image)
        assert torch.equal(out_target["boxes"], ref_target["boxes"])


# ----------------------------------------------------------------------------- geometry
def test_zoom_out_shifts_boxes_by_the_offset_of_the_image():
    fill = (0, 0, 0)
    transform = TrainTransform((H,), BIG, 0.0, Augmentation(zoom_out_prob=1.0, zoom_out_max=2.0, fill=fill))
    image, target = coord_image(), target_of(BOXES, CROWD)
    offsets = set()
    for seed in range(5):
        torch.manual_seed(seed)
        out, t = transform.photographic(image, target)
        canvas_h, canvas_w = out.shape[-2:]
        assert H <= canvas_h <= 2 * H and W <= canvas_w <= 2 * W  # side ratio in [1, 2]
        rows, cols = torch.nonzero(out[2] == 255, as_tuple=True)  # the image, not the fill
        top, left = int(rows.min()), int(cols.min())
        assert (int(rows.max()) - top + 1, int(cols.max()) - left + 1) == (H, W)  # pasted whole
        assert torch.equal(out[:, top:top + H, left:left + W], image)
        # x' = x + left, y' = y + top: every box moves with the pixels, none is dropped
        assert_close(t["boxes"], target["boxes"] + torch.tensor([left, top, left, top]), rtol=0, atol=0)
        assert torch.equal(t["labels"], target["labels"]) and torch.equal(t["iscrowd"], target["iscrowd"])
        offsets.add((top, left))
    assert len(offsets) > 1  # the place is drawn


def expected_crop(boxes: torch.Tensor, left: int, top: int, height: int, width: int) -> tuple:
    """By hand: a box is kept when its centre is strictly inside the crop (SSD's rule, as
    RandomIoUCrop), moved by (-left, -top), clipped to the crop, then dropped under 1 px."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    inside = (left < cx) & (cx < left + width) & (top < cy) & (cy < top + height)
    moved = boxes - torch.tensor([left, top, left, top], dtype=torch.float32)
    moved[:, 0::2] = moved[:, 0::2].clamp(0, width)
    moved[:, 1::2] = moved[:, 1::2].clamp(0, height)
    keep = inside & (moved[:, 2] - moved[:, 0] >= 1) & (moved[:, 3] - moved[:, 1] >= 1)
    return moved[keep], keep


def test_min_iou_crop_clips_boxes_and_drops_those_outside_with_their_crowd_flags():
    # crop_min_ious (0,): always a crop (never 1.0, "keep the image"), any IoU > 0 with a box
    aug = Augmentation(crop_prob=1.0, crop_min_ious=(0.0,), crop_min_scale=0.3)
    transform = TrainTransform((H,), BIG, 0.0, aug)
    image, target = coord_image(), target_of(BOXES, CROWD)
    dropped = clipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out, t = transform.photographic(image, target)
        height, width = out.shape[-2:]
        left, top = int(out[0, 0, 0]), int(out[1, 0, 0])  # the crop's first pixel says where it was
        assert torch.equal(out, image[:, top:top + height, left:left + width])
        boxes, keep = expected_crop(target["boxes"], left, top, height, width)
        assert_close(t["boxes"], boxes, rtol=0, atol=0)
        assert torch.equal(t["labels"], target["labels"][keep])
        assert torch.equal(t["iscrowd"], t["labels"] % 2 == 1)  # still the flag of its own box
        dropped += int((~keep).sum())
        clipped += int((boxes[:, 2:] < target["boxes"][keep][:, 2:] - torch.tensor([left, top])).any())
    assert dropped > 0 and clipped > 0  # both cases happened


def test_scale_jitter_down_pads_right_and_bottom_boxes_scaled():
    # Training size of an 80 x 120 image at min_size 80: 80 x 120 itself. s = 0.5 (fixed):
    # ScaleJitter -> 40 x 60 (x 0.5 exactly), smaller than 80 x 120: kept whole at the top-left,
    # padded with the fill to 80 x 120; boxes x 0.5.
    fill = (124, 116, 104)
    transform = TrainTransform((H,), BIG, 0.0, Augmentation(scale_jitter=(0.5, 0.5), fill=fill))
    image = torch.full((3, H, W), 200, dtype=torch.uint8)
    target = target_of(BOXES, CROWD)
    torch.manual_seed(0)
    out, t = transform(image, target)
    assert out.shape == (3, H, W)
    assert (out[:, :40, :60] == 200).all()
    assert (out[:, 40:, :] == torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1)).all()
    assert (out[:, :, 60:] == torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1)).all()
    assert_close(t["boxes"], target["boxes"] * 0.5, rtol=0, atol=0)
    assert torch.equal(t["iscrowd"], target["iscrowd"])


def test_scale_jitter_up_crops_a_window_boxes_follow_the_pixels():
    # s = 2: the 80 x 120 image becomes 160 x 240 and an 80 x 120 window is cut out of it. A white
    # 10 x 10 square under box [40, 20, 50, 30] becomes 20 x 20 at [80, 40, 100, 60]; in the window
    # at (left, top) its box is [80 - left, 40 - top, 100 - left, 60 - top], whose centre is the
    # centre of mass of the white pixels (the bilinear upscale is symmetric about it).
    transform = TrainTransform((H,), BIG, 0.0, Augmentation(scale_jitter=(2.0, 2.0)))
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    image[:, 20:30, 40:50] = 255
    target = target_of([[40.0, 20.0, 50.0, 30.0]], [False])
    seen = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out, t = transform(image, target)
        assert out.shape == (3, H, W)
        white = out[0].double()
        if len(t["boxes"]) == 1 and (t["boxes"][0, 2:] - t["boxes"][0, :2] == 20).all():  # whole
            ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
            centre = torch.stack([(white * (xs + 0.5)).sum(), (white * (ys + 0.5)).sum()]) / white.sum()
            box = t["boxes"][0].double()
            assert_close(centre, (box[:2] + box[2:]) / 2, rtol=0, atol=0.05)
            seen += 1
        elif len(t["boxes"]) == 0:  # cut off: a negative, flags dropped with it
            assert t["labels"].shape == (0,) and t["iscrowd"].shape == (0,)
    assert seen > 0


def test_empty_after_jitter_and_images_without_boxes_are_kept_as_negatives():
    everything = Augmentation(photometric_prob=1.0, zoom_out_prob=1.0, crop_prob=1.0,
                              crop_min_ious=(0.5,), scale_jitter=(2.0, 2.0))  # fmt: skip
    transform = TrainTransform((H,), BIG, 0.5, everything)
    empty = target_of([], [])
    corner = target_of([[0.0, 0.0, 10.0, 10.0]], [False])  # 20 x 20 after x 2: often cut off
    emptied = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out, t = transform(coord_image(), empty)
        assert min(out.shape[-2:]) == H and out.dtype == torch.uint8  # zoom-out changed the aspect
        assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["iscrowd"].shape == (0,)
        torch.manual_seed(seed)
        out, t = TrainTransform((H,), BIG, 0.0, Augmentation(scale_jitter=(2.0, 2.0)))(coord_image(), corner)
        assert out.shape == (3, H, W) and len(t["boxes"]) == len(t["labels"]) == len(t["iscrowd"])
        emptied += len(t["boxes"]) == 0
    assert emptied > 0


def test_photometric_changes_pixels_only():
    transform = TrainTransform((H,), BIG, 0.0, Augmentation(photometric_prob=1.0))
    image, target = coord_image(), target_of(BOXES, CROWD)
    torch.manual_seed(0)
    out, t = transform(image, target)
    assert out.dtype == torch.uint8 and out.shape == image.shape and not torch.equal(out, image)
    assert torch.equal(t["boxes"], target["boxes"]) and torch.equal(t["iscrowd"], target["iscrowd"])


# -------------------------------------------------------------------------- determinism
class _OneImage(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        return self.transform(coord_image(), target_of(BOXES, CROWD))


def test_sample_stream_seed_decides_every_draw():
    everything = Augmentation(photometric_prob=0.5, zoom_out_prob=0.5, zoom_out_max=3.0, crop_prob=0.5,
                              scale_jitter=(0.3, 2.0), fill=(124, 116, 104))  # fmt: skip
    stream = SeededDataset(_OneImage(TrainTransform((64, 96), 200, 0.5, everything)))
    before = torch.get_rng_state()
    a, b = stream[(0, 1234)], stream[(0, 1234)]
    assert torch.equal(torch.get_rng_state(), before)  # forked: the global stream is untouched
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    assert torch.equal(a[1]["iscrowd"], b[1]["iscrowd"])
    others = [stream[(0, seed)] for seed in range(1235, 1240)]
    assert any(o[0].shape != a[0].shape or not torch.equal(o[0], a[0]) for o in others)


# ------------------------------------------------------------------------------- config
def test_config_builds_the_augmentation_with_the_mean_pixel_fill(tmp_path):
    small = {**TINY_DATA, "num_train": 2, "num_val": 1}
    generate_shapes(tmp_path, **small)
    cfg = tiny_config(tmp_path, data={"shapes": small, "augment": {
        "zoom_out_prob": 0.5, "zoom_out_max": 3.0, "scale_jitter": [0.5, 1.5]}})
    train = build_dataset(cfg, "train")
    # fill = round(255 * (0.485, 0.456, 0.406)) = round(123.675, 116.28, 103.53)
    assert train.transforms.augment == Augmentation(zoom_out_prob=0.5, zoom_out_max=3.0,
                                                    scale_jitter=(0.5, 1.5), fill=(124, 116, 104))
    assert build_dataset(cfg, "val").transforms is identity
    image, target = train[0]
    assert image.shape[-2:] == (64, 64) and len(target["boxes"]) == len(target["iscrowd"])


@pytest.mark.parametrize("override, message", [
    ({"zoom_out_max": 2.0}, "data.augment.zoom_out_max=2.0 does not apply to data.augment.zoom_out_prob=0"),
    ({"crop_prob": 0.5, "crop_min_ious": [1.5]}, "data.augment.crop_min_ious=(1.5,) needs values in [0, 1]"),
    ({"scale_jitter": [0.05, 1.0]}, "must be [lo, hi] with 0.1 <= lo <= hi"),
    ({"photometric_prob": 2}, "data.augment.photometric_prob=2.0 must be in [0, 1]"),
])  # fmt: skip
def test_config_refuses_bad_augmentation_in_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"augment": override}})
    assert message in str(e.value) and "\n" not in str(e.value)
