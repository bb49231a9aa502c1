"""``CocoDetection``: a COCO-format annotation file + image folder as a torch Dataset.

This module owns the conversion from COCO json (``bbox`` [x, y, w, h], sparse category ids) to
training targets (XYXY absolute pixels, contiguous labels 0..K-1), and which annotations are
dropped: those whose box, clipped to the image, has no area or holds a non-finite number. Crowd
annotations are kept and flagged (``iscrowd``) so the assigner can ignore anchors on them.

The annotations are converted once, at construction, for all images together; ``__getitem__``
only slices them and decodes the image. An image that is missing, cannot be decoded or is not
the size the json says raises ``BadImageError`` (one line naming the file and the image id).
``cache_images`` decodes every image once, up front, and keeps it in memory (``data.cache: ram``,
ultralytics' ``cache=ram``): the decode then leaves the training step's data time.

Shape legend: M ground-truth boxes of one image, K classes.
"""

from __future__ import annotations

import contextlib
import io
import json
import numbers
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops import box_convert

from retina.errors import InputError, MissingFileError, RetinaError

Target = dict[str, Any]
Transform = Callable[[Tensor, Target], tuple[Tensor, Target]]


class BadImageError(RetinaError, RuntimeError):
    """An image file that cannot be used: missing, corrupt or not the size the json says.

    ``str(e)`` is one line, ``bad image PATH (image id ID): REASON`` (without the id for a file
    outside a dataset); ``path`` and ``image_id`` name the file. A DataLoader worker's exception
    reaches the main process rebuilt as ``type(e)(formatted_traceback)``; ``__init__`` then
    recovers the one line (the traceback's last) and ``path`` / ``image_id`` from it, so the main
    process sees the same error.
    """

    _FIELDS = re.compile(r"bad image (?P<path>.+?)(?: \(image id (?P<image_id>-?\d+)\))?: ")

    def __init__(self, message: str, path: str | Path | None = None,
                 image_id: int | None = None) -> None:  # fmt: skip
        if path is None:  # rebuilt from a worker's traceback: keep its last line
            lines = [ln for ln in str(message).strip().splitlines() if ln.strip()] or [""]
            message = lines[-1].split(f"{type(self).__name__}: ", 1)[-1]
            found = self._FIELDS.search(message)
            if found is not None:
                path = found["path"]
                image_id = int(found["image_id"]) if found["image_id"] is not None else None
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.image_id = image_id

    @classmethod
    def of(cls, path: Path, image_id: Optional[int], reason: str) -> "BadImageError":
        reason = " ".join(reason.split())  # one line, whatever the decoder said
        where = "" if image_id is None else f" (image id {image_id})"
        return cls(f"bad image {path}{where}: {reason}", path, image_id)


def read_image(path: str | Path, image_id: Optional[int] = None) -> Tensor:
    """Decode an image file to uint8 RGB (3, H, W): the one decoder of retina (datasets and
    ``retina predict``).

    PIL, not torchvision.io (its decoders are deprecated since torchvision 0.29). A photo's EXIF
    orientation is applied (as image viewers, detectron2's ``read_image`` and ultralytics do), so
    the pixels are the upright image its annotation was drawn on; ``convert`` turns grayscale,
    palette, RGBA (alpha dropped) and CMYK into RGB; 16-bit grayscale keeps its top 8 bits.

    Raises:
        BadImageError: the file is missing or cannot be decoded; one line naming it (and
            ``image_id``, when given).
    """
    path = Path(path)
    try:
        with Image.open(path) as pil_image:
            upright = ImageOps.exif_transpose(pil_image) if _orientation(pil_image) != 1 else pil_image
            if upright.mode.startswith("I;16"):  # 16-bit gray: convert() would clip it to white
                gray = (np.asarray(upright, dtype=np.uint16) >> 8).astype(np.uint8)  # (H, W)
                hwc = np.repeat(gray[:, :, None], 3, axis=2)  # (H, W, 3) uint8
            else:
                hwc = np.asarray(upright.convert("RGB"))  # (H, W, 3) uint8
    except FileNotFoundError:
        raise BadImageError.of(path, image_id, "file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).strip() or type(e).__name__
        raise BadImageError.of(path, image_id, f"cannot read it: {reason}") from e
    # numpy makes the CHW copy: single-threaded, no intra-op thread pool for a tiny copy. Always
    # a copy (np.array): a 1 x W image's transpose is already contiguous, and a view of PIL's
    # read-only buffer makes torch warn.
    return torch.from_numpy(np.array(hwc.transpose(2, 0, 1), order="C"))  # (3, H, W)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1: upright, 5-8: rotated a quarter turn), from the header."""
    return im.getexif().get(0x0112, 1)  # 0x0112: ExifTags.Base.Orientation


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as ``read_image`` returns it: EXIF orientations 5-8
    (a quarter turn) swap the header's width and height. Decodes no pixels."""
    w, h = im.size
    return (h, w) if _orientation(im) in (5, 6, 7, 8) else (w, h)


def is_number(v: Any) -> bool:
    """A JSON number (not a bool, which Python counts as an int); shared with ``retina data check``."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_references(data: dict, source: str) -> None:
    """What pycocotools' index would silently get wrong: a repeated image id (the last image
    wins, the others' boxes land on it), an annotation of an image that is not listed (dropped),
    a bbox that is not 4 numbers (numpy reads "1" as 1.0); and an image without a file_name,
    found only when it is read. ``InputError`` naming the first."""
    images = [img for img in data.get("images", []) if isinstance(img, dict)]
    seen: set = set()
    for img in images:
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise InputError(f"{source}: image id {img.get('id')!r} has file_name {img.get('file_name')!r}; "
                             f"every image needs one (its path in the image folder)")
        if img.get("id") in seen:
            raise InputError(f"{source}: image id {img.get('id')!r} is used by more than one image "
                             f"({img.get('file_name')!r} among them); ids must be unique")
        seen.add(img.get("id"))
    for ann in data.get("annotations", []):
        if not isinstance(ann, dict):
            continue
        if ann.get("image_id") not in seen:
            raise InputError(f"{source}: annotation {ann.get('id')!r} refers to image_id "
                             f"{ann.get('image_id')!r}, which no image has")
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(map(is_number, box))):
            raise InputError(f"{source}: annotation {ann.get('id')!r} (image {ann.get('image_id')!r}) "
                             f"has bbox {box!r}; COCO boxes are 4 numbers [x, y, width, height]")


def load_coco_json(ann_file: Path) -> dict:
    """The object of a COCO annotation file; ``InputError`` (one line naming the file) when it
    is not JSON or not an object. Checked for COCO fields by its readers (``CocoDetection``,
    ``retina data check``)."""
    try:
        data = json.loads(ann_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{ann_file}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{ann_file}: top level should be a COCO object with 'images'")
    return data


class CocoDetection(Dataset):
    """Images and targets of one COCO annotation file.

    ``ann_file`` is a COCO json file, or the same content as a dict (a VOC or YOLO folder read by
    ``retina/data/convert.py``); ``source`` then names it in messages.

    Attributes:
        coco: the pycocotools ``COCO`` index (ground truth for evaluation).
        source: where the annotations come from (the json's path, or ``source``).
        ids: sorted image ids; images without annotations are kept (valid negatives).
        cat_ids: K sorted category ids; label ``k`` is category ``cat_ids[k]``.
        class_names: K names, in ``cat_ids`` order.
        num_classes: K.
        num_degenerate: annotations dropped (under 1 px wide or high after clipping, or
            non-finite numbers).

    ``dataset[i]`` is ``(image, target)``: image uint8 (3, H, W) RGB; target ``boxes`` float32
    (M, 4) XYXY pixels clipped to the image, ``labels`` int64 (M,) in 0..K-1, ``iscrowd`` bool
    (M,), ``image_id`` int, ``orig_size`` (H, W) before any transform.
    """

    def __init__(self, ann_file: str | Path | dict, image_dir: str | Path,
                 transforms: Optional[Transform] = None, source: Optional[str] = None) -> None:  # fmt: skip
        image_dir = Path(image_dir)
        self.ann_file = None if isinstance(ann_file, dict) else Path(ann_file)
        self.source = str(self.ann_file) if self.ann_file is not None else source or "<COCO dict>"
        if self.ann_file is not None and not self.ann_file.is_file():
            raise MissingFileError(f"annotation file not found: {self.ann_file}")
        if not image_dir.is_dir():
            raise MissingFileError(f"image directory not found: {image_dir}")
        data = ann_file if self.ann_file is None else load_coco_json(self.ann_file)
        _check_references(data, self.source)
        self.image_dir, self.transforms = image_dir, transforms
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self.ids: list[int] = sorted(self.coco.imgs)
        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.class_names: list[str] = [str(self.coco.cats[c].get("name", c)) for c in self.cat_ids]
        self.num_classes = len(self.cat_ids)
        self._convert_annotations()
        self._cached: Optional[list[Optional[Tensor]]] = None  # cache_images' decoded images

    def _convert_annotations(self) -> None:
        """All annotations at once -> per-image slices of kept boxes, labels and crowd flags."""
        anns = [a for i in self.ids for a in self.coco.imgToAnns.get(i, [])]  # grouped by image
        cat_index = {c: k for k, c in enumerate(self.cat_ids)}
        for a in anns:
            if a.get("category_id") not in cat_index:
                raise InputError(
                    f"{self.source}: annotation {a.get('id')} has category_id "
                    f"{a.get('category_id')!r}, not among the categories {self.cat_ids}"
                )
        try:
            sizes = np.array([(self.coco.imgs[i]["height"], self.coco.imgs[i]["width"])
                              for i in self.ids], dtype=np.float64).reshape(len(self.ids), 2)
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(len(anns), 4)
        except (KeyError, ValueError, TypeError) as e:
            raise InputError(f"{self.source}: every image needs height/width and every "
                             f"annotation a 4-number bbox ({type(e).__name__}: {e})") from None
        counts = np.array([len(self.coco.imgToAnns.get(i, [])) for i in self.ids], dtype=np.int64)
        image_of_ann = np.repeat(np.arange(len(self.ids)), counts)  # (A,) row into sizes

        # Finiteness is tested before clipping, which would turn an infinite width into W.
        finite = np.isfinite(xywh).all(axis=1)  # (A,)
        xywh = np.where(finite[:, None], xywh, 0.0)
        xyxy = box_convert(torch.from_numpy(xywh), "xywh", "xyxy").numpy()  # (A, 4)
        # clipped to each annotation's own image (clip_boxes_to_image takes one size)
        hw = sizes[image_of_ann]  # (A, 2)
        limits = np.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], axis=1)  # (A, 4) W, H, W, H
        xyxy = np.clip(xyxy, 0, limits)
        # Boxes under a pixel wide or high after clipping carry no signal (and no anchor IoU).
        keep = finite & (xyxy[:, 2] - xyxy[:, 0] >= 1) & (xyxy[:, 3] - xyxy[:, 1] >= 1)
        self.num_degenerate = int((~keep).sum())

        labels = np.array([cat_index[a["category_id"]] for a in anns], dtype=np.int64)  # (A,)
        iscrowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)  # (A,)
        self._boxes = torch.from_numpy(xyxy[keep].astype(np.float32))  # (A', 4), image by image
        self._labels = torch.from_numpy(labels[keep])  # (A',)
        self._iscrowd = torch.from_numpy(iscrowd[keep])  # (A',)
        # Numpy, not lists: forked DataLoader workers then share these pages instead of copying
        # them as Python refcounts change.
        kept_per_image = np.bincount(image_of_ann[keep], minlength=len(self.ids))  # (N,)
        self._offsets = np.concatenate([[0], np.cumsum(kept_per_image)])  # (N + 1,)
        self._sizes = sizes.astype(np.int64)  # (N, 2) H, W

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def image_sizes(self) -> np.ndarray:
        """(N, 2) int64 height and width of every image as stored (before any transform)."""
        return self._sizes

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def cache_images(self, threads: Optional[int] = None, budget: float = 0.5) -> "CacheReport":
        """Decode every image now (``threads`` at a time, default one per core; PIL decodes
        outside the GIL) and keep it in memory: later reads clone the decoded tensor. The
        tensors live in this process: forked DataLoader workers share their pages.

        An image that does not read is left out: reading it later raises its ``BadImageError``
        at the time the uncached read would have (so ``data.on_bad_image`` decides as before).

        Raises:
            InputError: the images need more than ``budget`` of the memory available (as the
                stored sizes count them: H x W x 3 bytes each), before any is decoded.
        """
        needed = int((self._sizes[:, 0] * self._sizes[:, 1]).sum()) * 3
        available = available_memory()
        if available is not None and needed > budget * available:
            raise InputError(f"data.cache=ram: the {len(self)} images of {self.source} need "
                             f"{needed / 2**30:.1f} GiB decoded, more than {budget:.0%} of the "
                             f"{available / 2**30:.1f} GiB available; set data.cache=none")
        start = time.perf_counter()

        def decode(index: int) -> Optional[Tensor]:
            try:
                return self._load_image(index)
            except BadImageError:
                return None

        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            cached = list(pool.map(decode, range(len(self))))
        self._cached = cached
        kept = sum(image is not None for image in cached)
        return CacheReport(kept, len(self) - kept, sum(image.numel() for image in cached if image is not None),
                           time.perf_counter() - start)

    def _load_image(self, index: int) -> Tensor:
        if self._cached is not None and self._cached[index] is not None:
            return self._cached[index].clone()  # a transform may write into what it is given
        path, image_id = self.image_path(index), self.ids[index]
        image = read_image(path, image_id)  # (3, H, W) uint8
        height, width = (int(v) for v in self._sizes[index])
        if tuple(image.shape[-2:]) != (height, width):
            raise BadImageError.of(path, image_id, f"it is {image.shape[-2]}x{image.shape[-1]} "
                                   f"but {self.source} says {height}x{width} (HxW)")  # fmt: skip
        return image

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image = self._load_image(index)
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        height, width = (int(v) for v in self._sizes[index])
        target: Target = {
            "boxes": self._boxes[lo:hi].clone(),  # (M, 4)
            "labels": self._labels[lo:hi].clone(),  # (M,)
            "iscrowd": self._iscrowd[lo:hi].clone(),  # (M,)
            "image_id": self.ids[index],
            "orig_size": (height, width),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


@dataclass(frozen=True)
class CacheReport:
    """What ``CocoDetection.cache_images`` kept: images, unreadable ones left out, bytes, seconds."""

    images: int
    unreadable: int
    nbytes: int
    seconds: float

    def __str__(self) -> str:
        left = f", {self.unreadable} unreadable left out" if self.unreadable else ""
        return f"{self.images} images cached in RAM ({self.nbytes / 2**20:.0f} MiB, {self.seconds:.1f} s{left})"


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``; else the free
    pages), or None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def collate(batch: list[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """N (image, target) pairs -> (N images, N targets); images differ in size, so no stacking."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
