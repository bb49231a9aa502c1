"""Tests for retina.engine.evaluate: COCO conversion, metrics derived by hand, files, inference.

COCO facts used in the derivations (pycocotools):
- area ranges use the annotation's ``area``: small < 32^2 = 1024 <= medium < 96^2 = 9216 <= large;
- a detection matches a GT at threshold t when IoU >= t, t in 0.50, 0.55, ..., 0.95 (10 values);
- precision is sampled at 101 recall points 0.00, 0.01, ..., 1.00; AP = mean of those samples,
  then the mean over thresholds; -1 (no GT in a range) is reported here as NaN.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from torch import nn
from torch.testing import assert_close

from retina.engine.evaluate import (
    METRIC_NAMES,
    evaluate,
    evaluate_detections,
    format_metrics_table,
    inference,
    summary_metrics,
    to_coco_results,
    write_json,
)


def make_coco(images: list[tuple[int, int, int]], anns: list[tuple[int, int, list[float]]],
              cats: list[tuple[int, str]]) -> COCO:  # fmt: skip
    """In-memory COCO GT. images: (id, H, W); anns: (image_id, category_id, [x, y, w, h])."""
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"}
                   for i, h, w in images],  # fmt: skip
        "annotations": [
            {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
             "iscrowd": 0}  # fmt: skip
            for k, (i, c, b) in enumerate(anns)
        ],
        "categories": [{"id": c, "name": n} for c, n in cats],
    }
    coco.createIndex()
    return coco


def det(image_id: int, cat: int, bbox: list[float], score: float = 1.0) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


# ------------------------------------------------------------------------------ conversion
def test_to_coco_results_xywh_and_noncontiguous_cat_ids():
    outputs = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 5.5, 2.25]]),
            "scores": torch.tensor([0.9, 0.5]),
            "labels": torch.tensor([2, 0]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0).long()},
        {"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "scores": torch.tensor([0.25]),
         "labels": torch.tensor([1])},  # fmt: skip
    ]
    results = to_coco_results(outputs, [42, 43, 44], cat_ids=[1, 7, 90])
    # [10, 20, 50, 80] XYXY -> x=10, y=20, w=50-10=40, h=80-20=60; label 2 -> id 90
    assert results == [
        {"image_id": 42, "category_id": 90, "bbox": [10.0, 20.0, 40.0, 60.0],
         "score": pytest.approx(0.9)},  # fmt: skip
        {"image_id": 42, "category_id": 1, "bbox": [0.0, 0.0, 5.5, 2.25], "score": 0.5},
        {"image_id": 44, "category_id": 7, "bbox": [1.0, 2.0, 2.0, 2.0], "score": 0.25},
    ]
    assert all(type(r["score"]) is float and type(r["category_id"]) is int for r in results)
    assert all(type(v) is float for r in results for v in r["bbox"])


# ------------------------------------------------------------------------------ evaluation
def test_perfect_detections_give_100_in_every_size_range():
    # areas: 20*20 = 400 (small), 50*50 = 2500 (medium), 120*120 = 14400 (large)
    gt = [(1, 1, [10.0, 10.0, 20.0, 20.0]), (1, 2, [100.0, 50.0, 50.0, 50.0]),
          (2, 1, [0.0, 0.0, 120.0, 120.0]), (3, 2, [30.0, 40.0, 50.0, 50.0])]  # fmt: skip
    coco = make_coco([(1, 200, 200), (2, 200, 200), (3, 200, 200)], gt, [(1, "a"), (2, "b")])
    results = [det(i, c, b) for i, c, b in gt]
    m = evaluate_detections(coco, results)
    # every GT matched with IoU 1 at rank 1: precision 1 at all 101 recall points, 10 thresholds.
    # AR1 is 100 too: pycocotools applies maxDets per (image, category) and each has <= 1 GT.
    assert {n: m[n] for n in METRIC_NAMES} == {n: pytest.approx(100.0) for n in METRIC_NAMES}
    assert m["per_class"] == {"a": pytest.approx(100.0), "b": pytest.approx(100.0)}


def test_shifted_box_iou_two_thirds_gives_ap_40_and_nan_for_empty_ranges():
    # GT [0, 0, 100, 100] XYWH, area 10000 >= 9216: "large". Detection shifted by 20 px in x:
    # overlap 80 * 100 = 8000, IoU = 8000 / (10000 + 10000 - 8000) = 2/3 = 0.667.
    # TP at t = 0.50, 0.55, 0.60, 0.65 (4 of 10) with precision 1 at all 101 recall points,
    # FP (AP 0) at 0.70..0.95 -> AP = 4 / 10 = 0.4.
    coco = make_coco([(1, 200, 200)], [(1, 3, [0.0, 0.0, 100.0, 100.0])], [(3, "square")])
    m = evaluate_detections(coco, [det(1, 3, [20.0, 0.0, 100.0, 100.0], 0.8)])
    assert m["AP"] == pytest.approx(40.0)
    assert m["AP50"] == pytest.approx(100.0)  # 0.667 >= 0.50
    assert m["AP75"] == pytest.approx(0.0)  # 0.667 < 0.75
    assert m["APl"] == pytest.approx(40.0)
    assert math.isnan(m["APs"]) and math.isnan(m["APm"])  # no small/medium GT: -1 -> NaN
    assert math.isnan(m["ARs"]) and math.isnan(m["ARm"])
    # recall 1 at 4 of 10 thresholds -> AR = 0.4
    assert m["AR1"] == m["AR10"] == m["AR100"] == m["ARl"] == pytest.approx(40.0)
    assert m["per_class"] == {"square": pytest.approx(40.0)}


def test_half_recall_gives_51_of_101_points():
    # Two GT, one detected exactly: at every threshold recall = 1/2 with precision 1.
    # Precision is 1 at recall points 0.00..0.50 (51 of 101) and 0 above -> AP = 51/101.
    coco = make_coco([(1, 400, 400)],
                     [(1, 1, [0.0, 0.0, 100.0, 100.0]), (1, 1, [200.0, 200.0, 100.0, 100.0])],
                     [(1, "thing")])  # fmt: skip
    m = evaluate_detections(coco, [det(1, 1, [0.0, 0.0, 100.0, 100.0], 0.9)])
    assert m["AP"] == pytest.approx(100 * 51 / 101)
    assert m["AP50"] == m["AP75"] == pytest.approx(100 * 51 / 101)
    assert m["AR100"] == pytest.approx(50.0)  # 1 of 2 GT at every threshold


def test_per_class_ap_with_noncontiguous_ids_and_custom_names():
    # class id 7: perfect -> 100; class id 90: shifted (IoU 2/3) -> 40; AP = (100 + 40) / 2 = 70
    coco = make_coco([(1, 300, 300)],
                     [(1, 7, [0.0, 0.0, 100.0, 100.0]), (1, 90, [150.0, 150.0, 100.0, 100.0])],
                     [(7, "cat7"), (90, "cat90")])  # fmt: skip
    results = [det(1, 7, [0.0, 0.0, 100.0, 100.0]), det(1, 90, [170.0, 150.0, 100.0, 100.0])]
    m = evaluate_detections(coco, results, class_names=["y", "x"], cat_ids=[90, 7])
    assert m["per_class"] == {"y": pytest.approx(40.0), "x": pytest.approx(100.0)}
    assert m["AP"] == pytest.approx(70.0)


def test_summary_metrics_in_percent_with_nan_for_missing_ranges():
    # 12 COCOeval stats then faster-coco-eval's AR50, AR75 (dropped); -1 = no GT in that range
    stats = [0.5, -1.0, 0.25, 0.0, 1.0, 0.125, 0.5, 0.5, 0.75, -1.0, 0.5, 0.5, 0.9, 0.8]
    m = summary_metrics(stats)
    assert list(m) == list(METRIC_NAMES)
    assert (m["AP"], m["AP75"], m["APs"], m["APm"], m["APl"], m["AR100"]) == (50.0, 25.0, 0.0, 100.0, 12.5, 75.0)
    assert math.isnan(m["AP50"]) and math.isnan(m["ARs"])


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_zero_detections_give_zero_without_error(backend):
    if backend == "faster_coco_eval":
        pytest.importorskip("faster_coco_eval", reason="optional evaluator")
    # one small box (10 x 10 = 100 px < 32^2) of class a, no box of class b: every value of a
    # range or class with ground truth is 0; medium, large and class b have none, so they are NaN,
    # as with detections (it was 0.0 everywhere: APl 0.0 for a set without large objects)
    coco = make_coco([(1, 100, 100)], [(1, 1, [0.0, 0.0, 10.0, 10.0])], [(1, "a"), (2, "b")])
    m = evaluate_detections(coco, [], backend=backend)
    assert [m[n] for n in ("AP", "AP50", "AP75", "APs", "AR1", "AR10", "AR100", "ARs")] == [0.0] * 8
    assert all(math.isnan(m[n]) for n in ("APm", "APl", "ARm", "ARl"))
    assert m["per_class"]["a"] == 0.0 and math.isnan(m["per_class"]["b"])


def test_format_metrics_table_lists_all_names_and_classes():
    metrics = {n: float(i) for i, n in enumerate(METRIC_NAMES)}
    metrics["APs"] = float("nan")
    metrics["per_class"] = {"circle": 12.345, "square": float("nan")}
    table = format_metrics_table(metrics)
    header, _, values = table.splitlines()[:3]
    assert header.split() == " | ".join(METRIC_NAMES).split()
    # values 0.0, 1.0, 2.0, NaN -> "-", 4.0, ... 11.0 with 1 decimal
    expected = ["0.0", "1.0", "2.0", "-"] + [f"{i}.0" for i in range(4, 12)]
    assert [v for v in values.split() if v != "|"] == expected
    assert "circle |  12.3" in table and "square |     -" in table


def test_write_json_nan_as_null_and_atomic(tmp_path: Path):
    path = tmp_path / "sub" / "m.json"
    write_json(path, {"a": float("nan"), "b": [1.5, float("nan")], "c": {"d": 2}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "c": {"d": 2}}
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json"]  # no temp file left


# ------------------------------------------------------------------------------- inference
class FakeDataset:
    """CocoDetection-like: image i is filled with the value i so the fake model can tell them
    apart; ids are non-contiguous."""

    def __init__(self, coco: COCO, ids: list[int], cat_ids: list[int], class_names: list[str]):
        self.coco, self.ids, self.cat_ids, self.class_names = coco, ids, cat_ids, class_names

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        info = self.coco.imgs[self.ids[i]]
        image = torch.full((3, info["height"], info["width"]), i, dtype=torch.uint8)
        return image, {"image_id": self.ids[i]}


class FakeModel(nn.Module):
    """Returns ``outputs[i]`` for an image filled with value i; records its inputs."""

    def __init__(self, outputs: list[dict]):
        super().__init__()
        self.outputs = outputs
        self.seen: list[tuple[torch.dtype, float, bool]] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        self.seen += [(im.dtype, float(im.max()), self.training) for im in images]
        return [self.outputs[int(im[0, 0, 0])] for im in images]


def test_evaluate_end_to_end_writes_files_and_restores_mode(tmp_path: Path):
    # image 10: one GT detected exactly; image 20: one GT shifted by 20 px (IoU 2/3)
    # -> per threshold: t <= 0.65 both TP (AP 1), t >= 0.70 one TP ranked first by score
    #    (recall 1/2, AP 51/101). AP = (4 * 1 + 6 * 51/101) / 10.
    coco = make_coco([(10, 120, 120), (20, 120, 120)],
                     [(10, 5, [0.0, 0.0, 100.0, 100.0]), (20, 5, [0.0, 0.0, 100.0, 100.0])],
                     [(5, "box")])  # fmt: skip
    outputs = [
        {"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0]]), "scores": torch.tensor([0.9]),
         "labels": torch.tensor([0])},  # fmt: skip
        {"boxes": torch.tensor([[20.0, 0.0, 120.0, 100.0]]), "scores": torch.tensor([0.8]),
         "labels": torch.tensor([0])},  # fmt: skip
    ]
    model = FakeModel(outputs).train()
    ds = FakeDataset(coco, [10, 20], [5], ["box"])
    m = evaluate(model, ds, batch_size=2, device="cpu", out_dir=tmp_path, progress=False,
                 num_workers=0)  # fmt: skip
    assert m["AP"] == pytest.approx(100 * (4 * 1 + 6 * 51 / 101) / 10)
    assert model.training  # mode restored
    # images reached the model as the dataset gives them, uint8 (image 1 filled with 1), in eval
    # mode: the model converts them itself
    assert model.seen == [(torch.uint8, 0.0, False), (torch.uint8, 1.0, False)]
    dets = json.loads((tmp_path / "detections.json").read_text())
    assert dets == [
        {"image_id": 10, "category_id": 5, "bbox": [0.0, 0.0, 100.0, 100.0],
         "score": pytest.approx(0.9)},  # fmt: skip
        {"image_id": 20, "category_id": 5, "bbox": [20.0, 0.0, 100.0, 100.0],
         "score": pytest.approx(0.8)},  # fmt: skip
    ]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["APs"] is None  # NaN written as null
    assert saved["AP"] == pytest.approx(m["AP"])
    assert "checkpoint" not in saved and "checkpoint" not in m  # nobody said what was scored
    # the checkpoint scored goes into metrics.json beside the metrics, not into the returned dict
    scored = {"path": "runs/x/model_final.pth", "iteration": 1500}
    m2 = evaluate(FakeModel(outputs), ds, batch_size=2, device="cpu", out_dir=tmp_path / "e2", progress=False,
                  num_workers=0, checkpoint=scored)  # fmt: skip
    saved = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert saved["checkpoint"] == scored and "checkpoint" not in m2
    assert saved["AP"] == pytest.approx(m["AP"])


def test_inference_batches_in_order_on_cpu():
    coco = make_coco([(i, 8, 8) for i in (3, 1, 2)], [], [(1, "a")])
    outputs = [{"boxes": torch.full((1, 4), float(i)), "scores": torch.ones(1),
                "labels": torch.zeros(1, dtype=torch.long)} for i in range(3)]  # fmt: skip
    outs, ids = inference(FakeModel(outputs), FakeDataset(coco, [3, 1, 2], [1], ["a"]),
                          batch_size=2, device="cpu", progress=False, num_workers=0)  # fmt: skip
    assert ids == [3, 1, 2]  # dataset order, across a batch boundary (2 + 1)
    assert [float(o["boxes"][0, 0]) for o in outs] == [0.0, 1.0, 2.0]
    assert all(o["boxes"].device.type == "cpu" for o in outs)


def test_same_size_batches_group_by_stored_size():
    from retina.engine.evaluate import same_size_batches

    sizes = np.array([[10, 20], [30, 40], [10, 20], [30, 40], [10, 20]])
    # sizes in order of first appearance, at most 2 per batch, indices ascending
    assert same_size_batches(sizes, 5, 2) == [[0, 2], [4], [1, 3]]
    assert same_size_batches(None, 5, 2) == [[0, 1], [2, 3], [4]]
    assert same_size_batches(sizes, 5, 8) == [[0, 2, 4], [1, 3]]


def test_in_input_order_inverts_the_batches():
    from retina.engine.evaluate import in_input_order

    # batches [[0, 2], [4], [1, 3]] produce the items of images 0, 2, 4, 1, 3 in that order
    assert in_input_order([[0, 2], [4], [1, 3]], ["a", "c", "e", "b", "d"]) == ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError):  # an item missing: never a silent None
        in_input_order([[0, 1]], ["a"])


def test_inference_outputs_do_not_depend_on_neighbours_and_keep_dataset_order(tmp_path):
    """Two image sizes in one eval batch: every image's detections equal those of the image run
    alone (no padding by a larger neighbour), and outputs come back in dataset order."""
    from torch.utils.data import Subset

    from retina.config import config_from_dict
    from retina.data import CocoDetection
    from retina.data.transforms import build_transforms
    from retina.engine.evaluate import image_sizes, inference
    from retina.model import build_model

    from test_voc_yolo import make_voc
    from retina.data.convert import read_folder

    root = make_voc(tmp_path / "voc")
    (root / "ImageSets" / "Main" / "all.txt").write_text("a\nc\n")
    folder = read_folder(root, "voc", ("all",))
    # a.jpg 40x30 -> 85x64, padded to 96x64; c.jpg 32x32 -> 64x64, which a batch with a would pad
    tf = build_transforms((64,), 200, 0.0, train=False)
    ds = CocoDetection(folder.splits["all"], folder.image_dirs["all"], tf)
    assert image_sizes(ds).tolist() == [[30, 40], [32, 32]]
    assert image_sizes(Subset(ds, [1])).tolist() == [[32, 32]]
    cfg = config_from_dict({"model": {"num_classes": 3, "backbone": {"depth": 18, "weights": None},
                                      "fpn": {"channels": 64}, "head": {"num_convs": 1, "norm": "gn"},
                                      "input": {"min_size": [64], "max_size": 200,
                                                "size_divisibility": 32},
                                      "inference": {"score_thresh": 0.0}}})
    torch.manual_seed(0)
    model = build_model(cfg)
    both, ids = inference(model, ds, 2, "cpu", num_workers=0)
    assert ids == [int(ds.ids[0]), int(ds.ids[1])]
    for k in range(2):
        alone, _ = inference(model, Subset(ds, [k]), 1, "cpu", num_workers=0)
        assert_close(both[k]["boxes"], alone[0]["boxes"])
        assert_close(both[k]["scores"], alone[0]["scores"])
