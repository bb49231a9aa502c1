"""`retina analyze errors` on hand-made detections: precision/recall points, F1-best thresholds,
the confusion matrix, TIDE's error types and AP per object-count bin, all derived by hand.

Every box is 10 x 10 px in a 100 x 100 image, so IoUs are easy: two boxes shifted by s px along
one axis overlap (10 - s) * 10 px, IoU = (10 - s) * 10 / (200 - (10 - s) * 10).
COCOeval samples precision at R = 101 recall points 0, .01, ..., 1 and keeps at each the highest
precision reached at that recall or beyond (0 past the largest recall); AP is their mean.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from retina.cli import main
from retina.studies import coco_breakdown as cb
from retina.studies.confusion import confusion_matrix, greedy_match
from retina.studies.errors import analyze_errors, format_summary, load_ground_truth
from retina.studies.tide import tide_breakdown

CAT, DOG = 1, 2


def make_gt(images: dict[int, list[tuple[int, list[float]]]], crowd: dict[int, list] | None = None) -> dict:
    """COCO ground truth: ``images`` maps image id -> [(category id, [x, y, w, h]), ...]."""
    anns = []
    for image_id, objects in images.items():
        for cat, box in objects:
            anns.append({"image_id": image_id, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
        for cat, box in (crowd or {}).get(image_id, []):
            anns.append({"image_id": image_id, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 1})
    for i, a in enumerate(anns, start=1):
        a["id"] = i
    return {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in images],
            "annotations": anns, "categories": [{"id": CAT, "name": "cat"}, {"id": DOG, "name": "dog"}]}


def to_coco(gt: dict) -> COCO:
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    return coco


def det(image_id: int, cat: int, box: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


# ------------------------------------------------------------------ precision/recall and F1
# Image 1: cats A, C and dog B. Detections, by score: cat on A (.9, TP), cat on nothing (.8, FP),
# cat on C (.7, TP), dog on B (.6, TP), dog on nothing (.5, FP).
A, B, C = [0, 0, 10, 10], [20, 20, 10, 10], [40, 40, 10, 10]
PR_GT = make_gt({1: [(CAT, A), (DOG, B), (CAT, C)]})
PR_DETS = [det(1, CAT, A, 0.9), det(1, CAT, [70, 70, 10, 10], 0.8), det(1, CAT, C, 0.7),
           det(1, DOG, B, 0.6), det(1, DOG, [70, 0, 10, 10], 0.5)]


def test_precision_recall_points_and_f1_best():
    coco_eval = cb.run_cocoeval(to_coco(PR_GT), PR_DETS, [CAT, DOG])
    curves = cb.precision_curves(coco_eval, 0.5)  # (K, R)
    assert curves.shape == (2, 101)
    # cat, 2 GT: (recall, precision) after each detection = (1/2, 1), (1/2, 1/2), (2/2, 2/3).
    # Recall points 0 .. .50 (51 of them) reach precision 1; .51 .. 1 (50) reach at most 2/3.
    expected_cat = np.array([1.0] * 51 + [2 / 3] * 50)
    np.testing.assert_allclose(curves[0], expected_cat)
    # dog, 1 GT: (1, 1) after its first detection: precision 1 at every recall point.
    np.testing.assert_allclose(curves[1], np.ones(101))
    # The boxes are exact, so the curves at IoU .75 are the same.
    np.testing.assert_allclose(cb.precision_curves(coco_eval, 0.75), curves)
    aps = cb.per_class_ap(coco_eval)
    # AP50(cat) = (51 * 1 + 50 * 2/3) / 101 = 84.333 / 101 = 83.50 %
    np.testing.assert_allclose(aps["AP50"], [100 * (51 + 50 * 2 / 3) / 101, 100.0])

    per_class, pooled = cb.f1_thresholds(coco_eval, 0.5)
    # cat: score >= .9: P 1, R 1/2, F1 = 2 * 1 * .5 / 1.5 = .667; >= .8: P 1/2, R 1/2, F1 .5;
    # >= .7: P 2/3, R 1, F1 = 2 * (2/3) / (5/3) = .8  -> best at .7 (2 TP, 1 FP).
    assert per_class[0] == pytest.approx({"score_thresh": 0.7, "f1": 0.8, "precision": 2 / 3,
                                          "recall": 1.0, "tp": 2, "fp": 1})
    # dog: >= .6: P 1, R 1, F1 1.
    assert per_class[1]["score_thresh"] == pytest.approx(0.6) and per_class[1]["f1"] == pytest.approx(1.0)
    # Pooled, 3 GT: .9 -> P 1 R 1/3 F1 .5; .8 -> P 1/2 R 1/3 F1 .4; .7 -> P 2/3 R 2/3 F1 .667;
    # .6 -> P 3/4 R 1 F1 = 1.5 / 1.75 = .857; .5 -> P 3/5 R 1 F1 = 1.2 / 1.6 = .75 -> best at .6.
    assert pooled["score_thresh"] == pytest.approx(0.6)
    assert pooled["f1"] == pytest.approx(2 * 0.75 / 1.75)


def test_f1_best_counts_tied_scores_together():
    # Scores .9 (TP), .5 (TP), .5 (FP), 2 GT. Stopping between the two .5s would give P 1, R 1,
    # F1 1, but "score >= .5" keeps both: P 2/3, R 1, F1 .8 (vs .667 at .9) -> .5 with F1 .8.
    best = cb.f1_best(np.array([0.9, 0.5, 0.5]), np.array([True, True, False]), 2)
    assert best == pytest.approx({"score_thresh": 0.5, "f1": 0.8, "precision": 2 / 3, "recall": 1.0,
                                  "tp": 2, "fp": 1})
    assert cb.f1_best(np.array([0.9]), np.array([False]), 2) is None  # no true positive
    assert cb.f1_best(np.zeros(0), np.zeros(0, dtype=bool), 0) is None  # no ground truth


# ----------------------------------------------------------------------------- confusion
def test_greedy_match_by_score_not_by_iou():
    # Detections sorted by score. The first takes GT 0 (IoU .6) although the second overlaps it
    # more (.9): greedy by score, as COCO matches. The second then has nothing left >= .5.
    iou = torch.tensor([[0.6, 0.0], [0.9, 0.4]])
    assert greedy_match(iou, 0.5).tolist() == [0, -1]
    assert greedy_match(torch.zeros(0, 3), 0.5).tolist() == []  # no detection
    assert greedy_match(torch.zeros(2, 0), 0.5).tolist() == [-1, -1]  # no GT


def test_confusion_matrix_counts():
    # Image 1: cat A, dog B, cat C. At score >= .5:
    #   cat on A (.9)           -> (cat, cat)  correct
    #   cat on B (.8)           -> (dog, cat)  wrong class
    #   cat on empty spot (.7)  -> (background, cat)  spurious
    #   cat on A shifted 1 px (.6): IoU 90 / 110 = .82 with A, already taken -> (background, cat)
    #   dog on empty spot (.3)  -> below the threshold, not counted
    #   C, nobody on it         -> (cat, background)  missed
    gt = make_gt({1: [(CAT, A), (DOG, B), (CAT, C)]})
    dets = [det(1, CAT, A, 0.9), det(1, CAT, B, 0.8), det(1, CAT, [60, 60, 10, 10], 0.7),
            det(1, CAT, [1, 0, 10, 10], 0.6), det(1, DOG, [80, 80, 10, 10], 0.3)]
    matrix = confusion_matrix(to_coco(gt), dets, [CAT, DOG], [1], score_thresh=0.5)
    # rows: GT cat, dog, background; columns: predicted cat, dog, background
    assert matrix.tolist() == [[1, 0, 1],
                               [1, 0, 0],
                               [2, 0, 0]]
    # At .25 the dog detection counts too: one more spurious dog.
    matrix = confusion_matrix(to_coco(gt), dets, [CAT, DOG], [1], score_thresh=0.25)
    assert matrix[2].tolist() == [2, 1, 0]


def test_confusion_matrix_crowd_region_is_neither_missed_nor_spurious():
    # A crowd box [50, 50, 40, 40] and one cat. A cat detection inside the crowd box (its whole
    # area, >= .5 of it) is dropped; the crowd box itself is never a missed object.
    gt = make_gt({1: [(CAT, A)]}, crowd={1: [(CAT, [50, 50, 40, 40])]})
    dets = [det(1, CAT, A, 0.9), det(1, CAT, [60, 60, 10, 10], 0.8)]
    matrix = confusion_matrix(to_coco(gt), dets, [CAT, DOG], [1], score_thresh=0.5)
    assert matrix.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_confusion_threshold_defaults_to_pooled_f1_best(tmp_path):
    summary = analyze_errors(to_coco(PR_GT), PR_DETS, tmp_path)
    assert summary["suggested_score_thresh"] == pytest.approx(0.6)  # derived above
    assert summary["confusion"]["score_thresh"] == pytest.approx(0.6)
    # At >= .6: cat on A, cat on C, dog on B correct; the .8 cat is spurious; the .5 dog is out.
    assert summary["confusion"]["matrix"] == [[2, 0, 0], [0, 1, 0], [1, 0, 0]]


def test_no_detections_is_every_box_missed(tmp_path):
    # a model that detects nothing (early in training, or a too-high score threshold) is a
    # result to report, not an error: AP 0, and each of the 3 GT boxes in the "missed" column
    summary = analyze_errors(to_coco(PR_GT), [], tmp_path)
    assert summary["num_detections"] == 0 and summary["num_gt"] == 3
    assert summary["metrics"]["AP"] == 0.0 and summary["metrics"]["AP50"] == 0.0
    assert {n: c["AP"] for n, c in summary["per_class"].items()} == {"cat": 0.0, "dog": 0.0}
    assert summary["suggested_score_thresh"] is None and summary["confusion"]["score_thresh"] == 0.3
    assert summary["confusion"]["matrix"] == [[0, 0, 2], [0, 0, 1], [0, 0, 0]]
    assert summary["pr_curves"]["iou_0.50"]["cat"] == [0.0] * 101
    assert summary["ap_by_num_objects"]["2-3"]["AP"] == 0.0
    assert summary["tide"] is None and summary["tide_skipped"] == "no detections"  # TIDE's AP needs one
    assert "TIDE: skipped, there are no detections" in format_summary(summary)
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"

# ---------------------------------------------------------------------------------- TIDE
# Ground truth: cats A and F, dog B. Correct detections: cat on A (.9), cat on F (.5), dog on B
# (.5). Each case plants one error at score .7, between the two cat detections.
F = [50, 50, 10, 10]
TIDE_GT = {1: [(CAT, A), (CAT, F), (DOG, B)]}
TIDE_BASE = [det(1, CAT, A, 0.9), det(1, CAT, F, 0.5), det(1, DOG, B, 0.5)]
# A cat FP ranked between the two cat TPs: cat's points (1/2, 1), (1/2, 1/2), (1, 2/3) give
# AP50 = (51 + 50 * 2/3) / 101 = 83.50; dropping it gives 100. dog's AP50 stays 100, so
# dAP50 = (100 - 83.50) / 2 = 8.25.
CAT_FP_DAP = (100 - 100 * (51 + 50 * 2 / 3) / 101) / 2
TIDE_CASES = {
    # wrong class, IoU 1 with dog B (already found by the dog detection): dropped when fixed
    "classification": ([det(1, CAT, B, 0.7)], {}, CAT_FP_DAP),
    # right class, IoU with F = 50 / 150 = .33, between .1 and .5
    "localisation": ([det(1, CAT, [55, 50, 10, 10], 0.7)], {}, CAT_FP_DAP),
    # right class, IoU 90 / 110 = .82 with A, which the .9 detection holds
    "duplicate": ([det(1, CAT, [1, 0, 10, 10], 0.7)], {}, CAT_FP_DAP),
    # IoU 0 with every GT box
    "background": ([det(1, CAT, [80, 80, 10, 10], 0.7)], {}, CAT_FP_DAP),
    # a dog with IoU .33 with cat F: wrong class and badly placed. It ranks above the dog TP:
    # dog's AP50 = 50 (precision 1/2 at recall 1) -> 100 when dropped; dAP50 = (100 - 50) / 2 = 25.
    "both": ([det(1, DOG, [55, 50, 10, 10], 0.7)], {}, 25.0),
    # one more cat M that nobody detects: cat's points (1/3, 1), (2/3, 1): recall points
    # 0 .. .66 (67) at 1, AP50 = 67 / 101 = 66.34; without M: 100. dAP50 = (100 - 66.34) / 2.
    "missed": ([], {1: [(CAT, [80, 0, 10, 10])]}, (100 - 100 * 67 / 101) / 2),
}


@pytest.mark.parametrize("planted", list(TIDE_CASES))
def test_tide_finds_the_planted_error(planted):
    pytest.importorskip("tidecv", reason="TIDE needs the optional tidecv package (retina[analysis])")
    extra_dets, extra_gt, expected_dap = TIDE_CASES[planted]
    images = {i: objs + extra_gt.get(i, []) for i, objs in TIDE_GT.items()}
    tide = tide_breakdown(to_coco(make_gt(images)), TIDE_BASE + extra_dets, [CAT, DOG], [1])
    assert tide["counts"] == {t: int(t == planted) for t in tide["counts"]}
    assert tide["dAP"][planted] == pytest.approx(expected_dap, abs=1e-6)
    assert all(v == 0 for t, v in tide["dAP"].items() if t != planted), tide["dAP"]


def test_tide_of_correct_detections_is_all_zero():
    pytest.importorskip("tidecv", reason="TIDE needs the optional tidecv package (retina[analysis])")
    tide = tide_breakdown(to_coco(make_gt(TIDE_GT)), TIDE_BASE, [CAT, DOG], [1])
    assert tide["ap50"] == pytest.approx(100.0)
    assert set(tide["counts"].values()) == {0} and set(tide["dAP"].values()) == {0.0}


# ----------------------------------------------------------------- AP by objects per image
def test_ap_by_number_of_objects():
    gt = make_gt({
        1: [(CAT, A)],                                   # 1 object (plus a crowd box)
        2: [(CAT, A), (DOG, B)],                         # 2 objects
        3: [(CAT, A), (CAT, B), (CAT, C), (CAT, F)],     # 4 objects
        4: [],                                           # none
    }, crowd={1: [(DOG, [60, 60, 30, 30])]})
    dets = [det(1, CAT, A, 0.9), det(2, CAT, A, 0.8), det(3, CAT, A, 0.7), det(3, CAT, B, 0.6),
            det(4, CAT, A, 0.95)]
    bins = cb.ap_by_num_objects(to_coco(gt), dets, [1, 2, 3, 4], [CAT, DOG])
    assert {k: v["images"] for k, v in bins.items()} == {"0": 1, "1": 1, "2-3": 1, "4-7": 1, "8+": 0}
    # "1": the cat is found exactly: AP 100 at every IoU. The crowd box is not an object.
    assert bins["1"]["AP"] == pytest.approx(100.0) and bins["1"]["objects"] == 1
    # "2-3": cat AP 100, dog (missed) AP 0 -> mean 50.
    assert bins["2-3"]["AP"] == pytest.approx(50.0)
    # "4-7": only cats (dog has no GT there and is left out); 2 of 4 found, both before any FP:
    # precision 1 up to recall .5 -> 51 of 101 recall points -> AP = 51 / 101.
    assert bins["4-7"]["AP"] == pytest.approx(100 * 51 / 101)
    assert bins["8+"]["AP"] is None
    # The detection on image 4 (no object) belongs to no bin, so it lowers none of them.


def test_ap_by_size_has_only_small_objects():
    coco_eval = cb.run_cocoeval(to_coco(PR_GT), PR_DETS, [CAT, DOG])
    sizes = cb.ap_by_size(coco_eval)
    # every box is 10 x 10 = 100 px^2 < 32^2: all small, so APs = AP and the others have no GT.
    assert sizes["small"] == pytest.approx(100 * coco_eval.stats[0])
    assert sizes["medium"] is None and sizes["large"] is None


# ------------------------------------------------------------------------------------ CLI
def test_cli_analyze_errors_on_detections_json(tmp_path, capsys):
    ann, dets = tmp_path / "instances_val.json", tmp_path / "detections.json"
    ann.write_text(json.dumps(PR_GT))
    dets.write_text(json.dumps(PR_DETS))
    assert main(["analyze", "errors", "--detections", str(dets), "--ann", str(ann)]) == 0
    out = tmp_path / "errors"  # default: beside the detections
    expected_pngs = ["ap_breakdown.png", "confusion_matrix.png", "pr_curves.png"]
    try:
        import tidecv  # noqa: F401

        expected_pngs.append("tide.png")
    except ImportError:
        pass
    for name in expected_pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["suggested_score_thresh"] == pytest.approx(0.6)
    assert summary["per_class"]["cat"]["f1_best"]["score_thresh"] == pytest.approx(0.7)
    assert summary["per_class"]["cat"]["num_gt"] == 2
    assert len(summary["pr_curves"]["iou_0.50"]["cat"]) == 101
    printed = capsys.readouterr().out
    assert "suggested: retina predict --score-thresh 0.600" in printed

    # bad input: one line naming the file and the entry
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([det(7, CAT, A, 0.9)]))
    assert main(["analyze", "errors", "--detections", str(bad), "--ann", str(ann)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.json" in err and "image_id 7" in err
    bad.write_text(json.dumps([{**det(1, CAT, A, 0.9), "category_id": "1"}]))
    assert main(["analyze", "errors", "--detections", str(bad), "--ann", str(ann)]) == 2
    assert capsys.readouterr().err.endswith("detection 0: category_id should be an integer, got '1'\n")
    assert main(["analyze", "errors", "--detections", str(dets)]) == 2  # no --ann
    assert "--ann" in capsys.readouterr().err
    assert main(["analyze", "errors"]) == 2  # neither --weights nor --detections
    assert "needs either --weights" in capsys.readouterr().err
    assert main(["analyze", "errors", "--weights", "run", "--detections", str(dets), "--ann", str(ann)]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(Exception, match="not a COCO annotation file"):
        bad.write_text("[]")
        load_ground_truth(bad)


def test_cli_analyze_errors_on_a_run(tiny_shapes, tmp_path):
    """--weights: inference on the run's val split, then the same outputs (plus detections.json).
    Two training steps leave every score near the prior 0.01, so the score threshold is 0 here."""
    from retina.engine.train import Trainer
    from tinyrun import tiny_config

    cfg = tiny_config(tiny_shapes, solver={"max_iter": 2, "warmup_iters": 1},
                      train={"checkpoint_period": 2},
                      data={"shapes": {"num_train": 16, "num_val": 8}})  # conftest's TINY_SHAPES
    Trainer(cfg, tmp_path / "run", device="cpu", quiet=True).train()
    assert main(["analyze", "errors", "--weights", str(tmp_path / "run"), "--device", "cpu",
                 "--set", "model.inference.score_thresh=0.0", "data.num_workers=0"]) == 0
    out = tmp_path / "run" / "analysis" / "errors"
    summary = json.loads((out / "summary.json").read_text())
    detections = json.loads((out / "detections.json").read_text())
    assert summary["num_detections"] == len(detections) > 0
    assert summary["num_images"] == len({d["image_id"] for d in detections})
    assert list(summary["per_class"]) == ["square", "circle", "triangle"]
    assert (out / "pr_curves.png").stat().st_size > 0
