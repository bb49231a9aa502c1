"""A resumable, seeded stream of training samples.

Sample ``p`` of the run (counted over all ranks) is image ``perm_e[p % size]`` of epoch
``e = p // size``, where ``perm_e`` is a permutation seeded by (seed, e), and its augmentation is
drawn from a torch RNG seeded by (seed, p). Rank ``r`` of ``W`` takes positions ``p % W == r``, so
the global batch ``i`` is positions ``[i * B, (i + 1) * B)`` whatever ``W`` is. Resuming at
iteration ``i`` restarts the stream at ``i * B``: same images, same flips, same order.

With aspect-ratio groups (landscape / portrait, as detectron2 and torchvision group them), each
epoch's permutation is cut into global batches of one group only, dropping each group's last
incomplete batch (different images each epoch), and the batches are shuffled: every padded
batch then holds images of one orientation, which saves padding.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from retina.config import Config
from retina.errors import InputError

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over 64 bits


def sample_seed(seed: int, position: int) -> int:
    return (seed * _MIX + position) % (2**63 - 1)


class TrainSampler(Sampler):
    """Infinite stream of ``(index, sample_seed)`` for one rank, starting at global ``start``.

    ``groups`` (one id per image) with ``batch_size`` (the global batch B) turns on grouping.
    """

    def __init__(self, size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
                 groups: Optional[Sequence[int]] = None, batch_size: int = 1) -> None:
        if size <= 0:
            raise InputError("the training set is empty: its annotation file lists no image")
        self.size, self.seed, self.start = size, seed, start
        self.rank, self.world_size = rank, world_size
        self.groups = torch.as_tensor(list(groups)) if groups is not None else None
        self.batch_size = batch_size
        if self.groups is not None:
            counts = torch.bincount(self.groups)
            self.epoch_length = int((counts // batch_size * batch_size).sum())
            if self.epoch_length == 0:  # every group smaller than one batch: no grouping
                self.groups = None
        if self.groups is None:
            self.epoch_length = size

    def epoch_order(self, epoch: int) -> list[int]:
        """The image indices of ``epoch``, ``epoch_length`` of them."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch))
        perm = torch.randperm(self.size, generator=g)
        if self.groups is None:
            return perm.tolist()
        batches = []
        for group in torch.unique(self.groups).tolist():
            members = perm[self.groups[perm] == group]  # this group's images in epoch order
            usable = len(members) // self.batch_size * self.batch_size
            batches += list(members[:usable].view(-1, self.batch_size))
        order = torch.randperm(len(batches), generator=g).tolist()
        return torch.cat([batches[i] for i in order]).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start + (self.rank - self.start) % self.world_size  # first p >= start on this rank
        while True:
            epoch = position // self.epoch_length
            order = self.epoch_order(epoch)
            while position // self.epoch_length == epoch:
                yield order[position % self.epoch_length], sample_seed(self.seed + 1, position)
                position += self.world_size


class SeededDataset(Dataset):
    """Wraps a dataset so item ``(index, seed)`` is drawn with the torch RNG seeded by ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def train_stream(train_set, cfg: Config, start: int, rank: int = 0,
                 world_size: int = 1) -> tuple[SeededDataset, TrainSampler]:  # fmt: skip
    """The training samples from global position ``start`` on, as the model receives them: the
    sampler of (image index, sample seed) pairs and the dataset that draws each sample's
    augmentation from its seed. Shared by the trainer and ``retina data show``."""
    groups = None
    if cfg.data.aspect_grouping:  # landscape / portrait, from the annotation file's sizes
        coco = train_set.coco
        groups = [int(coco.imgs[i]["width"] >= coco.imgs[i]["height"]) for i in train_set.ids]
    sampler = TrainSampler(len(train_set), cfg.train.seed, start, rank, world_size, groups,
                           cfg.solver.batch_size)  # fmt: skip
    return SeededDataset(train_set), sampler
