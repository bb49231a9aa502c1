"""eval.backend: faster-coco-eval must give pycocotools' 12 metrics and per-class AP (to 1e-9)."""

from __future__ import annotations

import math
import sys

import pytest

from benchmarks.eval_backends import synthetic_coco
from retina.config import ConfigError, load_config
from retina.engine.evaluate import METRIC_NAMES, EvalBackendError, evaluate_detections


def same(a: float, b: float) -> bool:
    """Equal up to floating-point summation order (seen: differences of 1e-14 percent points)."""
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9


def test_config_accepts_both_backends_and_refuses_others():
    assert load_config(None).eval.backend == "pycocotools"  # the reference stays the default
    assert load_config(None, ["eval.backend=faster_coco_eval"]).eval.backend == "faster_coco_eval"
    with pytest.raises(ConfigError, match="eval.backend"):
        load_config(None, ["eval.backend=fast"])


def test_missing_package_is_one_line_with_the_install_command(monkeypatch):
    coco, results = synthetic_coco(2, num_classes=3)
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import now raises ImportError
    with pytest.raises(EvalBackendError, match="pip install faster-coco-eval") as err:
        evaluate_detections(coco, results, backend="faster_coco_eval")
    assert "\n" not in str(err.value)


def test_unknown_backend_is_refused():
    coco, results = synthetic_coco(2, num_classes=3)
    with pytest.raises(EvalBackendError, match="pycocotools | faster_coco_eval"):
        evaluate_detections(coco, results, backend="detectron2")  # type: ignore[arg-type]


def test_identical_metrics_on_generated_detections():
    pytest.importorskip("faster_coco_eval")
    coco, results = synthetic_coco(60, num_classes=8, seed=3)
    # faster first: building its index from coco_gt.dataset must not change what pycocotools sees
    fast = evaluate_detections(coco, results, backend="faster_coco_eval")
    ref = evaluate_detections(coco, results, backend="pycocotools")
    assert list(fast)[:12] == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert same(fast[name], ref[name]), (name, fast[name], ref[name])
    assert 0 < ref["AP"] < 100 and 0 < ref["AR100"] < 100  # a non-trivial case, not all 0 or 100
    assert ref["per_class"].keys() == fast["per_class"].keys() and len(ref["per_class"]) == 8
    for name, ap in ref["per_class"].items():
        assert same(fast["per_class"][name], ap), name


def test_identical_on_subsets_of_images_and_classes():
    pytest.importorskip("faster_coco_eval")
    coco, results = synthetic_coco(30, num_classes=6, seed=5)
    kwargs = dict(class_names=["c2", "c5"], cat_ids=[2, 5], image_ids=list(range(1, 16)))
    fast = evaluate_detections(coco, results, backend="faster_coco_eval", **kwargs)
    ref = evaluate_detections(coco, results, backend="pycocotools", **kwargs)
    for name in METRIC_NAMES:
        assert same(fast[name], ref[name]), name
    assert list(fast["per_class"]) == ["c2", "c5"]
    assert all(same(fast["per_class"][n], ref["per_class"][n]) for n in ("c2", "c5"))


def test_perfect_detections_give_100_on_both():
    pytest.importorskip("faster_coco_eval")
    coco, _ = synthetic_coco(10, num_classes=4, seed=1)
    # Every non-crowd GT box detected exactly, score 1: every AP, and AR at 100 detections, is
    # 100 where the range has GT (AR1 and AR10 are capped below 100 by images with more boxes).
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0} for a in coco.dataset["annotations"] if not a["iscrowd"]]
    for backend in ("pycocotools", "faster_coco_eval"):
        m = evaluate_detections(coco, results, backend=backend)
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"):
            assert math.isnan(m[name]) or m[name] == pytest.approx(100.0), (backend, name)
        assert m["AP"] == 100.0 and m["per_class"] == {f"class{k}": 100.0 for k in range(1, 5)}
