"""Run a detector on image files: a JSON of detections and one drawn image per input.

This module owns the prediction outputs: ``out_dir/detections.json`` (a list of ``{"file_name",
"bbox": [x, y, w, h], "score", "category_id", "category_name"}``) and ``out_dir/<stem>.jpg``
with boxes, class names and scores drawn.

Shape legend: D detections of one image, K classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.io import ImageReadMode, decode_image, write_jpeg
from torchvision.utils import draw_bounding_boxes

from retina.engine.evaluate import write_json
from retina.errors import InputError, MissingFileError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

# Distinct colours for drawn boxes, indexed by contiguous label modulo its length.
_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]  # fmt: skip


def list_images(input: Path) -> list[Path]:
    """The images to predict on: ``input`` itself when it is a file, else every
    .jpg/.jpeg/.png/.bmp directly inside the directory ``input`` (case-insensitive), sorted.

    Raises:
        MissingFileError: ``input`` does not exist.
        InputError: the directory holds no such image.
    """
    input = Path(input)
    if not input.exists():
        raise MissingFileError(f"no such file or directory: {input}")
    if input.is_file():
        return [input]
    paths = sorted(
        p for p in input.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise InputError(f"no {'/'.join(IMAGE_SUFFIXES)} images in directory {input}")
    return paths


def read_image(path: Path) -> Tensor:
    """Read an image file as uint8 RGB (3, H, W).

    torchvision.io decodes JPEG/PNG/WEBP/GIF; other formats (BMP) fall back to PIL.

    Raises:
        RuntimeError: one line naming the file when neither can decode it.
    """
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError):
        pass
    try:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB")).copy()  # (H, W, 3)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)
    except Exception:  # PIL raises many types for corrupt files
        raise RuntimeError(f"cannot read image {path}: not a decodable image file") from None


def draw_detections(
    image: Tensor, boxes: Tensor, labels: Tensor, scores: Tensor, class_names: list[str]
) -> Tensor:
    """Draw boxes (D, 4) XYXY with ``"<class> <score>"`` captions on uint8 ``image`` (3, H, W).

    Returns a new uint8 (3, H, W) image.
    """
    if boxes.numel() == 0:
        return image.clone()
    h, w = image.shape[-2:]
    boxes = boxes.float().clone()  # (D, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    # draw_bounding_boxes refuses x2 < x1; a degenerate box is drawn as a line instead.
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2])
    label_list = labels.tolist()
    captions = [f"{class_names[c]} {s:.2f}" for c, s in zip(label_list, scores.tolist())]
    colors = [_PALETTE[c % len(_PALETTE)] for c in label_list]
    width = max(1, round(min(h, w) / 250))
    return draw_bounding_boxes(image, boxes, labels=captions, colors=colors, width=width)


def _output_names(paths: list[Path]) -> list[str]:
    """``<stem>.jpg`` per input; ``<stem>_<ext>.jpg`` when two inputs share a stem."""
    stems = [p.stem for p in paths]
    return [
        f"{p.stem}_{p.suffix.lstrip('.')}.jpg" if stems.count(p.stem) > 1 else f"{p.stem}.jpg"
        for p in paths
    ]


def predict_paths(
    model: nn.Module,
    paths: list[Path],
    out_dir: Path,
    class_names: list[str],
    cat_ids: list[int],
    device: torch.device | str,
    score_thresh: float = 0.3,
    batch_size: int = 4,
) -> list[dict]:
    """Detect objects in each image file and write ``out_dir/detections.json`` and one drawn
    ``out_dir/<stem>.jpg`` per input.

    Args:
        model: eval-mode contract: ``model(list of float (3, H, W) in [0, 1])`` -> list of dicts
            with ``boxes`` (D, 4) XYXY, ``scores`` (D,), ``labels`` (D,) in 0..K-1.
        class_names, cat_ids: K names and COCO category ids, indexed by contiguous label.
        score_thresh: detections with a lower score are neither written nor drawn.

    Returns:
        The detections written to JSON, in input order then model order.
    """
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_paths = [out_dir / name for name in _output_names(paths)]
    for src, dst in zip(paths, out_paths):
        if dst.exists() and dst.resolve() == Path(src).resolve():
            raise InputError(f"output {dst} would overwrite its input; choose another out_dir")

    was_training = model.training
    model.eval()
    detections: list[dict] = []
    try:
        for start in range(0, len(paths), batch_size):
            batch_paths = paths[start : start + batch_size]
            images = [read_image(Path(p)) for p in batch_paths]  # uint8 (3, H, W) each
            with torch.inference_mode():
                outputs = model([img.to(device).float().div_(255) for img in images])
            for path, dst, image, out in zip(
                batch_paths, out_paths[start : start + batch_size], images, outputs
            ):
                keep = out["scores"] >= score_thresh  # (D,)
                boxes = out["boxes"][keep].detach().cpu().float()  # (D', 4)
                scores = out["scores"][keep].detach().cpu().float()  # (D',)
                labels = out["labels"][keep].detach().cpu().long()  # (D',)
                detections.extend(
                    _to_records(Path(path).name, boxes, scores, labels, class_names, cat_ids)
                )
                drawn = draw_detections(image, boxes, labels, scores, class_names)
                write_jpeg(drawn, str(dst), quality=90)
    finally:
        model.train(was_training)
    write_json(out_dir / "detections.json", detections)
    return detections


def _to_records(
    file_name: str,
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    class_names: list[str],
    cat_ids: list[int],
) -> list[dict]:
    """JSON records for one image's kept detections: boxes (D, 4) XYXY -> [x, y, w, h]."""
    boxes = boxes.double()
    boxes_xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)  # (D, 4)
    boxes_xywh = torch.round(boxes_xywh * 100) / 100
    label_list = labels.tolist()
    return [
        {
            "file_name": file_name,
            "bbox": b,
            "score": round(s, 4),
            "category_id": int(cat_ids[c]),
            "category_name": class_names[c],
        }
        for b, s, c in zip(boxes_xywh.tolist(), scores.double().tolist(), label_list)
    ]
