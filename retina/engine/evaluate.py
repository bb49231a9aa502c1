"""COCO box evaluation: run a model over a dataset, convert to COCO results, score with pycocotools.

This module owns the COCO results format (``{"image_id", "category_id", "bbox": [x, y, w, h],
"score"}``), the 12 COCO box metrics (reported in percent, NaN where pycocotools has no ground
truth for a size range), per-class AP, and the JSON files ``detections.json`` / ``metrics.json``
(the metrics, and which checkpoint they score when the caller says).

Shape legend: N images, D detections of one image, K classes.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.ops import box_convert
from tqdm import tqdm

from retina.errors import InputError, RetinaError
from retina.io import write_json

EvalBackend = Literal["pycocotools", "faster_coco_eval"]

# The 12 COCO box metrics, in the order of ``COCOeval.stats``.
METRIC_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip


# ------------------------------------------------------------------------------ conversion
def to_coco_results(
    outputs: list[dict[str, Tensor]], image_ids: list[int], cat_ids: list[int]
) -> list[dict]:
    """Convert model outputs to the COCO results format.

    Args:
        outputs: N dicts with ``boxes`` (D, 4) XYXY pixels, ``scores`` (D,), ``labels`` (D,)
            contiguous 0..K-1.
        image_ids: N COCO image ids, one per output.
        cat_ids: K COCO category ids; ``cat_ids[label]`` is the id of contiguous label ``label``.

    Returns:
        One dict per detection: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h] (rounded to
        0.01 px), ``score``.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs but {len(image_ids)} image ids")
    cat_id_table = torch.as_tensor(list(cat_ids), dtype=torch.int64)  # (K,)
    results: list[dict] = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().to("cpu", torch.float64)  # (D, 4)
        if boxes.numel() == 0:
            continue
        boxes_xywh = box_convert(boxes, "xyxy", "xywh")  # (D, 4)
        boxes_xywh = torch.round(boxes_xywh * 100) / 100
        scores = out["scores"].detach().to("cpu", torch.float64).tolist()
        category_ids = cat_id_table[out["labels"].detach().cpu().long()].tolist()
        image_id = int(image_id)
        results.extend(
            {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
            for b, s, c in zip(boxes_xywh.tolist(), scores, category_ids)
        )
    return results


# ------------------------------------------------------------------------------ evaluation
def results_coco(coco_gt: Any, results: list[dict]) -> Any:
    """``results`` as a COCO object of ``coco_gt``'s class (pycocotools' or faster-coco-eval's).
    ``loadRes`` cannot take an empty list (it reads results[0]): no results give an index of the
    same images with no detection, which COCOeval scores as every box missed (AP 0; -1, reported
    as missing, where there is no ground truth)."""
    if results:
        return coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys in place: copies
    empty = type(coco_gt)()
    empty.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                     "annotations": []}  # fmt: skip
    empty.createIndex()
    return empty


class EvalBackendError(RetinaError, ValueError):
    """The selected COCO evaluation backend cannot be used; one line saying how to install it."""


def _coco_classes(backend: EvalBackend) -> tuple[type, type]:
    """(COCO, COCOeval) classes of ``backend``; faster-coco-eval is an optional dependency."""
    if backend == "pycocotools":
        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO as FastCOCO, COCOeval_faster
        except ImportError:
            raise EvalBackendError("eval.backend=faster_coco_eval needs the faster-coco-eval "
                                   "package: pip install faster-coco-eval") from None
        return FastCOCO, COCOeval_faster
    raise EvalBackendError(f"unknown eval backend {backend!r}; choose pycocotools | faster_coco_eval")


def check_backend(backend: EvalBackend) -> None:
    """Raise ``EvalBackendError`` now, before hours of training, if ``backend`` is unusable."""
    _coco_classes(backend)


def check_same_classes(classes: Sequence[str] | None, dataset: Any, weights: str | Path | None = None,
                       train_set: Any = None) -> None:
    """A model's label k is scored as the val set's k-th class, so the two lists must agree: a val
    set with other classes (or another order) would score each box as the wrong class. The
    classes are a model's (``weights`` names it) or a training set's (``train_set``, whose labels
    the model learns). ``InputError`` (one line) when they differ; nothing to check without names."""
    data_classes = list(getattr(dataset, "class_names", None) or [])
    if not classes or not data_classes or list(classes) == data_classes:
        return
    source = getattr(dataset, "source", None) or "the val set"
    if train_set is not None:
        trained_on = getattr(train_set, "source", None) or "the train set"
        raise InputError(f"the train set ({trained_on}) has the classes {list(classes)} but the val set "
                         f"({source}) has {data_classes}: both splits need the same classes in the same "
                         f"order")
    raise InputError(f"{weights} detects {list(classes)} but the val set ({source}) has the classes "
                     f"{data_classes}: evaluate on data with the model's classes, in its order "
                     f"(--set data.root=... / data.classes=...)")


def evaluate_detections(
    coco_gt: COCO,
    results: list[dict],
    class_names: list[str] | None = None,
    cat_ids: list[int] | None = None,
    image_ids: list[int] | None = None,
    backend: EvalBackend = "pycocotools",
) -> dict:
    """Score COCO results against ``coco_gt`` (bbox), silencing the evaluator's prints.

    ``backend`` "pycocotools" is the reference; "faster_coco_eval" (optional package, C++
    evaluate/accumulate) gives the same 12 metrics and per-class AP several times faster.

    Args:
        coco_gt: ground truth; every image in it is evaluated (images without detections count).
        results: COCO results (see ``to_coco_results``).
        class_names: K names for ``per_class``, aligned with ``cat_ids``; default: the GT
            categories' names.
        cat_ids: K category ids to evaluate; default: every category of ``coco_gt``.
        image_ids: images to evaluate (e.g. those of a subset); default: every GT image.

    Returns:
        ``{"AP": .., ..., "ARl": ..}`` (the 12 ``METRIC_NAMES``, percent, NaN where pycocotools
        reports -1 because a size range has no GT) and ``"per_class": {name: AP percent}`` (NaN for
        a class without GT). An empty ``results`` scores every box missed: 0.0 (NaN where
        there is no GT, as with detections).
    """
    class_names, cat_ids = _classes(coco_gt, class_names, cat_ids)
    coco_eval = run_cocoeval(coco_gt, results, cat_ids, image_ids, backend)
    metrics: dict[str, Any] = summary_metrics(coco_eval.stats)
    metrics["per_class"] = per_class_ap(coco_eval, class_names, cat_ids)
    return metrics


def _classes(coco_gt: COCO, class_names: list[str] | None,
             cat_ids: list[int] | None) -> tuple[list[str], list[int]]:
    """(K names, K category ids) to evaluate: those given, else every category of ``coco_gt``."""
    if cat_ids is None:
        cat_ids = sorted(coco_gt.getCatIds())
    cat_ids = [int(c) for c in cat_ids]
    if class_names is None:
        class_names = [cat["name"] for cat in coco_gt.loadCats(cat_ids)]
    if len(class_names) != len(cat_ids):
        raise ValueError(f"{len(class_names)} class names but {len(cat_ids)} category ids")
    return list(class_names), cat_ids


def run_cocoeval(coco_gt: COCO, results: list[dict], cat_ids: list[int], image_ids: list[int] | None,
                 backend: EvalBackend = "pycocotools") -> Any:
    """``COCOeval`` (bbox) of ``backend`` evaluated, accumulated and summarised on ``cat_ids`` and
    ``image_ids`` (None: every GT image), its prints silenced."""
    coco_cls, cocoeval_cls = _coco_classes(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_gt
        if not isinstance(coco_gt, coco_cls):  # faster-coco-eval indexes the same dataset dict
            gt = coco_cls(coco_gt.dataset, print_function=lambda *a, **k: None)
        coco_dt = results_coco(gt, results)
        kwargs = {"print_function": lambda *a, **k: None} if backend != "pycocotools" else {}
        coco_eval = cocoeval_cls(gt, coco_dt, iouType="bbox", **kwargs)
        coco_eval.params.catIds = cat_ids
        if image_ids is not None:
            coco_eval.params.imgIds = [int(i) for i in image_ids]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def summary_metrics(stats: Sequence[float]) -> dict[str, float]:
    """``COCOeval.stats`` as ``{name: percent}`` of the 12 ``METRIC_NAMES``; -1 (no GT in a size
    range) as NaN. faster-coco-eval appends AR50 and AR75 after the 12: zip drops them."""
    return {name: float(v) * 100 if v >= 0 else float("nan") for name, v in zip(METRIC_NAMES, stats)}


def per_class_ap(coco_eval: Any, class_names: list[str], cat_ids: list[int]) -> dict[str, float]:
    """``{name: AP percent}`` (area "all", 100 detections, mean over IoU thresholds and recall
    points) of an accumulated ``COCOeval``; NaN for a class without GT."""
    # precision: (T iou thresholds, R recall points, K classes, A area ranges, M max-dets);
    # pycocotools sorts catIds, so class k of the array is the k-th smallest id.
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # (T, R, K), area "all", 100 dets
    evaluated_ids = [int(c) for c in coco_eval.params.catIds]
    valid = precision > -1
    sums = np.where(valid, precision, 0.0).sum(axis=(0, 1))  # (K,)
    counts = valid.sum(axis=(0, 1))  # (K,)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap_per_cat = np.where(counts > 0, sums / np.maximum(counts, 1) * 100, np.nan)  # (K,)
    ap_by_id = dict(zip(evaluated_ids, ap_per_cat.tolist()))
    return {name: float(ap_by_id[c]) for name, c in zip(class_names, cat_ids)}


def format_metrics_table(metrics: dict) -> str:
    """Readable text: a header row of the 12 metric names, a row of values (1 decimal), then one
    ``name  AP`` row per class when ``metrics["per_class"]`` is present."""

    def fmt(v: float | None) -> str:
        return "-" if v is None or not math.isfinite(v) else f"{v:.1f}"

    widths = [max(len(n), 5) for n in METRIC_NAMES]
    header = " | ".join(n.rjust(w) for n, w in zip(METRIC_NAMES, widths))
    values = " | ".join(fmt(metrics.get(n)).rjust(w) for n, w in zip(METRIC_NAMES, widths))
    lines = [header, "-" * len(header), values]
    per_class = metrics.get("per_class") or {}
    if per_class:
        name_w = max(len("class"), *(len(n) for n in per_class))
        lines += ["", f"{'class'.ljust(name_w)} | {'AP':>5}", "-" * (name_w + 8)]
        lines += [f"{n.ljust(name_w)} | {fmt(ap):>5}" for n, ap in per_class.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- inference
def _list_collate(batch: list) -> list:
    return batch


def _outputs_to_cpu(out: dict[str, Tensor]) -> dict[str, Tensor]:
    """Move one image's output to the CPU; floats back to float32 (AMP may give bf16/fp16)."""
    moved = {}
    for k, v in out.items():
        if isinstance(v, Tensor):
            v = v.detach().cpu()
            if v.is_floating_point():
                v = v.float()
        moved[k] = v
    return moved


def image_sizes(dataset: Dataset) -> np.ndarray | None:
    """(N, 2) stored image sizes of a ``CocoDetection`` (or a ``Subset`` of one), else None."""
    if isinstance(dataset, Subset):
        sizes = image_sizes(dataset.dataset)
        return None if sizes is None else sizes[np.asarray(dataset.indices, dtype=np.int64)]
    return getattr(dataset, "image_sizes", None)


def same_size_batches(sizes: Sequence[tuple[int, int]] | np.ndarray | None, num_images: int,
                      batch_size: int) -> list[list[int]]:
    """Batches of at most ``batch_size`` indices whose images have one stored size (so one size
    after the deterministic eval resize), sizes in order of first appearance, indices ascending.

    The model pads a batch to its largest image; padding changes a smaller image's features (near
    its border, and everywhere through GroupNorm's statistics), so an image's detections would
    depend on its neighbours, and differ from an exported model's, which runs each size alone.
    ``sizes`` None (unknown): plain consecutive batches."""
    if sizes is None:
        return [list(range(i, min(i + batch_size, num_images))) for i in range(0, num_images, batch_size)]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(np.asarray(sizes).tolist()):
        groups.setdefault((h, w), []).append(i)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def in_input_order(batches: Sequence[Sequence[int]], items: Sequence) -> list:
    """``items`` produced batch by batch (one per index of ``batches``, in that order) back in
    the order of the indices: ``same_size_batches``' inverse."""
    ordered: list = [None] * len(items)
    for index, item in zip((i for batch in batches for i in batch), items, strict=True):
        ordered[index] = item
    return ordered


def inference(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    num_workers: int = 2,
) -> tuple[list[dict[str, Tensor]], list[int]]:
    """Run ``model`` in eval mode over ``dataset``, in batches of one image size
    (``same_size_batches``); the outputs come back in dataset order.

    Images (uint8 (3, H, W)) go to ``device`` as they are (the model converts them);
    ``amp_dtype`` (e.g. ``torch.bfloat16``) enables autocast. The model's train/eval mode is
    restored afterwards.

    Returns:
        N outputs (``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,), on the CPU) and the N
        image ids taken from each target's ``image_id``.
    """
    device = torch.device(device)
    batches = same_size_batches(image_sizes(dataset), len(dataset), batch_size)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_list_collate,
        pin_memory=device.type == "cuda",
    )
    outputs: list[dict[str, Tensor]] = []
    image_ids: list[int] = []
    was_training = model.training
    model.eval()
    show = progress and sys.stderr.isatty()
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="inference", disable=not show, leave=False):
                images = [img.to(device, non_blocking=True) for img, _ in batch]  # uint8
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    batch_out = model(images)
                outputs.extend(_outputs_to_cpu(o) for o in batch_out)
                image_ids.extend(int(target["image_id"]) for _, target in batch)
    finally:
        model.train(was_training)
    return in_input_order(batches, outputs), in_input_order(batches, image_ids)


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str,
    out_dir: Path | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    num_workers: int = 2,
    backend: EvalBackend = "pycocotools",
    checkpoint: dict | None = None,
) -> dict:
    """``inference`` + ``to_coco_results`` + ``evaluate_detections`` on a ``CocoDetection``-like
    dataset (attributes ``coco``, ``cat_ids``, ``class_names``); ``backend`` as there.

    When ``out_dir`` is given, writes ``out_dir/detections.json`` (COCO results) and
    ``out_dir/metrics.json`` (the returned dict, NaN as null, and ``checkpoint``, what was
    scored, e.g. ``{"path": ..., "iteration": ...}``, under that key when given).
    """
    check_backend(backend)  # before inference, not after it
    outputs, image_ids = inference(
        model, dataset, batch_size, device, amp_dtype, progress, num_workers
    )
    cat_ids = list(dataset.cat_ids)
    results = to_coco_results(outputs, image_ids, cat_ids)
    metrics = evaluate_detections(
        dataset.coco, results, list(dataset.class_names), cat_ids, image_ids, backend
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir / "detections.json", results)
        record = metrics if checkpoint is None else {**metrics, "checkpoint": checkpoint}
        write_json(out_dir / "metrics.json", record)
    return metrics
