"""The shapes set's absent classes (``data.shapes.extra_classes``, E): the evaluation of the
classes that occur is unchanged by them, detections predicted for them included; the images and
boxes are the same for every E; the Table 1 presets that sweep E plan without training.

COCO facts used (pycocotools' COCOeval): a detection matches a GT of its own category at
threshold t when IoU >= t, t in 0.50, 0.55, ..., 0.95; a category with no GT in any image keeps
precision -1 (``accumulate`` skips it), so the mean over categories leaves it out.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from pycocotools.coco import COCO

from retina.config import config_from_dict, find_config, load_config
from retina.data import build_dataset, dataset_paths
from retina.data.shapes import categories, class_names, with_absent_classes
from retina.engine.evaluate import evaluate_detections
from retina.errors import InputError
from retina.studies.ablate import plan_sweep

NO_FASTER = importlib.util.find_spec("faster_coco_eval") is None
BACKENDS = ["pycocotools", pytest.param("faster_coco_eval", marks=pytest.mark.skipif(
    NO_FASTER, reason="faster-coco-eval not installed"))]

# Two 64 x 64 images, one GT per real class: a square (id 1) [10, 10, 20, 20] and a circle (id 2)
# [40, 40, 16, 16] in image 1, a triangle (id 3) [5, 5, 30, 30] in image 2 (COCO xywh).
GT_IMAGES = [{"id": 1, "file_name": "1.png", "width": 64, "height": 64},
             {"id": 2, "file_name": "2.png", "width": 64, "height": 64}]
GT_ANNOTATIONS = [
    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
    {"id": 2, "image_id": 1, "category_id": 2, "bbox": [40, 40, 16, 16], "area": 256, "iscrowd": 0},
    {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 30, 30], "area": 900, "iscrowd": 0},
]
# The square found exactly (IoU 1); the circle by a 16 x 11 box inside it, IoU 176 / 256 =
# 0.6875: matched at t = .50, .55, .60, .65, missed from .70 on; the triangle not found.
REAL_DETECTIONS = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
                   {"image_id": 1, "category_id": 2, "bbox": [40, 40, 16, 11], "score": 0.8}]
# Absent-class detections scored above every real one: on the square's box, on the triangle's
# and on empty background.
ABSENT_DETECTIONS = [{"image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "score": 0.99},
                     {"image_id": 2, "category_id": 6, "bbox": [5, 5, 30, 30], "score": 0.98},
                     {"image_id": 2, "category_id": 8, "bbox": [40, 0, 20, 20], "score": 0.97}]


def _gt(extra_classes: int) -> COCO:
    coco = COCO()
    coco.dataset = with_absent_classes({"images": GT_IMAGES, "annotations": GT_ANNOTATIONS,
                                        "categories": categories(0)}, extra_classes)
    coco.createIndex()
    return coco


@pytest.mark.parametrize("backend", BACKENDS)
def test_absent_classes_leave_the_evaluation_of_the_real_ones_unchanged(backend):
    # One GT per class, so a class's AP at threshold t is 1 when its GT is matched (precision 1 at
    # every recall up to 1), else 0; AP = the mean over the 10 thresholds:
    # square 10/10 = 100, circle 4/10 = 40 (matched up to .65), triangle 0.
    # AP = (100 + 40 + 0) / 3 = 46.667; AP50 = (100 + 100 + 0) / 3 = 66.667; AP75 = (100 + 0 + 0) / 3 = 33.333
    plain = evaluate_detections(_gt(0), REAL_DETECTIONS, backend=backend)
    assert plain["AP"] == pytest.approx(140 / 3, abs=1e-6)
    assert plain["AP50"] == pytest.approx(200 / 3, abs=1e-6)
    assert plain["AP75"] == pytest.approx(100 / 3, abs=1e-6)
    assert plain["per_class"] == {"square": pytest.approx(100.0), "circle": pytest.approx(40.0),
                                  "triangle": pytest.approx(0.0)}
    for extra in (5, 77):
        wide = evaluate_detections(_gt(extra), REAL_DETECTIONS, backend=backend)  # every K = 3 + E category
        assert len(wide["per_class"]) == 3 + extra
        assert {m: wide[m] for m in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100")} == pytest.approx(
            {m: plain[m] for m in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100")}, abs=1e-9)
        real = {name: wide["per_class"].pop(name) for name in ("square", "circle", "triangle")}
        assert real == pytest.approx(plain["per_class"])
        assert all(math.isnan(ap) for ap in wide["per_class"].values())  # no GT: -1, reported NaN


@pytest.mark.parametrize("backend", BACKENDS)
def test_detections_of_absent_classes_are_ignored(backend):
    # An absent class has no GT: its detections are never matched, but COCOeval skips the class
    # in the mean, and a detection only competes with the GT of its own category, so even the one
    # on the square's box (category 4) takes nothing from the square: AP stays 46.667.
    plain = evaluate_detections(_gt(5), REAL_DETECTIONS, backend=backend)
    noisy = evaluate_detections(_gt(5), REAL_DETECTIONS + ABSENT_DETECTIONS, backend=backend)
    assert noisy["AP"] == pytest.approx(140 / 3, abs=1e-6)
    assert {m: noisy[m] for m in plain if m != "per_class"} == pytest.approx(
        {m: plain[m] for m in plain if m != "per_class"}, nan_ok=True)
    assert all(math.isnan(noisy["per_class"][f"absent {k}"]) for k in (4, 6, 8))


def test_absent_classes_need_a_shapes_split():
    coco = {"images": GT_IMAGES, "annotations": [], "categories": [{"id": 1, "name": "dog"}]}
    with pytest.raises(InputError, match="data.shapes.extra_classes=5: the annotations' categories are"):
        with_absent_classes(coco, 5)
    assert class_names(2) == ["square", "circle", "triangle", "absent 4", "absent 5"]


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_images_and_boxes_are_the_same_for_every_e(tiny_shapes, tiny_shapes_overrides):
    before = _files(tiny_shapes)
    cfgs = {e: config_from_dict({}, [*tiny_shapes_overrides, f"data.shapes.extra_classes={e}"])
            for e in (0, 5, 77)}
    sets = {e: build_dataset(cfg, "val") for e, cfg in cfgs.items()}
    # One set on disk serves every E: the same folder, and reading it with absent classes writes
    # nothing (every file, the json included, byte for byte as it was).
    assert {dataset_paths(cfg, "val") for cfg in cfgs.values()} == {dataset_paths(cfgs[0], "val")}
    assert _files(tiny_shapes) == before
    on_disk = json.loads((tiny_shapes / "annotations" / "instances_val.json").read_text())
    assert on_disk["categories"] == categories(0)
    for e, dataset in sets.items():
        assert (dataset.num_classes, dataset.class_names) == (3 + e, class_names(e))
        assert dataset.coco.dataset["images"] == on_disk["images"]
        assert dataset.coco.dataset["annotations"] == on_disk["annotations"]
        for i in range(len(dataset)):
            (image, target), (image0, target0) = dataset[i], sets[0][i]
            assert torch.equal(image, image0)
            assert torch.equal(target["boxes"], target0["boxes"])
            assert torch.equal(target["labels"], target0["labels"])
            assert (target["labels"] < 3).all()  # no object of an absent class (labels 3..K-1)


def test_the_imbalance_presets_plan_without_training(tmp_path):
    core_path, end_path = find_config("ablations/imbalance_core"), find_config("ablations/imbalance_coco_end")
    core = plan_sweep(core_path, [], [], tmp_path / "core")  # every run's config is loaded and checked
    end = plan_sweep(end_path, [], [], tmp_path / "end")
    # Core: 5 values of E x (FL gamma 2 alpha .25, CE gamma 0 alpha .75) x 3 seeds = 30 runs,
    # seed 0 first (10): FL at every E, then CE at every E.
    assert len(core) == 5 * 2 * 3 == 30
    assert core[0].name == "extra_classes=0,gamma=2,alpha=0.25,seed=0"
    assert core[5].name == "extra_classes=0,gamma=0,alpha=0.75,seed=0"
    assert core[9].name == "extra_classes=400,gamma=0,alpha=0.75,seed=0"
    assert core[10].name == "extra_classes=0,gamma=2,alpha=0.25,seed=1"
    values = sorted({int(o.split("=")[1]) for r in core for o in r.overrides
                     if o.startswith("data.shapes.extra_classes=")})
    assert values == [0, 77, 200, 300, 400]
    # The COCO-like end: CE alpha .25 + FL (gamma .5, 1, 5) + OHEM (1:3, no ratio) + FL without the
    # prior = 7 x 3 seeds = 21, every one at E = 400 and named apart from the core's, so both can
    # share one folder.
    assert len(end) == 7 * 3 == 21
    assert all(r.name.startswith("extra_classes=400,") for r in end)
    assert not {r.name for r in end} & {r.name for r in core}
    names = {r.name for r in end}
    assert "extra_classes=400,gamma=0,alpha=0.25,seed=2" in names
    assert "extra_classes=400,type=ohem,gamma=0,alpha=null,ratio=0.25,batch_size=128,nms=0.7,seed=0" in names
    # One model and one run length: the end's base is the core, whose base is shapes_focal.
    assert load_config(end_path) == load_config(core_path)
    cfg = load_config(core_path, ["data.shapes.extra_classes=400"])
    assert (cfg.solver.max_iter, cfg.model.fpn.channels, cfg.data.shapes.extra_classes) == (2400, 64, 400)
    assert cfg.train.eval_period == 300  # 8 evaluations: every run has its learning curve
