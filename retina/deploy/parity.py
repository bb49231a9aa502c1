"""Parity of two detectors' outputs: the exported file against PyTorch eager, image by image.

Every detection of one list is paired with one of the other (same label, highest IoU, greedy by
decreasing score); then the largest box difference (px, over the 4 coordinates of every pair)
and score difference are the figures, and a detection left without a partner is a mismatch,
except for a tie:

- its score is within ``tie_eps`` of the score threshold (the two runs may keep or drop it),
  or of another detection's score in its list (the two runs may order the pair differently, so
  NMS keeps the other one, or the per-image cap cuts the other one);
- its list is full (``detections_per_image``) and its score is within ``tie_eps`` of the last
  kept one.

Parity holds when there is no mismatch, every paired score is within ``score_tol`` and every
paired box within ``box_tol`` px plus ``BOX_RTOL`` times its largest coordinate (torch.testing's
float32 rule, atol + rtol x |expected|, with the box's extent as the magnitude: a box reaching 500
px carries ~20 float32 ulps of rounding through a deep network, in every corner since the width
comes from exp(dw) x the anchor, so a fixed 1e-3 px failed ordinary models) at the resolution
the network sees: a box difference in the input's pixels is divided by ``max(1, px_scale)``, the
input pixels per network pixel (an image shrunk 10x to the test size magnifies the float noise of the network's coordinates 10x when its
boxes are mapped back; an enlarged image is held to ``box_tol`` input px). Labels are compared
through the pairing: a detection whose partner would need another label counts as a mismatch.

Shape legend: D detections of one image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchvision.ops import box_iou

# Defaults of the check: identical labels, boxes within 1e-3 px; scores are sigmoid outputs
# whose float32 noise between runtimes measured up to ~6e-6 on the tiny test model, so pairs
# within 1e-4 and ties within 1e-5 (a tie is two scores the runs may order either way).
BOX_TOL = 1e-3
BOX_RTOL = 1.3e-6  # torch.testing.assert_close's default rtol for float32
SCORE_TOL = 1e-4
TIE_EPS = 1e-5
MIN_PAIR_IOU = 0.5


@dataclass
class Parity:
    """Figures over all images compared; ``ok`` is the verdict."""

    images: int = 0
    detections: int = 0  # in the reference lists
    pairs: int = 0
    max_box_diff: float = 0.0  # input px
    max_box_diff_net: float = 0.0  # px at the network's resolution (see the module docstring)
    max_box_excess: float = 0.0  # largest (difference - BOX_RTOL x box's largest |coordinate|), net px
    max_score_diff: float = 0.0
    mismatches: int = 0  # unpaired detections not explained by a tie
    ties: int = 0  # unpaired detections explained by a tie
    box_tol: float = BOX_TOL
    score_tol: float = SCORE_TOL
    notes: list[str] = field(default_factory=list)  # the first few mismatches, readable

    @property
    def ok(self) -> bool:
        return (self.mismatches == 0 and self.max_box_excess <= self.box_tol
                and self.max_score_diff <= self.score_tol)

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"parity {verdict} on {self.images} images, {self.detections} detections: largest box "
                f"difference {self.max_box_diff:.2e} px ({self.max_box_diff_net:.2e} px at the network's "
                f"resolution, tolerance {self.box_tol:g} + {BOX_RTOL:g} x the box's largest coordinate), score "
                f"{self.max_score_diff:.2e} (tolerance {self.score_tol:g}), label/missing "
                f"mismatches {self.mismatches}, tied detections allowed to differ {self.ties}")


def _tied(scores: Tensor, i: int, score_thresh: float, cap: int, tie_eps: float) -> bool:
    """Is detection ``i`` of a list with ``scores`` (D,) (decreasing) in a tie (module docstring)?"""
    s = float(scores[i])
    others = torch.cat([scores[:i], scores[i + 1:]])
    near_other = bool(((others - s).abs() <= tie_eps).any()) if len(others) else False
    at_cap = len(scores) >= cap and abs(float(scores[-1]) - s) <= tie_eps
    return abs(s - score_thresh) <= tie_eps or near_other or at_cap


def compare_image(parity: Parity, ref: dict[str, Tensor], out: dict[str, Tensor], score_thresh: float,
                  detections_per_image: int, tie_eps: float = TIE_EPS, name: str = "",
                  px_scale: float = 1.0) -> None:
    """Add one image's reference (eager) and exported detections to ``parity``; ``px_scale``: the
    image's input pixels per network pixel (input size / resized size, the larger axis)."""
    rb, rs, rl = (ref[k].detach().cpu() for k in ("boxes", "scores", "labels"))
    ob, os_, ol = (out[k].detach().cpu() for k in ("boxes", "scores", "labels"))
    parity.images += 1
    parity.detections += len(rs)
    iou = box_iou(rb.float(), ob.float())  # (D_ref, D_out)
    iou[rl[:, None] != ol[None, :]] = -1.0  # only the same label pairs
    taken = torch.zeros(len(os_), dtype=torch.bool)
    unpaired_ref = []
    for i in range(len(rs)):  # greedy by decreasing reference score
        cand = iou[i].masked_fill(taken, -1.0)
        j = int(cand.argmax()) if len(cand) else -1
        if j < 0 or float(cand[j]) < MIN_PAIR_IOU:
            unpaired_ref.append(i)
            continue
        taken[j] = True
        parity.pairs += 1
        diff = float((rb[i] - ob[j]).abs().max())  # input px
        scale = max(1.0, px_scale)
        parity.max_box_diff = max(parity.max_box_diff, diff)
        parity.max_box_diff_net = max(parity.max_box_diff_net, diff / scale)
        excess = (diff - BOX_RTOL * float(rb[i].abs().max())) / scale
        parity.max_box_excess = max(parity.max_box_excess, excess)
        parity.max_score_diff = max(parity.max_score_diff, float((rs[i] - os_[j]).abs()))
    unpaired = [("eager", rs, rl, i) for i in unpaired_ref]
    unpaired += [("exported", os_, ol, j) for j in (~taken).nonzero().flatten().tolist()]
    for side, scores, labels, i in unpaired:
        if _tied(scores, i, score_thresh, detections_per_image, tie_eps):
            parity.ties += 1
            continue
        parity.mismatches += 1
        if len(parity.notes) < 5:
            parity.notes.append(f"{name}: {side} detection {i} (label {int(labels[i])}, score "
                                f"{float(scores[i]):.6f}) has no partner")
