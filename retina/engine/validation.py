"""Evaluation during and after training: every rank predicts its shard of the val split, rank 0
gathers the detections and scores them (the same metrics as a single-process evaluation, since
COCO evaluation only sees the union), writes the files and logs curves and drawn examples."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from retina.engine import dist
from retina.engine.evaluate import (evaluate_detections, format_metrics_table, inference,
                                    to_coco_results, write_json)
from retina.engine.logger import TrainLogger
from retina.viz import draw_detections


def sharded_inference(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                      amp_dtype: Optional[torch.dtype], num_workers: int):
    """Rank r predicts images r, r + W, ...; rank 0 gets all (outputs, image_ids) in dataset
    order, the other ranks ``None``."""
    shard = Subset(dataset, range(dist.rank(), len(dataset), dist.world_size()))
    outputs, image_ids = inference(model, shard, batch_size, device, amp_dtype,
                                   progress=dist.is_main_process() and sys.stderr.isatty(),
                                   num_workers=num_workers)
    gathered = dist.gather_to_main((outputs, image_ids))
    if gathered is None:
        return None
    pairs = sorted((iid, out) for outs, ids in gathered for out, iid in zip(outs, ids))
    return [out for _, out in pairs], [iid for iid, _ in pairs]


class Validator:
    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device,
                 amp_dtype: Optional[torch.dtype], num_workers: int, logger: TrainLogger,
                 tb_images: int = 4, backend: str = "pycocotools") -> None:
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.amp_dtype, self.num_workers = amp_dtype, num_workers
        self.logger, self.tb_images, self.backend = logger, tb_images, backend

    def __call__(self, model: nn.Module, iteration: int, out_dir: Optional[Path] = None,
                 weights: str = "") -> dict:  # fmt: skip
        """Metrics on every rank; ``out_dir`` gets detections.json and metrics.json. ``weights``
        says in the log what ``model`` holds ("EMA weights" when the trainer keeps an average)."""
        result = sharded_inference(model, self.dataset, self.batch_size, self.device,
                                   self.amp_dtype, self.num_workers)
        metrics = None
        if result is not None:
            outputs, image_ids = result
            cat_ids = list(self.dataset.cat_ids)
            detections = to_coco_results(outputs, image_ids, cat_ids)
            metrics = evaluate_detections(self.dataset.coco, detections, list(self.dataset.class_names),
                                          cat_ids, image_ids, self.backend)
            if out_dir is not None:
                write_json(Path(out_dir) / "detections.json", detections)
                write_json(Path(out_dir) / "metrics.json", metrics)
            self._log(iteration, metrics, outputs, image_ids, weights)
        return dist.broadcast_from_main(metrics)

    def _log(self, iteration: int, metrics: dict, outputs: list[dict], image_ids: list[int],
             weights: str) -> None:  # fmt: skip
        self.logger.add_scalars(iteration, {f"val/{k}": v for k, v in metrics.items()
                                            if isinstance(v, float) and math.isfinite(v)})
        what = f" ({weights})" if weights else ""
        self.logger.write(f"evaluation at iteration {iteration}{what}:\n{format_metrics_table(metrics)}")
        by_id = dict(zip(image_ids, outputs))
        for i in range(min(self.tb_images, len(outputs))):
            image, target = self.dataset[i]
            out = by_id[int(target["image_id"])]
            keep = out["scores"] >= 0.3
            drawn = draw_detections(image, out["boxes"][keep], out["labels"][keep], out["scores"][keep],
                                    list(self.dataset.class_names))
            self.logger.add_image(f"val/image_{i}", drawn, iteration)
