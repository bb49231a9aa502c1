"""The TIDE error breakdown (Bolya et al., "TIDE: A General Toolbox for Identifying Object
Detection Errors", ECCV 2020) through the authors' ``tidecv`` package (optional: ``pip install
'retina[analysis]'``).

TIDE matches at IoU t_f = 0.5 and calls IoU <= t_b = 0.1 background. Every false-positive
detection gets one type, tested in this order; every unmatched GT box no error explains is
missed:

- localisation (``Loc``): right class, t_b <= IoU with a GT box of its class <= t_f;
- classification (``Cls``): wrong class, IoU >= t_f with a GT box of another class;
- duplicate (``Dupe``): right class, IoU >= t_f with a GT box already taken by a higher-scored
  detection;
- background (``Bkg``): IoU <= t_b with every GT box;
- both (``Both``): wrong class and t_b <= IoU <= t_f (everything else);
- missed (``Miss``): a GT box no detection matched and no error above could have claimed.

Each type's dAP is AP50 after fixing every error of that type alone by an oracle, minus AP50:
a localisation or classification error becomes a true positive of its GT box (when no better
detection holds it; else it is dropped), duplicates, background and "both" errors are dropped,
missed boxes leave the GT count. The special errors ``false_positive`` / ``false_negative`` fix
every false positive / every false negative at once. TIDE's AP is its own 101-point COCO-style AP
at IoU .5; unlike pycocotools it also averages in classes with detections but no GT (AP 0).
"""

from __future__ import annotations

from typing import Optional, Sequence

from pycocotools.coco import COCO

# tidecv short name -> the name in retina's summary, in TIDE's order
ERROR_TYPES = {"Cls": "classification", "Loc": "localisation", "Both": "both",
               "Dupe": "duplicate", "Bkg": "background", "Miss": "missed"}
SPECIAL_TYPES = {"FalsePos": "false_positive", "FalseNeg": "false_negative"}


def tide_available() -> bool:
    try:
        import tidecv  # noqa: F401
    except ImportError:
        return False
    return True


def tide_breakdown(coco_gt: COCO, results: list[dict], cat_ids: Sequence[int],
                   image_ids: Sequence[int]) -> Optional[dict]:
    """TIDE on ``image_ids`` and the classes ``cat_ids``; None when ``tidecv`` is not installed.

    Returns:
        ``{"ap50": TIDE's AP50, "dAP": {"classification": .., ..., "missed": ..},
        "special": {"false_positive": .., "false_negative": ..}, "counts": {type: errors}}``,
        AP values in percent.
    """
    import matplotlib

    try:
        from tidecv import TIDE, Data
    except ImportError:
        return None
    cats, images = set(int(c) for c in cat_ids), set(int(i) for i in image_ids)
    gt, dt = Data("gt"), Data("detections")
    for cat in coco_gt.loadCats(sorted(cats)):
        gt.add_class(int(cat["id"]), cat["name"])
    for image_id in sorted(images):
        gt.add_image(image_id, str(image_id))  # every image is visited, with or without GT
        for a in coco_gt.imgToAnns.get(image_id, []):
            if int(a["category_id"]) not in cats:
                continue
            if a.get("iscrowd", 0):
                gt.add_ignore_region(image_id, int(a["category_id"]), list(a["bbox"]))
            else:
                gt.add_ground_truth(image_id, int(a["category_id"]), list(a["bbox"]))
    for r in results:
        if int(r["image_id"]) in images and int(r["category_id"]) in cats:
            dt.add_detection(int(r["image_id"]), int(r["category_id"]), float(r["score"]),
                             list(r["bbox"]))
    # TIDE() builds a seaborn plotter that restyles matplotlib globally: keep that local.
    with matplotlib.rc_context():
        tide = TIDE(pos_threshold=0.5, background_threshold=0.1, mode=TIDE.BOX)
    run = tide.evaluate(gt, dt, mode=TIDE.BOX)
    errors = tide.get_all_errors()
    main, special = errors["main"][dt.name], errors["special"][dt.name]
    counts = {cls.short_name: n for cls, n in run.count_errors().items()}
    return {"ap50": float(run.ap),
            "dAP": {name: float(main[short]) for short, name in ERROR_TYPES.items()},
            "special": {name: float(special[short]) for short, name in SPECIAL_TYPES.items()},
            "counts": {name: int(counts[short]) for short, name in ERROR_TYPES.items()}}
