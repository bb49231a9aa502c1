"""``retina data show``: training samples drawn as the model receives them.

The train split is read through the training sample stream itself (``retina.data.sampler.
train_stream``): the first N samples of a run with this config, in its order, each augmented with
its own seeded draws, so what is drawn is exactly what iteration 0 onwards is fed. The val split
has no augmentation: its images are drawn as they are (the model resizes them at inference).

Each sample is written as ``sample_<k>_id<image id>.png`` at the size the model gets it, with its
boxes and class names (``retina.viz.draw_boxes``); crowd / ignore boxes (COCO ``iscrowd``, VOC
``difficult``) are grey and captioned "<class> ignore". ``grid.png`` holds them all, each padded
to the largest size (``torchvision.utils.make_grid``), as detectron2's ``visualize_data.py`` and
mmdet's ``browse_dataset.py`` do.

Shape legend: M ground-truth boxes of one image.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

from retina.config import Config
from retina.data import build_dataset
from retina.data.sampler import train_stream
from retina.errors import UsageError
from retina.viz import PALETTE, draw_boxes, write_image

IGNORE_COLOR_ID = PALETTE.index((128, 128, 128))  # grey: crowd / ignore regions
GRID_PADDING = 4  # px of white between the grid's cells


def draw_sample(image: Tensor, target: dict, class_names: Sequence[str]) -> Tensor:
    """A uint8 (3, H, W) image with its target's boxes (M, 4) captioned by class; crowd boxes
    grey and captioned "<class> ignore"."""
    labels = target["labels"].tolist()  # (M,)
    crowd = target.get("iscrowd", torch.zeros(len(labels), dtype=torch.bool)).tolist()  # (M,)
    captions = [f"{class_names[c]} ignore" if ig else class_names[c] for c, ig in zip(labels, crowd)]
    colors = [IGNORE_COLOR_ID if ig else c for c, ig in zip(labels, crowd)]
    return draw_boxes(image, target["boxes"], captions, colors)


def grid_of(images: Sequence[Tensor]) -> Tensor:
    """uint8 (3, H, W) images of any sizes in one grid: each padded (white, right and bottom) to
    the largest height and width, ceil(sqrt(N)) per row."""
    height = max(int(img.shape[-2]) for img in images)
    width = max(int(img.shape[-1]) for img in images)
    padded = [F.pad(img, (0, width - img.shape[-1], 0, height - img.shape[-2]), value=255) for img in images]
    return make_grid(padded, nrow=math.ceil(math.sqrt(len(images))), padding=GRID_PADDING, pad_value=255)


def samples(cfg: Config, split: Literal["train", "val"],
            num: int) -> tuple[list[tuple[Tensor, dict]], list[str]]:  # fmt: skip
    """The first ``num`` samples the model gets from ``split`` (see the module docstring) and the
    class names."""
    dataset = build_dataset(cfg, split)
    if split == "val":
        return [dataset[i] for i in range(min(num, len(dataset)))], list(dataset.class_names)
    stream, sampler = train_stream(dataset, cfg, start=0)
    return [stream[item] for item in itertools.islice(sampler, num)], list(dataset.class_names)


def show(cfg: Config, split: Literal["train", "val"], num: int, out_dir: str | Path) -> list[Path]:
    """Draw the first ``num`` samples of ``split`` into ``out_dir``; returns the files written,
    the grid last."""
    if num < 1:
        raise UsageError(f"--num {num}: draw at least one sample")
    out_dir = Path(out_dir)
    drawn_samples, class_names = samples(cfg, split, num)
    written, drawn = [], []
    for k, (image, target) in enumerate(drawn_samples):
        drawn.append(draw_sample(image, target, class_names))
        written.append(write_image(drawn[-1], out_dir / f"sample_{k:03d}_id{target['image_id']}.png"))
    written.append(write_image(grid_of(drawn), out_dir / "grid.png"))
    return written


def data_show_cli(cfg: Config, split: Literal["train", "val"], num: int, out_dir: str | Path) -> int:
    written = show(cfg, split, num, out_dir)
    what = "after the configured augmentation, in training order" if split == "train" else "as read"
    print(f"{len(written) - 1} {split} samples {what} -> {Path(out_dir) / 'sample_*.png'}; "
          f"grid: {written[-1]}")
    return 0
