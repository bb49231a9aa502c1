"""``SkipBadImages``: train on through a few unreadable images, stop when there are too many.

This module owns what ``data.on_bad_image: skip`` means. A ``BadImageError`` from the wrapped
dataset (missing, corrupt or wrongly sized file) is logged as one line on the ``retina.data``
logger and the sample is replaced by the next index that reads (``index + 1``, ``index + 2``, ...
wrapping around): the same position of the sample stream always gets the same replacement, so a
resumed run replays the same batches.

Every load attempt counts as a read, a failed one also as bad. Once ``min_reads`` (100) reads
were made, the wrapper raises ``TooManyBadImages`` as soon as ``bad / read`` exceeds
``max_bad_fraction``. The minimum keeps one bad file among the first few reads from stopping a
run (with the default 1 %, one bad image in 100 reads is still allowed); a wrong image folder,
where every read fails, stops at read 100.

Counts are per process: each DataLoader worker holds its own copy of the wrapper, so with W
workers each one judges the share of the images it read itself (about 1/W of the stream), and
the counts start again when workers are restarted (every epoch unless ``persistent_workers``).
"""

from __future__ import annotations

import logging
from typing import Any

from torch.utils.data import Dataset

from retina.data.coco import BadImageError

logger = logging.getLogger("retina.data")


class TooManyBadImages(BadImageError):
    """More than ``max_bad_fraction`` of the images read were bad; one line, naming the last one.

    ``path`` / ``image_id`` are those of the last bad image; ``bad`` and ``read`` the counts
    (``None`` when rebuilt in the main process from a DataLoader worker's traceback).
    """

    def __init__(self, message: str, path: Any = None, image_id: int | None = None,
                 bad: int | None = None, read: int | None = None) -> None:  # fmt: skip
        super().__init__(message, path, image_id)
        self.bad, self.read = bad, read


class SkipBadImages(Dataset):
    """``dataset[i]``, or the next readable sample when image ``i`` raises ``BadImageError``.

    Other attributes (``num_classes``, ``coco``, ``ids`` ...) are those of the wrapped dataset.
    ``bad`` and ``read`` count this process's failed and attempted loads.
    """

    def __init__(self, dataset: Dataset, max_bad_fraction: float = 0.01,
                 min_reads: int = 100) -> None:  # fmt: skip
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction={max_bad_fraction!r} should be in [0, 1]")
        self.dataset = dataset
        self.max_bad_fraction = max_bad_fraction
        self.min_reads = min_reads
        self.bad = 0
        self.read = 0
        self.last_bad: BadImageError | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on the wrapper. "dataset" itself is refused, or a
        # half-built copy (unpickling in a worker) would recurse forever.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        size = len(self)
        for step in range(size):  # every index at most once
            candidate = (index + step) % size
            self.read += 1
            try:
                sample, good = self.dataset[candidate], True
            except BadImageError as e:
                self.bad += 1
                self.last_bad = e
                logger.warning("skipping %s [%d bad of %d read in this process]",
                               e, self.bad, self.read)  # fmt: skip
                good = False
            # Checked after every read, good ones too: bad reads made before min_reads count
            # once the minimum is reached.
            if self.bad and self.read >= self.min_reads and \
                    self.bad > self.max_bad_fraction * self.read:
                raise self._too_many(
                    f"{self.bad} of the {self.read} images read by this process were bad "
                    f"({self.bad / self.read:.1%} > data.max_bad_fraction="
                    f"{self.max_bad_fraction:g})")  # fmt: skip
            if good:
                return sample
        raise self._too_many(f"none of the {size} images could be read")

    def _too_many(self, what: str) -> TooManyBadImages:
        last = self.last_bad
        assert last is not None
        message = f"too many bad images: {what}; last {last}; check the data with " \
                  f"`retina data check`"
        return TooManyBadImages(message, last.path, last.image_id, self.bad, self.read)
