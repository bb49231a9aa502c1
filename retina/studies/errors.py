"""``retina analyze errors``: where a detector's AP goes.

From COCO ground truth and COCO-format detections (``detections.json``, or a trained run whose
val split is run through ``retina.engine.evaluate.inference`` first), writes to one directory:

- ``pr_curves.png``: per-class precision/recall at IoU .5 and .75 (COCOeval's ``eval["precision"]``)
  with each class's F1-best operating point (``coco_breakdown``);
- ``confusion_matrix.png``: GT class x predicted class with a background row (spurious
  detections) and column (missed GT), at one score threshold (``confusion``);
- ``tide.png``: TIDE's dAP per error type (``tide``; needs the optional ``tidecv`` package);
- ``ap_breakdown.png``: AP by object size and by number of objects per image;
- ``summary.json``: every number above, plus the suggested ``retina predict --score-thresh``.

The confusion matrix's score threshold is, unless given, the F1-best threshold of all classes
pooled at IoU .5 (the suggested ``--score-thresh``), or ``DEFAULT_SCORE_THRESH`` (predict's
default) when no detection is a true positive.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO

from retina.errors import InputError, MissingFileError, UsageError
from retina.io import unused_dir, weights_dir, write_json
from retina.studies import coco_breakdown as cb
from retina.studies.confusion import confusion_matrix
from retina.studies.error_plots import plot_ap_breakdown, plot_confusion, plot_pr_curves, plot_tide
from retina.studies.tide import tide_breakdown

DEFAULT_SCORE_THRESH = 0.3  # retina predict's default
CURVE_IOUS = (0.5, 0.75)


# --------------------------------------------------------------------------------- inputs
def _read(path: str | Path) -> Any:
    if not Path(path).is_file():
        raise MissingFileError(f"{path}: no such file")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


def load_ground_truth(path: str | Path) -> COCO:
    """A pycocotools ``COCO`` of the annotation file; one-line errors for a bad file."""
    data = _read(path)
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise InputError(f"{path}: not a COCO annotation file (needs images, annotations, categories)")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def check_results(results: Any, coco_gt: COCO, source: str) -> list[dict]:
    """``results`` if it is a list of COCO detections on ``coco_gt``'s images and categories;
    else a one-line ``InputError`` naming ``source`` and the first bad entry."""
    if not isinstance(results, list):
        raise InputError(f"{source}: expected a JSON list of detections, got {type(results).__name__}")
    images, cats = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not all(k in r for k in ("image_id", "category_id", "bbox", "score")):
            raise InputError(f"{source}: detection {i} needs image_id, category_id, bbox, score")
        box = r["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, numbers.Real) for v in box)):
            raise InputError(f"{source}: detection {i}: bbox should be [x, y, w, h], got {box!r}")
        if not isinstance(r["score"], numbers.Real) or not math.isfinite(r["score"]):
            raise InputError(f"{source}: detection {i}: score should be a number, got {r['score']!r}")
        for key in ("image_id", "category_id"):  # "3" looked like 3 in the message below
            if not isinstance(r[key], numbers.Integral) or isinstance(r[key], bool):
                raise InputError(f"{source}: detection {i}: {key} should be an integer, got {r[key]!r}")
        if r["image_id"] not in images:
            raise InputError(f"{source}: detection {i}: image_id {r['image_id']} is not in the ground truth")
        if r["category_id"] not in cats:
            raise InputError(f"{source}: detection {i}: category_id {r['category_id']} is not in the "
                             f"ground truth's categories {sorted(cats)}")
    return results


# ------------------------------------------------------------------------------- analysis
def _per_class(coco_eval, class_names: Sequence[str], f1_per_class: list) -> dict[str, dict]:
    aps = cb.per_class_ap(coco_eval)
    matches = cb.matches_at_iou(coco_eval, 0.5)
    return {name: {"AP": float(aps["AP"][k]), "AP50": float(aps["AP50"][k]),
                   "AP75": float(aps["AP75"][k]), "num_gt": matches[k][2], "f1_best": f1_per_class[k]}
            for k, name in enumerate(class_names)}


@dataclass(frozen=True)
class _Findings:
    """Everything the summary and the figures are made of, for K analysed classes."""

    source: str
    class_names: list[str]  # K
    num_images: int
    num_gt: int
    num_detections: int  # on the analysed images
    coco_eval: Any  # COCOeval, evaluated and accumulated
    f1_per_class: list  # K F1-best operating points (None where a class has no true positive)
    f1_pooled: Optional[dict]  # the F1-best operating point of all classes at IoU .5
    thresh: float  # the confusion matrix's score threshold
    iou_thresh: float
    matrix: np.ndarray  # (K + 1, K + 1): GT class x predicted class, background last
    recall: np.ndarray  # COCOeval's recall thresholds
    curves: dict  # {iou: (K, R) precision}
    tide: Optional[dict]
    by_size: dict
    by_count: dict

    @property
    def labels(self) -> list[str]:
        return self.class_names + ["background"]


def _measure(coco_gt: COCO, results: list[dict], cat_ids: list[int], image_ids: list[int],
             score_thresh: Optional[float], iou_thresh: float, source: str) -> _Findings:
    """COCOeval, F1 thresholds, confusion, PR curves, TIDE and the AP breakdowns of ``results``
    on the analysed classes and images."""
    counts = cb.objects_per_image(coco_gt, image_ids, cat_ids)
    if sum(counts.values()) == 0:
        raise InputError(f"{source}: the ground truth has no (non-crowd) box in the analysed images")
    coco_eval = cb.run_cocoeval(coco_gt, results, cat_ids, image_ids)
    f1_per_class, f1_pooled = cb.f1_thresholds(coco_eval, 0.5)
    thresh = score_thresh if score_thresh is not None else (
        f1_pooled["score_thresh"] if f1_pooled else DEFAULT_SCORE_THRESH)
    analysed = set(image_ids)
    return _Findings(
        source=source, class_names=[c["name"] for c in coco_gt.loadCats(cat_ids)],
        num_images=len(image_ids), num_gt=int(sum(counts.values())),
        num_detections=sum(1 for r in results if int(r["image_id"]) in analysed),
        coco_eval=coco_eval, f1_per_class=f1_per_class, f1_pooled=f1_pooled, thresh=thresh,
        iou_thresh=iou_thresh, matrix=confusion_matrix(coco_gt, results, cat_ids, image_ids, thresh, iou_thresh),
        recall=np.asarray(coco_eval.params.recThrs),
        curves={iou: cb.precision_curves(coco_eval, iou) for iou in CURVE_IOUS},  # {iou: (K, R)}
        # TIDE's AP is undefined without detections (tidecv divides by zero): then skipped
        tide=tide_breakdown(coco_gt, results, cat_ids, image_ids) if results else None,
        by_size=cb.ap_by_size(coco_eval), by_count=cb.ap_by_num_objects(coco_gt, results, image_ids, cat_ids))


def _summary(f: _Findings, any_results: bool) -> dict:
    """``summary.json``: every number of the analysis."""
    names = f.class_names
    return {
        "source": f.source,
        "num_images": f.num_images, "num_gt": f.num_gt, "num_detections": f.num_detections,
        "metrics": {name: (float(v) * 100 if v >= 0 else None)
                    for name, v in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), f.coco_eval.stats)},
        "per_class": _per_class(f.coco_eval, names, f.f1_per_class),
        "f1_best_all_classes": f.f1_pooled,
        "suggested_score_thresh": f.f1_pooled["score_thresh"] if f.f1_pooled else None,
        "pr_curves": {"recall": f.recall.tolist(), **{
            f"iou_{iou:.2f}": {n: c[k].tolist() for k, n in enumerate(names)} for iou, c in f.curves.items()}},
        "confusion": {"score_thresh": f.thresh, "iou_thresh": f.iou_thresh, "rows": "ground truth",
                      "cols": "predicted", "labels": f.labels, "matrix": f.matrix.tolist()},
        "tide": f.tide,
        "tide_skipped": None if f.tide is not None else "no detections" if not any_results
        else "tidecv is not installed",
        "ap_by_size": f.by_size,
        "ap_by_num_objects": f.by_count,
    }


def _draw(f: _Findings, out_dir: Path) -> None:
    """The four figures (``tide.png`` only with TIDE's numbers)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_pr_curves(out_dir / "pr_curves.png", f.recall, f.curves, f.class_names, f.f1_per_class)
    plot_confusion(out_dir / "confusion_matrix.png", f.matrix, f.labels, f.thresh, f.iou_thresh)
    if f.tide is not None:
        plot_tide(out_dir / "tide.png", f.tide)
    plot_ap_breakdown(out_dir / "ap_breakdown.png", f.by_size, f.by_count)


def analyze_errors(coco_gt: COCO, results: list[dict], out_dir: str | Path,
                   cat_ids: Optional[Sequence[int]] = None, image_ids: Optional[Sequence[int]] = None,
                   score_thresh: Optional[float] = None, iou_thresh: float = 0.5,
                   source: str = "detections") -> dict:
    """Write the four figures and ``summary.json`` to ``out_dir``; return the summary.

    Args:
        coco_gt: ground truth. results: COCO detections (``check_results``).
        cat_ids: classes to analyse (default: every GT category); image_ids: images (default:
            every GT image).
        score_thresh: the confusion matrix's threshold (default: the pooled F1-best, else 0.3).
        iou_thresh: the confusion matrix's matching IoU.
    """
    cat_ids = [int(c) for c in (cat_ids if cat_ids is not None else sorted(coco_gt.getCatIds()))]
    image_ids = [int(i) for i in (image_ids if image_ids is not None else sorted(coco_gt.getImgIds()))]
    findings = _measure(coco_gt, results, cat_ids, image_ids, score_thresh, iou_thresh, source)
    summary = _summary(findings, bool(results))
    _draw(findings, Path(out_dir))
    write_json(Path(out_dir) / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------- text
def _f(v: Optional[float], digits: int = 1) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def format_summary(summary: dict) -> str:
    """The printed report: per-class table, suggested threshold, confusion matrix (up to 12
    classes), TIDE, AP by size and by objects per image."""
    m = summary["metrics"]
    lines = [f"{summary['num_detections']} detections on {summary['num_images']} images "
             f"({summary['num_gt']} GT boxes): AP {_f(m['AP'])}  AP50 {_f(m['AP50'])}  AP75 {_f(m['AP75'])}",
             ""]
    w = max(len("all (pooled)"), *(len(n) for n in summary["per_class"]))
    lines.append(f"{'class'.ljust(w)} |    AP |  AP50 |  AP75 |    GT | F1-best score |   F1 |    P |    R")
    lines.append("-" * len(lines[-1]))
    rows = list(summary["per_class"].items()) + [("all (pooled)", {"f1_best": summary["f1_best_all_classes"]})]
    for name, c in rows:
        b = c["f1_best"] or {}
        lines.append(f"{name.ljust(w)} | {_f(c.get('AP')):>5} | {_f(c.get('AP50')):>5} | "
                     f"{_f(c.get('AP75')):>5} | {str(c.get('num_gt', '')):>5} | "
                     f"{_f(b.get('score_thresh'), 3):>13} | {_f(b.get('f1'), 2):>4} | "
                     f"{_f(b.get('precision'), 2):>4} | {_f(b.get('recall'), 2):>4}")
    if summary["suggested_score_thresh"] is not None:
        lines += ["", f"suggested: retina predict --score-thresh {summary['suggested_score_thresh']:.3f}"
                      "  (F1-best over all classes at IoU .5)"]
    conf = summary["confusion"]
    if len(conf["labels"]) <= 13:
        cw = max(6, *(len(n) for n in conf["labels"]))
        lines += ["", f"confusion matrix (score >= {conf['score_thresh']:.3f}, IoU >= {conf['iou_thresh']:.2f}):"
                      " rows ground truth, columns predicted",
                  " " * (cw + 3) + " ".join(n[:cw].rjust(cw) for n in conf["labels"])]
        lines += [f"{n[:cw].rjust(cw)} | " + " ".join(str(v).rjust(cw) for v in row)
                  for n, row in zip(conf["labels"], conf["matrix"])]
    tide = summary["tide"]
    if tide is None and summary.get("tide_skipped") == "no detections":
        lines += ["", "TIDE: skipped, there are no detections"]
    elif tide is None:
        lines += ["", "TIDE: skipped, tidecv is not installed (pip install 'retina[analysis]')"]
    else:
        lines += ["", f"TIDE (AP50 {_f(tide['ap50'])}) dAP50: " + "  ".join(
            f"{k} {_f(v, 2)} ({tide['counts'][k]})" for k, v in tide["dAP"].items()),
            "  special: " + "  ".join(f"{k} {_f(v, 2)}" for k, v in tide["special"].items())]
    lines += ["", "AP by object size: " + "  ".join(f"{k} {_f(v)}" for k, v in summary["ap_by_size"].items()),
              "AP by objects per image: " + "  ".join(
                  f"{k}: {_f(v.get('AP'))} ({v['images']} img)" for k, v in summary["ap_by_num_objects"].items()
                  if k != "0")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- CLI
def _run_detections(weights: str, config: Optional[str], overrides: Sequence[str], device: str,
                    out_dir: Path):
    """Inference of a trained run on its config's val split: (coco_gt, results, cat_ids,
    image_ids); the detections are also written to ``out_dir/detections.json``."""
    from retina.config import find_config, load_config
    from retina.data import build_dataset
    from retina.deploy.runtime import load_detector
    from retina.engine.evaluate import check_same_classes, inference, to_coco_results
    from retina.engine.dist import resolve_device

    dev = resolve_device(device)
    cfg = load_config(find_config(config), list(overrides)) if config else None
    model, cfg, class_names, _ = load_detector(weights, dev, tuple(overrides), cfg)  # .pth, .onnx or .pt2
    dataset = build_dataset(cfg, "val")
    check_same_classes(class_names, dataset, weights)
    outputs, image_ids = inference(model, dataset, cfg.eval.batch_size, dev,
                                   progress=sys.stderr.isatty(), num_workers=cfg.data.num_workers)
    cat_ids = [int(c) for c in dataset.cat_ids]
    results = to_coco_results(outputs, image_ids, cat_ids)
    write_json(out_dir / "detections.json", results)
    return dataset.coco, results, cat_ids, image_ids


def errors_cli(weights: Optional[str] = None, detections: Optional[str] = None, ann: Optional[str] = None,
               config: Optional[str] = None, overrides: Sequence[str] = (), out: Optional[str] = None,
               device: str = "auto", score_thresh: Optional[float] = None) -> int:
    """``retina analyze errors --weights RUN`` or ``--detections D.json --ann GT.json``; default
    out: ``<run dir>/analysis/errors`` or ``<detections dir>/errors``, else ``errors2``, ``errors3``,
    ... when it holds an earlier analysis (kept). Returns the exit status."""
    if weights is not None and detections is not None:
        raise UsageError("retina analyze errors takes --weights RUN or --detections D.json --ann A.json, not both")
    if weights is None and detections is None:
        raise UsageError("retina analyze errors needs either --weights RUN or --detections D.json --ann A.json")
    if detections is not None and ann is None:
        raise UsageError("retina analyze errors --detections needs --ann (the COCO ground-truth json)")
    if score_thresh is not None and not 0 <= score_thresh <= 1:
        raise UsageError(f"--score-thresh {score_thresh}: expected a value in [0, 1]")
    if weights is not None:
        out_dir = Path(out) if out else unused_dir(weights_dir(weights) / "analysis" / "errors")
        coco_gt, results, cat_ids, image_ids = _run_detections(weights, config, overrides, device, out_dir)
        source = str(weights)
    else:
        out_dir = Path(out) if out else unused_dir(Path(detections).parent / "errors")
        coco_gt = load_ground_truth(ann)
        results = check_results(_read(detections), coco_gt, str(detections))
        cat_ids, image_ids, source = None, None, str(detections)
    summary = analyze_errors(coco_gt, results, out_dir, cat_ids, image_ids, score_thresh, source=source)
    print(format_summary(summary))
    print(f"\nwritten to {out_dir}: summary.json, pr_curves.png, confusion_matrix.png, "
          f"{'tide.png, ' if summary['tide'] else ''}ap_breakdown.png")
    return 0
