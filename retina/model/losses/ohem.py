"""Online hard example mining over anchors (loss type ``ohem``; Sec. 5.1, Table 1d, after
Shrivastava et al. 2016): which anchors of each image the classification loss trains on.

Shape legend: N images, R anchors per image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor
from torchvision.ops import nms

if TYPE_CHECKING:  # the settings are the config's section; the loss reads only its fields
    from retina.config.schema import OhemConfig


def ohem_select(loss: Tensor, boxes: Tensor, fg: Tensor, valid: Tensor, batch_size: int,
                nms_thresh: float, ratio: Optional[float] = None) -> Tensor:
    """Indices of the anchors OHEM trains on in one image (Sec. 5.1, Table 1d).

    loss (R,) per-anchor loss; boxes (R, 4) XYXY anchor boxes; fg, valid (R,) bool. Valid
    anchors are ranked by loss, NMS at ``nms_thresh`` drops an anchor that overlaps a
    higher-loss one (OHEM's NMS runs on the RoIs, whose analogue here is the anchor), and the
    ``batch_size`` highest-loss survivors are kept. With ``ratio`` r (SSD's 1:3 is r = 0.25)
    positives and negatives are taken separately from the survivors, each by loss: up to
    floor(r B) positives, then negatives up to B minus those and up to (1 - r) / r times the
    positives kept, so the minibatch holds r : (1 - r) (an image with no positive keeps nothing).

    Greedy NMS keeps a box only by looking at higher-loss boxes, so NMS over the top-m prefix of
    the ranking gives exactly the survivors within it; the prefix grows x4 until it holds enough
    survivors, which avoids an R x R NMS on big images. Returns selected indices (S,), S <= B,
    positives first when ``ratio`` is set, each part in decreasing loss. Unlike the other losses
    this waits on the device once or more per image (NMS output sizes): a baseline, not a default.
    """
    cand = valid.nonzero().squeeze(1)  # (V,)
    order = cand[torch.argsort(loss[cand], descending=True, stable=True)]  # (V,) by loss
    num_fg_quota = int(ratio * batch_size) if ratio is not None else 0
    m = min(len(order), 8 * batch_size)
    while True:
        prefix = order[:m]
        kept = prefix[nms(boxes[prefix].float(), loss[prefix].float(), nms_thresh)]  # by loss
        fg_kept, bg_kept = kept[fg[kept]], kept[~fg[kept]]
        if ratio is None:
            enough = len(kept) >= batch_size
        else:
            enough = len(fg_kept) >= num_fg_quota and len(bg_kept) >= batch_size - num_fg_quota
        if enough or m == len(order):
            break
        m = min(len(order), 4 * m)
    if ratio is None:
        return kept[:batch_size]
    num_fg = min(len(fg_kept), num_fg_quota)
    num_bg = min(len(bg_kept), batch_size - num_fg, int(num_fg * (1 - ratio) / ratio + 1e-6))
    return torch.cat([fg_kept[:num_fg], bg_kept[:num_bg]])


def ohem_selected(cls_per_anchor: Tensor, fg: Tensor, valid: Tensor, anchors: Optional[Tensor],
                  ohem: OhemConfig) -> Tensor:
    """(N, R) bool: the anchors ``ohem_select`` keeps in each image; cls_per_anchor, fg, valid
    (N, R), anchors (R, 4) XYXY."""
    if anchors is None:
        raise ValueError("loss.type=ohem needs the anchors (R, 4) for its NMS")
    scores = cls_per_anchor.detach()  # (N, R): selection is not differentiated
    selected = torch.zeros_like(valid)  # (N, R) bool
    for i in range(cls_per_anchor.shape[0]):  # per image: NMS and the quota are per image
        keep = ohem_select(scores[i], anchors, fg[i], valid[i], ohem.batch_size, ohem.nms, ohem.ratio)
        selected[i, keep] = True
    return selected
