"""What pycocotools' COCOeval already knows, read out per class: precision/recall curves, the
score threshold that maximises F1, AP by object size and AP by number of objects per image.

Nothing here matches boxes again: the curves are COCOeval's accumulated ``eval["precision"]``,
an array (T, R, K, A, M) of T = 10 IoU thresholds .50:.05:.95, R = 101 recall points 0:.01:1,
K classes (sorted category ids), A = 4 area ranges (all, small, medium, large) and M = 3
max-detection limits (1, 10, 100), holding the interpolated precision (the highest precision at
any recall >= r; 0 past the class's largest recall, -1 for a class without ground truth). The
F1-best threshold is computed from COCOeval's per-image matches (``evalImgs``: each detection's
matched GT id and ignore flag at each IoU threshold, at most 100 detections per image), so its
precision and recall are those of the detections scoring >= the threshold, not the
interpolated envelope.

Shape legend: K classes, D detections, R recall points.
"""

from __future__ import annotations

import contextlib
import io
from typing import Optional, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from retina.engine.evaluate import evaluate_detections, results_coco

# Number-of-objects bins (inclusive; None: no upper bound) for AP by crowdedness.
COUNT_BINS: tuple[tuple[int, Optional[int]], ...] = ((1, 1), (2, 3), (4, 7), (8, None))
SIZE_NAMES = ("small", "medium", "large")  # COCO: area < 32^2, 32^2..96^2, > 96^2 px


def run_cocoeval(coco_gt: COCO, results: list[dict], cat_ids: Sequence[int],
                 image_ids: Optional[Sequence[int]] = None) -> COCOeval:
    """Evaluated, accumulated and summarised bbox ``COCOeval`` (its prints silenced).

    No results at all give every GT box missed: precision 0 at every recall, AP 0.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = results_coco(coco_gt, results)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.catIds = [int(c) for c in cat_ids]
        if image_ids is not None:
            coco_eval.params.imgIds = [int(i) for i in image_ids]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def iou_index(coco_eval: COCOeval, iou: float) -> int:
    """Index of ``iou`` in COCOeval's IoU thresholds (.50:.05:.95)."""
    matches = np.flatnonzero(np.isclose(coco_eval.params.iouThrs, iou))
    if len(matches) == 0:
        raise ValueError(f"IoU {iou} is not one of COCOeval's thresholds .50:.05:.95")
    return int(matches[0])


def precision_curves(coco_eval: COCOeval, iou: float) -> np.ndarray:
    """(K, R) interpolated precision at the R recall points ``params.recThrs``, area "all",
    100 detections per image; a row of -1 for a class without ground truth."""
    t = iou_index(coco_eval, iou)
    return coco_eval.eval["precision"][t, :, :, 0, -1].T.copy()  # (R, K) -> (K, R)


def average_precision(precision: np.ndarray) -> np.ndarray:
    """Mean over every axis but the class axis (the last one) of the valid (> -1) entries, in
    percent; NaN for a class without ground truth. precision: (..., K) -> (K,)."""
    flat = precision.reshape(-1, precision.shape[-1])  # (T*R, K)
    valid = flat > -1
    counts = valid.sum(axis=0)  # (K,)
    sums = np.where(valid, flat, 0.0).sum(axis=0)  # (K,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1) * 100, np.nan)


def per_class_ap(coco_eval: COCOeval) -> dict[str, np.ndarray]:
    """{"AP", "AP50", "AP75"}: (K,) percent per class (area "all", 100 detections)."""
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # (T, R, K)
    return {"AP": average_precision(precision),
            "AP50": average_precision(precision[iou_index(coco_eval, 0.5)]),
            "AP75": average_precision(precision[iou_index(coco_eval, 0.75)])}


def matches_at_iou(coco_eval: COCOeval, iou: float = 0.5) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per class, from COCOeval's own matching at ``iou`` (area "all", <= 100 detections per
    image): the scores (D,) and true-positive flags (D,) of its non-ignored detections and its
    number of non-ignored (non-crowd) ground-truth boxes."""
    t = iou_index(coco_eval, iou)
    p = coco_eval.params
    num_areas, num_images = len(p.areaRng), len(p.imgIds)
    out = []
    # evalImgs is ordered class, area range, image; area "all" is the first range of each class.
    for k in range(len(p.catIds)):
        start = k * num_areas * num_images
        entries = [e for e in coco_eval.evalImgs[start:start + num_images] if e is not None]
        if not entries:
            out.append((np.zeros(0), np.zeros(0, dtype=bool), 0))
            continue
        scores = np.concatenate([np.asarray(e["dtScores"], dtype=np.float64) for e in entries])  # (D,)
        matched = np.concatenate([e["dtMatches"][t] for e in entries]) > 0  # (D,)
        ignored = np.concatenate([e["dtIgnore"][t] for e in entries]).astype(bool)  # (D,)
        num_gt = int(sum(int((np.asarray(e["gtIgnore"]) == 0).sum()) for e in entries))
        out.append((scores[~ignored], matched[~ignored], num_gt))
    return out


def f1_best(scores: np.ndarray, is_tp: np.ndarray, num_gt: int) -> Optional[dict]:
    """The score threshold s maximising F1 of the detections scoring >= s.

    Args:
        scores: (D,) detection scores; is_tp: (D,) whether each is a true positive; num_gt:
            ground-truth boxes.

    Returns:
        ``{"score_thresh", "f1", "precision", "recall", "tp", "fp"}``, or None when there is no
        ground truth or no true positive. Only thresholds at a distinct score are candidates
        ("score >= s" keeps every tie); among equal F1 the highest threshold wins.
    """
    if num_gt == 0 or not np.any(is_tp):
        return None
    order = np.argsort(-scores, kind="stable")
    s = scores[order]  # (D,) descending
    tp = np.cumsum(is_tp[order])  # (D,)
    fp = np.cumsum(~is_tp[order])  # (D,)
    precision = tp / (tp + fp)
    recall = tp / num_gt
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * precision * recall / (precision + recall), 0.0)
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # (D,) the last detection of each distinct score
    i = int(np.argmax(np.where(last_of_tie, f1, -1.0)))
    return {"score_thresh": float(s[i]), "f1": float(f1[i]), "precision": float(precision[i]),
            "recall": float(recall[i]), "tp": int(tp[i]), "fp": int(fp[i])}


def f1_thresholds(coco_eval: COCOeval, iou: float = 0.5) -> tuple[list[Optional[dict]], Optional[dict]]:
    """``f1_best`` of each class (K entries) and of all classes pooled (one threshold for every
    class, e.g. ``retina predict --score-thresh``), both at ``iou``."""
    per_class = matches_at_iou(coco_eval, iou)
    per_class_best = [f1_best(*m) for m in per_class]
    if not per_class:
        return per_class_best, None
    pooled = f1_best(np.concatenate([m[0] for m in per_class]),
                     np.concatenate([m[1] for m in per_class]), sum(m[2] for m in per_class))
    return per_class_best, pooled


def ap_by_size(coco_eval: COCOeval) -> dict[str, Optional[float]]:
    """COCO's APs / APm / APl (percent; None where the size range has no ground truth)."""
    stats = coco_eval.stats[3:6]
    return {name: (float(v) * 100 if v >= 0 else None) for name, v in zip(SIZE_NAMES, stats)}


def objects_per_image(coco_gt: COCO, image_ids: Sequence[int], cat_ids: Sequence[int]) -> dict[int, int]:
    """Non-crowd ground-truth boxes of the evaluated classes in each image."""
    cats = set(int(c) for c in cat_ids)
    return {int(i): sum(1 for a in coco_gt.imgToAnns.get(int(i), [])
                        if not a.get("iscrowd", 0) and int(a["category_id"]) in cats)
            for i in image_ids}


def bin_name(low: int, high: Optional[int]) -> str:
    return f"{low}+" if high is None else (str(low) if low == high else f"{low}-{high}")


def ap_by_num_objects(coco_gt: COCO, results: list[dict], image_ids: Sequence[int],
                      cat_ids: Sequence[int], bins=COUNT_BINS) -> dict[str, dict]:
    """AP, AP50 and AP75 of each bin's images alone (COCOeval with ``params.imgIds`` = the bin's
    images; classes without ground truth in the bin are left out of its mean, as COCO does).

    Returns ``{"0": {"images": n}, "1": {"images", "objects", "AP", "AP50", "AP75"}, "2-3": ...}``;
    a bin with no image has AP None. Images without objects (bin "0") have no AP.
    """
    counts = objects_per_image(coco_gt, image_ids, cat_ids)
    names = [c["name"] for c in coco_gt.loadCats(list(cat_ids))]
    out: dict[str, dict] = {"0": {"images": sum(1 for n in counts.values() if n == 0)}}
    for low, high in bins:
        ids = [i for i, n in counts.items() if n >= low and (high is None or n <= high)]
        entry: dict = {"images": len(ids), "objects": sum(counts[i] for i in ids),
                       "AP": None, "AP50": None, "AP75": None}
        if ids:
            metrics = evaluate_detections(coco_gt, results, names, list(cat_ids), ids)
            entry.update({k: metrics[k] for k in ("AP", "AP50", "AP75")})
        out[bin_name(low, high)] = entry
    return out
