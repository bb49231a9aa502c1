"""Data: COCO-format datasets (COCO json, or VOC / YOLO folders read as COCO), training
transforms, the bundled synthetic sets and the seeded sample stream of training (``sampler.py``).

``build_dataset(cfg, split)`` is the one place that reads the data config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

from retina.config import Config, ConfigError, replace
from retina.data.coco import BadImageError, CocoDetection, collate, load_coco_json
from retina.data.convert import read_folder
from retina.data.dense import ensure_dense, generate_dense
from retina.data.formats import detect_format
from retina.data.robust import SkipBadImages, TooManyBadImages
from retina.data.shapes import class_names as shapes_class_names, ensure_shapes, generate_shapes, with_absent_classes
from retina.data.transforms import Augmentation, build_transforms
from retina.errors import InputError, MissingFileError, RetinaError

__all__ = [
    "BadImageError",
    "CocoDetection",
    "build_dataset",
    "build_transforms",
    "collate",
    "dataset_num_classes",
    "resolve_num_classes",
    "ensure_dense",
    "ensure_shapes",
    "generate_dense",
    "generate_shapes",
    "SkipBadImages",
    "TooManyBadImages",
]


def dataset_paths(cfg: Config, split: Literal["train", "val"]) -> tuple[Path, Path]:
    """(annotation file, image folder) of ``split``; the shapes and dense sets are generated
    when missing."""
    data = cfg.data
    root = Path(data.root)
    if data.dataset == "shapes":
        s = data.shapes  # the images do not depend on extra_classes: dataset_source adds those
        ensure_shapes(root, s.num_train, s.num_val, s.image_size, s.seed)
        return root / "annotations" / f"instances_{split}.json", root / split
    if data.dataset == "dense":
        ensure_dense(root, **dataclasses.asdict(data.dense))
        return root / "annotations" / f"instances_{split}.json", root / split
    if data.dataset == "coco":
        ann = root / (data.train_ann if split == "train" else data.val_ann)
        images = root / (data.train_images if split == "train" else data.val_images)
        for path, key in ((ann, f"{split}_ann"), (images, f"{split}_images")):
            if not path.exists():
                raise MissingFileError(
                    f"{path} not found (data.root={data.root!r}, data.{key}); see data/README.md "
                    "for the expected layout, or train on the bundled set with data.dataset=shapes"
                )
        return ann, images
    raise ValueError(f"data.dataset={data.dataset!r} should be 'shapes', 'dense' or 'coco'")


def dataset_source(cfg: Config, split: Literal["train", "val"]) -> tuple[Path | dict, Path, Optional[str]]:
    """(annotations, image folder, what they are) of ``split``: a COCO json file (``dataset_paths``),
    or a COCO dict: read from a VOC or YOLO folder (``data.format`` voc / yolo, or detected), or
    the shapes json with its absent classes added (``data.shapes.extra_classes``)."""
    data = cfg.data
    if data.dataset == "coco" and data.format == "auto" and not Path(data.root).exists():
        # else the COCO default names were reported missing, confusing for a VOC or YOLO folder
        raise MissingFileError(f"data.root={data.root} not found (a relative root is read from the "
                               f"current directory, {Path.cwd()}); give it with --set data.root=...")
    fmt = detect_format(data.root) if data.format == "auto" else data.format
    if data.dataset == "shapes" and data.shapes.extra_classes:
        ann, images = dataset_paths(cfg, split)
        extra = data.shapes.extra_classes
        return (with_absent_classes(load_coco_json(ann), extra), images,
                f"{ann} with data.shapes.extra_classes={extra} absent classes")
    if data.dataset != "coco" or fmt == "coco":  # the generated sets are COCO json
        return (*dataset_paths(cfg, split), None)
    folder = read_folder(data.root, fmt, (data.train_split, data.val_split), data.classes,
                         data.keep_difficult)  # fmt: skip
    folder.raise_on_problems()
    name = data.train_split if split == "train" else data.val_split
    how = "layout detected in" if data.format == "auto" else "folder"
    return folder.splits[name], folder.image_dirs[name], f"{fmt} {how} {data.root}, split {name!r}"


def build_dataset(cfg: Config, split: Literal["train", "val"]) -> CocoDetection | SkipBadImages:
    """The ``split`` dataset of ``cfg.data``, with training transforms when ``split == "train"``.

    With ``data.on_bad_image: skip`` the training set is wrapped in ``SkipBadImages`` (same
    attributes); the validation set never is: a replaced image would skew its AP.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} should be 'train' or 'val'")
    ann, image_dir, source = dataset_source(cfg, split)
    inp = cfg.model.input
    mean_pixel = tuple(round(255 * m) for m in inp.pixel_mean)  # padding that normalises to ~0
    augment = Augmentation(**dataclasses.asdict(cfg.data.augment), fill=mean_pixel)
    transforms = build_transforms(inp.min_size, inp.max_size, cfg.data.hflip_prob,
                                  train=split == "train", augment=augment)  # fmt: skip
    dataset = CocoDetection(ann, image_dir, transforms, source)
    if len(dataset) == 0:  # an empty val split scored AP 0.0 without a word
        raise InputError(f"the {split} set is empty: {source} has no image")
    if split == "train" and cfg.data.on_bad_image == "skip":
        return SkipBadImages(dataset, cfg.data.max_bad_fraction)
    return dataset


def resolve_num_classes(cfg: Config, num_classes: int, source: str) -> Config:
    """``cfg`` with ``model.num_classes`` resolved against ``num_classes``, the class count of
    ``source`` (the train set; at load, a checkpoint's class names): the one place that fills it.
    ``null`` (the default) takes that count; a set value must equal it.

    Raises:
        ConfigError: a set ``model.num_classes`` disagrees; one line naming both counts.
    """
    own = cfg.model.num_classes
    if own is None:
        return replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))
    if own != num_classes:
        raise ConfigError(f"model.num_classes={own} but {source} has {num_classes} classes; set "
                          f"model.num_classes={num_classes}, or null to take the count from it")
    return cfg


def dataset_num_classes(cfg: Config) -> Optional[int]:
    """The class count of ``cfg.data``'s train set (what ``model.num_classes`` resolves against,
    ``resolve_num_classes``), without generating or decoding images: the bundled sets' by
    definition, a COCO json's or a VOC / YOLO folder's from its annotations; None when the data
    cannot be read (not there, or broken: training names the problem)."""
    data = cfg.data
    if data.dataset == "shapes":
        return len(shapes_class_names(data.shapes.extra_classes))
    if data.dataset == "dense":
        return data.dense.num_classes
    try:
        ann = dataset_source(cfg, "train")[0]
        categories = (ann if isinstance(ann, dict) else load_coco_json(ann)).get("categories")
    except RetinaError:
        return None
    return len(categories) if isinstance(categories, list) else None
