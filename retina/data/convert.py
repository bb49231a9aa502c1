"""VOC and YOLO folders as COCO: in memory for training (``read_folder``), as json files for users
who want them (``convert_folder``, ``retina data convert``).

Both paths produce the same dicts (conventions in ``formats.py``), so a converted json loaded with
``data.format: coco`` gives the same targets and the same evaluation as the folder itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

from retina.data.formats import FolderData, detect_format
from retina.data.voc import read_voc
from retina.data.yolo import read_yolo
from retina.errors import InputError, MissingFileError


def read_folder(root: str | Path, fmt: Literal["auto", "voc", "yolo"], splits: Sequence[str],
                classes: Sequence[str] = (), keep_difficult: bool = False) -> FolderData:  # fmt: skip
    """The ``splits`` of a VOC or YOLO folder; ``fmt`` "auto" detects which (``detect_format``).

    ``classes`` (VOC only: YOLO's names are in its data.yaml) and ``keep_difficult`` (VOC's
    difficult objects as boxes rather than ignore regions) as in ``read_voc``. Problems are
    collected in ``FolderData.problems``, not raised.

    Raises:
        InputError / MissingFileError: one line, when the folder is not of that layout.
    """
    root = Path(root)
    found = detect_format(root) if fmt == "auto" else fmt
    if found == "voc":
        return read_voc(root, splits, classes, keep_difficult)
    if found == "yolo":
        if classes:
            raise InputError(f"{root}: data.classes is read for VOC folders only; a YOLO folder's "
                             "class names are the 'names' of its data.yaml")  # fmt: skip
        return read_yolo(root, splits)
    if not root.exists():
        raise MissingFileError(f"{root} not found")
    raise InputError(f"{root}: neither a VOC folder (Annotations/ and JPEGImages/) nor a YOLO one "
                     "(data.yaml); COCO json is read with data.format=coco and data.train_ann / "
                     "data.val_ann (retina data check --ann A.json --images DIR)")  # fmt: skip


def _has_area(ann: dict) -> bool:
    """A COCO box of positive width and height (VOC corners given as xmax < xmin are not)."""
    return ann["bbox"][2] > 0 and ann["bbox"][3] > 0


class Written(NamedTuple):
    """One json ``convert_folder`` wrote: its split, path, annotations kept and left out."""

    split: str
    path: Path
    kept: int
    left_out: int


def convert_folder(folder: FolderData, out_dir: str | Path) -> list[Written]:
    """Write ``out_dir/instances_<split>.json`` for every split of ``folder``; what was written.

    Refuses (``InputError``, the first problem) a folder with problems, or with an image file
    missing: a json silently missing some images or boxes would look complete, one naming a
    missing photo would fail only in training. Boxes of zero or negative width or height (a
    warning of ``retina data check``; training drops them) are left out: COCO has no such box.
    """
    folder.raise_on_problems()
    for split, data in folder.splits.items():  # a size in the xml does not mean the photo is there
        missing = [img["file_name"] for img in data["images"]
                   if not (folder.image_dirs[split] / img["file_name"]).is_file()]  # fmt: skip
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MissingFileError(f"{folder.image_dirs[split] / missing[0]} not found{more}, an image of "
                                   f"split {split!r}; list them all with: {folder.check_command()}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split, data in folder.splits.items():
        kept = [a for a in data["annotations"] if _has_area(a)]
        path = out_dir / f"instances_{split}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        # readers never see half a file
        tmp.write_text(json.dumps({**data, "annotations": kept}, allow_nan=False))
        tmp.replace(path)
        written.append(Written(split, path, len(kept), len(data["annotations"]) - len(kept)))
    return written


def data_convert_cli(root: str | Path, fmt: Literal["auto", "voc", "yolo"], out_dir: str | Path,
                     splits: Sequence[str], classes: Sequence[str] = (),
                     keep_difficult: bool = False) -> int:  # fmt: skip
    """``retina data convert --from voc|yolo --to coco --root DIR --out OUT``: write the json
    files, print what was written and the config keys that train on them; exit status 0."""
    folder = read_folder(root, fmt, splits, classes, keep_difficult)
    written = convert_folder(folder, out_dir)
    print(folder.summary(detected=fmt == "auto"))
    for w in written:
        data = folder.splits[w.split]
        print(f"wrote {w.path}: {len(data['images'])} images, {w.kept} annotations, "
              f"{len(data['categories'])} categories; images in {folder.image_dirs[w.split]}"
              + (f"; left out {w.left_out} boxes of zero or negative width or height "
                 f"({folder.check_command()} names them)" if w.left_out else ""))
    if len(written) == 2:  # (train, val), as the config names them
        keys = [f"data.root={Path(out_dir)}", "data.format=coco"]
        for key, w in zip(("train", "val"), written):
            keys += [f"data.{key}_ann={w.path.name}", f"data.{key}_images={folder.image_dirs[w.split].resolve()}"]
        print("train on them with: --set " + " ".join(keys))
    return 0
