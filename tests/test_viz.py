"""Tests for retina.viz: label size, where label tags go, writing images.

Drawn on a uniform gray 128 image, so a pixel of a palette colour can only be a box outline or a
label tag's fill (the text is a third colour: black or white, anti-aliased).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retina.viz import PALETTE, draw_boxes, draw_detections, font_px, line_px, write_image

RED, GREEN = PALETTE[0], PALETTE[1]  # (230, 25, 75), (60, 180, 75): class 0 and class 1


def gray(h: int = 128, w: int = 128) -> torch.Tensor:
    return torch.full((3, h, w), 128, dtype=torch.uint8)


def share(drawn: torch.Tensor, color: tuple[int, int, int], rows: slice, cols: slice) -> float:
    """Fraction of the pixels in ``rows`` x ``cols`` of exactly ``color``."""
    region = drawn[:, rows, cols]  # (3, h, w)
    hits = (region == torch.tensor(color, dtype=torch.uint8).view(3, 1, 1)).all(dim=0)
    return hits.float().mean().item()


def test_font_and_line_grow_with_the_image():
    # font 9 * sqrt(side / 128): 9 at 128; sqrt(512 / 128) = 2 -> 18; sqrt(800 / 128) = 2.5 ->
    # 22.5, rounded half to even -> 22; a 64 px image keeps the 9 px floor (9 * 0.71 = 6.4)
    assert [font_px(128, 128), font_px(512, 700), font_px(800, 1333), font_px(64, 64)] == [9, 18, 22, 9]
    # line: side / 250 rounded, at least 1: 128 / 250 = 0.51 -> 1; 500 / 250 = 2; 800 / 250 = 3.2 -> 3
    assert [line_px(128, 128), line_px(500, 650), line_px(800, 1333)] == [1, 2, 3]


def test_draws_on_a_copy_and_no_boxes_is_the_image():
    image = gray()
    drawn = draw_boxes(image, torch.tensor([[10.0, 20.0, 60.0, 70.0]]), ["cat"], [0])
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, 128, 128)
    assert torch.equal(image, gray())  # the input is not modified
    assert drawn[:, 45, 10].tolist() == list(RED)  # the box's left edge, x = 10
    assert torch.equal(draw_boxes(image, torch.zeros(0, 4), []), image)
    with pytest.raises(ValueError, match="1 boxes but 2 captions"):
        draw_boxes(image, torch.zeros(1, 4), ["a", "b"])


def test_label_goes_above_the_box_when_there_is_room():
    drawn = draw_boxes(gray(), torch.tensor([[40.0, 50.0, 100.0, 100.0]]), ["square 0.93"], [0])
    # the row just above the top edge y = 50 is the tag's fill (its padding: no text there)
    assert share(drawn, RED, slice(49, 50), slice(41, 60)) == 1.0
    assert share(drawn, RED, slice(55, 95), slice(45, 95)) == 0.0  # the box's inside is uncovered


def test_label_goes_below_a_box_at_the_top_edge():
    drawn = draw_boxes(gray(), torch.tensor([[40.0, 0.0, 100.0, 30.0]]), ["square 0.93"], [0])
    assert share(drawn, RED, slice(31, 32), slice(41, 60)) == 1.0  # y2 + 1 = 31: the tag's top row
    assert share(drawn, RED, slice(2, 28), slice(45, 95)) == 0.0


def test_label_goes_inside_a_box_as_tall_as_the_image():
    drawn = draw_boxes(gray(), torch.tensor([[40.0, 0.0, 100.0, 128.0]]), ["square 0.93"], [0])
    assert share(drawn, RED, slice(0, 1), slice(41, 60)) == 1.0  # along the top edge, inside
    assert share(drawn, RED, slice(40, 120), slice(45, 95)) == 0.0  # the rest of it uncovered


def test_label_is_shifted_into_the_image_at_the_right_edge():
    # the box is 18 px wide at x = 110..128: its tag (wider) ends at the image edge, so it starts
    # left of the box
    drawn = draw_boxes(gray(), torch.tensor([[110.0, 50.0, 128.0, 70.0]]), ["triangle 0.50"], [0])
    assert share(drawn, RED, slice(49, 50), slice(90, 128)) == 1.0


def test_a_label_avoids_the_labels_drawn_before_it():
    # both tags would go above their boxes, overlapping; the second goes below its box instead
    boxes = torch.tensor([[10.0, 50.0, 50.0, 80.0], [30.0, 56.0, 70.0, 90.0]])
    drawn = draw_detections(gray(), boxes, torch.tensor([0, 1]), torch.tensor([0.9, 0.8]), ["a", "b"])
    assert share(drawn, RED, slice(49, 50), slice(11, 20)) == 1.0  # the first: above, y < 50
    assert share(drawn, GREEN, slice(91, 92), slice(31, 40)) == 1.0  # the second: below, y2 + 1 = 91
    assert share(drawn, GREEN, slice(55, 56), slice(31, 40)) == 0.0  # not above it, y < 56


def test_long_caption_on_a_small_image_shrinks_and_stays_inside():
    caption = "motorcycle 0.99"  # 67 px of text at 9 px: wider than the 48 px image; 41 px at 6 px
    drawn = draw_boxes(gray(48, 48), torch.tensor([[5.0, 20.0, 40.0, 40.0]]), [caption], [0])
    # shrunk to fit: the tag above the box (its padding row y = 19) is narrower than the image
    # (uncut: a tag left as wide as its text would fill the row); 20 of 48 px: still a tag
    assert 20 / 48 < share(drawn, RED, slice(19, 20), slice(0, 48)) < 1.0


def test_degenerate_and_outside_boxes_are_drawn_clipped():
    boxes = torch.tensor([[30.0, 30.0, 20.0, 20.0], [-50.0, -50.0, 500.0, 500.0]])
    drawn = draw_boxes(gray(), boxes, ["", ""], [0, 1])
    # the second is clipped to the image: its outline runs along the image's edges (0 and 127)
    assert drawn[:, 64, 0].tolist() == list(GREEN) and drawn[:, 127, 64].tolist() == list(GREEN)


def test_write_image_png_exact_jpeg_close_other_refused(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 6, 9), generator=g, dtype=torch.uint8)
    write_image(image, tmp_path / "x.png")
    png = torch.from_numpy(np.array(Image.open(tmp_path / "x.png"))).permute(2, 0, 1)
    assert torch.equal(png, image)
    flat = gray(16, 16)
    write_image(flat, tmp_path / "sub" / "y.jpg")  # folders are created
    jpg = torch.from_numpy(np.array(Image.open(tmp_path / "sub" / "y.jpg"))).permute(2, 0, 1)
    assert (jpg.int() - 128).abs().max() <= 2  # a flat image survives JPEG almost exactly
    with pytest.raises(ValueError, match="z.gif"):
        write_image(image, tmp_path / "z.gif")
