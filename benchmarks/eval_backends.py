"""COCO evaluation backends side by side: a synthetic COCO-like ground truth and detections, scored
by pycocotools and by faster-coco-eval (``evaluate_detections(..., backend=...)``).

The synthetic set looks like COCO val: about 7 boxes per image over 80 categories, areas from
small to large, 1% crowd boxes; each image gets up to 100 detections: jittered copies of its
boxes (some with the wrong class) and random false positives, with scores in (0, 1).

Run from the top of the repository:

    python -m benchmarks.eval_backends --images 5000
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from pycocotools.coco import COCO

from retina.engine.evaluate import METRIC_NAMES, EvalBackend, evaluate_detections
from retina.io import write_json


def synthetic_coco(num_images: int, num_classes: int = 80, seed: int = 0,
                   image_size: tuple[int, int] = (480, 640), dets_per_image: int = 100
                   ) -> tuple[COCO, list[dict]]:
    """Ground truth (an indexed pycocotools ``COCO``) and COCO-format detections for it."""
    rng = np.random.default_rng(seed)
    h, w = image_size
    images, anns, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.jpg"})
        m = int(rng.integers(0, 15))  # 0..14 boxes, mean 7
        side = np.exp(rng.uniform(np.log(8), np.log(min(h, w) * 0.9), (m, 2)))  # (M, 2) w, h
        xy = rng.uniform(0, 1, (m, 2)) * (np.array([w, h]) - side)  # (M, 2)
        cats = rng.integers(1, num_classes + 1, m)  # (M,)
        for b, c in zip(np.concatenate([xy, side], 1), cats):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(c),
                         "bbox": [round(float(v), 2) for v in b], "area": float(b[2] * b[3]),
                         "iscrowd": int(rng.random() < 0.01)})
        # Detections: 4 jittered copies per box (10% relabelled), the rest random.
        boxes = np.repeat(np.concatenate([xy, side], 1), 4, axis=0)  # (4M, 4) xywh
        boxes[:, :2] += rng.normal(0, 0.1, (len(boxes), 2)) * boxes[:, 2:]
        boxes[:, 2:] *= np.exp(rng.normal(0, 0.15, (len(boxes), 2)))
        labels = np.repeat(cats, 4)
        relabel = rng.random(len(labels)) < 0.1
        labels[relabel] = rng.integers(1, num_classes + 1, int(relabel.sum()))
        n_fp = max(dets_per_image - len(boxes), 0)
        fp_side = np.exp(rng.uniform(np.log(8), np.log(min(h, w) * 0.9), (n_fp, 2)))
        fp_xy = rng.uniform(0, 1, (n_fp, 2)) * (np.array([w, h]) - fp_side)
        boxes = np.concatenate([boxes, np.concatenate([fp_xy, fp_side], 1)])[:dets_per_image]
        labels = np.concatenate([labels, rng.integers(1, num_classes + 1, n_fp)])[:dets_per_image]
        scores = np.concatenate([rng.beta(4, 2, 4 * m), rng.beta(1, 6, n_fp)])[:dets_per_image]
        results.extend({"image_id": image_id, "category_id": int(c),
                        "bbox": [round(float(v), 2) for v in b], "score": float(s)}
                       for b, c, s in zip(boxes, labels, scores))
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": k, "name": f"class{k}"} for k in range(1, num_classes + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints
        coco.createIndex()
    return coco, results


def time_backend(coco: COCO, results: list[dict], backend: EvalBackend, repeats: int = 1
                 ) -> tuple[float, dict]:
    """Median seconds of ``evaluate_detections`` (loadRes, evaluate, accumulate, summarize) and
    its metrics."""
    times, metrics = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        metrics = evaluate_detections(coco, results, backend=backend)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), metrics


def compare_backends(num_images: int, repeats: int = 1, seed: int = 0) -> dict:
    """Both backends on one synthetic set; seconds, ratio, and the largest metric difference."""
    coco, results = synthetic_coco(num_images, seed=seed)
    ref_s, ref = time_backend(coco, results, "pycocotools", repeats)
    fast_s, fast = time_backend(coco, results, "faster_coco_eval", repeats)
    keys = list(METRIC_NAMES)
    diff = max(abs(ref[k] - fast[k]) for k in keys if np.isfinite(ref[k]))
    diff_class = max(abs(ref["per_class"][k] - fast["per_class"][k]) for k in ref["per_class"]
                     if np.isfinite(ref["per_class"][k]))
    return {"num_images": num_images, "num_detections": len(results),
            "num_gt": len(coco.dataset["annotations"]), "pycocotools_s": ref_s,
            "faster_coco_eval_s": fast_s, "speedup": ref_s / fast_s,
            "max_metric_diff": diff, "max_per_class_diff": diff_class,
            "metrics": {k: ref[k] for k in keys}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eval_backends",
                                description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=1, help="timed evaluations per backend (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    r = compare_backends(a.images, a.repeats, a.seed)
    print(f"{r['num_images']} images, {r['num_gt']} GT boxes, {r['num_detections']} detections")
    print(f"pycocotools      {r['pycocotools_s']:8.2f} s")
    print(f"faster_coco_eval {r['faster_coco_eval_s']:8.2f} s")
    print(f"speedup          {r['speedup']:8.2f} x   (largest metric difference "
          f"{r['max_metric_diff']:.3g}, per class {r['max_per_class_diff']:.3g})")
    if a.json is not None:
        write_json(a.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
