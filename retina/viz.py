"""Drawing boxes and class names on images, in one place: ``retina predict``'s drawn images, the
TensorBoard validation images, and any grid of training samples.

Labels stay readable at any image size: the font and the line width grow with the image's
shorter side (sub-linearly, so a 128 px image gets a small legible font and a photo no
banner-sized one), and each label is a filled tag kept whole inside the image: above its box,
else below it (both leave the box uncovered), else inside the box along its top edge; among
those, the first that overlaps no tag drawn before it.

Images are uint8 (3, H, W) RGB tensors in and out. Shape legend: D boxes of one image.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.ops import clip_boxes_to_image

from retina.io import atomic_write

# The files write_image writes: suffix -> PIL format.
IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF", ".webp": "WEBP"}

# Distinct colours for drawn boxes, indexed by class (contiguous label) modulo its length.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]  # fmt: skip

MIN_FONT_PX = 9  # legible at 100 % zoom; the font of a 128 px image
SMALLEST_FONT_PX = 6  # a caption wider than its image shrinks down to this, then is cut
JPEG_QUALITY = 90

Rect = tuple[float, float, float, float]  # a label tag's x1, y1, x2, y2 (half-open)


def font_px(height: int, width: int) -> int:
    """Label font size: 9 px at a 128 px shorter side, growing as its square root (18 px at
    512 px, 22 at 800), never below 9 px."""
    return max(MIN_FONT_PX, round(MIN_FONT_PX * (min(height, width) / 128) ** 0.5))


def line_px(height: int, width: int) -> int:
    """Box outline width: the shorter side / 250, rounded, at least 1 px (2 px at 500 px)."""
    return max(1, round(min(height, width) / 250))


def draw_boxes(image: Tensor, boxes: Tensor, captions: Sequence[str],
               color_ids: Optional[Sequence[int]] = None) -> Tensor:  # fmt: skip
    """Draw XYXY pixel boxes (D, 4) with their captions on a uint8 (3, H, W) image.

    ``color_ids`` (D ints, e.g. the class labels; default 0) pick each box's palette colour; an
    empty caption draws the box alone. Boxes are clipped to the image; a degenerate one is drawn
    as a line. Returns a new uint8 (3, H, W) image; ``image`` is not modified.
    """
    height, width = image.shape[-2:]
    if len(captions) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(captions)} captions")
    color_ids = [0] * len(boxes) if color_ids is None else [int(c) for c in color_ids]
    canvas = Image.fromarray(image.detach().cpu().permute(1, 2, 0).numpy())  # (H, W, 3)
    draw = ImageDraw.Draw(canvas)
    boxes = clip_boxes_to_image(boxes.detach().cpu().float(), (height - 1, width - 1))  # (D, 4)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2])  # PIL refuses x2 < x1
    line, size = line_px(height, width), font_px(height, width)
    for box, color_id in zip(boxes.tolist(), color_ids):
        draw.rectangle(box, outline=PALETTE[color_id % len(PALETTE)], width=line)
    taken: list[Rect] = []
    for box, caption, color_id in zip(boxes.tolist(), captions, color_ids):
        if caption:
            taken.append(_draw_tag(draw, size, caption, box, PALETTE[color_id % len(PALETTE)],
                                   (height, width), taken))  # fmt: skip
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()  # (3, H, W)


def draw_detections(image: Tensor, boxes: Tensor, labels: Tensor, scores: Tensor,
                    class_names: Sequence[str]) -> Tensor:  # fmt: skip
    """``draw_boxes`` with ``"<class> <score>"`` captions: boxes (D, 4) XYXY, labels (D,) in
    0..K-1, scores (D,). Returns a new uint8 (3, H, W) image."""
    label_list = labels.tolist()
    captions = [f"{class_names[c]} {s:.2f}" for c, s in zip(label_list, scores.tolist())]
    return draw_boxes(image, boxes, captions, label_list)


def write_image(image: Tensor, path: str | Path) -> Path:
    """Save a uint8 (3, H, W) image in the format its suffix names (``IMAGE_FORMATS``; JPEG and
    WebP at quality 90), atomically (``retina.io.atomic_write``, no fsync: drawings can be
    redrawn); the one way retina writes images."""
    path = Path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: images are written as {', '.join(IMAGE_FORMATS)}")
    buffer = io.BytesIO()
    pixels = Image.fromarray(image.detach().cpu().permute(1, 2, 0).numpy())  # (H, W, 3)
    pixels.save(buffer, format=fmt, **({"quality": JPEG_QUALITY} if fmt in ("JPEG", "WEBP") else {}))
    return atomic_write(path, buffer.getvalue(), fsync=False)


# ------------------------------------------------------------------------------ label tags
@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's own scalable font: no font file needed


def _tag_size(draw: ImageDraw.ImageDraw, text: str,
              size: int) -> tuple[ImageFont.ImageFont, int, int, int]:  # fmt: skip
    """(font, pad, tag width, tag height) of ``text`` at font ``size``."""
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(1, round((bottom - top) / 5))
    return font, pad, right - left + 2 * pad, bottom - top + 2 * pad


def _draw_tag(draw: ImageDraw.ImageDraw, size: int, text: str, box: list[float],
              color: tuple[int, int, int], image_size: tuple[int, int],
              taken: list[Rect]) -> Rect:  # fmt: skip
    """Draw ``text`` on a tag of ``color`` next to ``box`` (see the module docstring for where);
    returns the tag's (x1, y1, x2, y2)."""
    height, width = image_size
    font, pad, tag_w, tag_h = _tag_size(draw, text, size)
    if tag_w > width and size > SMALLEST_FONT_PX:  # shrink a caption wider than the image
        font, pad, tag_w, tag_h = _tag_size(draw, text, max(SMALLEST_FONT_PX, size * width // tag_w))
    left, top = draw.textbbox((0, 0), text, font=font)[:2]
    x1, y1, x2, y2 = box
    x = min(x1, width - tag_w) if tag_w <= width else 0.0  # left-aligned with the box, shifted in
    spots = [y1 - tag_h, y2 + 1, y1]  # above, below, inside along the top edge
    within = [y for y in spots if 0 <= y <= height - tag_h] or [max(min(y1, height - tag_h), 0)]
    free = [y for y in within if not any(_overlap((x, y, x + tag_w, y + tag_h), t) for t in taken)]
    y = (free or within)[0]
    rect = (x, y, x + tag_w, y + tag_h)  # half-open; PIL's rectangle includes its last pixel
    draw.rectangle((x, y, x + tag_w - 1, y + tag_h - 1), fill=color)
    ink = (0, 0, 0) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 140 else (255, 255, 255)
    draw.text((x + pad - left, y + pad - top), text, fill=ink, font=font)
    return rect


def _overlap(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
