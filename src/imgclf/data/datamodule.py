"""Batches straight from in-memory tensors.

Small images make per-sample `__getitem__` plus collate the bottleneck (up to 100x the data
time), so a batch here is one fancy-index into a uint8 tensor with a seeded permutation.
Training batches are augmented after they reach the device (`train.augment`), still as uint8.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch

from imgclf.config.pipeline import AugmentConfig
from imgclf.data.augment import BatchAugment
from imgclf.data.normalized import load_split


class Shard(NamedTuple):
    """This process's place under DDP: its global rank among `world_size` processes."""

    rank: int
    world_size: int


class TensorBatches:
    """An epoch of (images, labels) batches; a new seeded permutation per pass when shuffling.

    Under DDP each of `world_size` processes takes every world_size-th index of the same
    permutation, cut to an equal share (as DistributedSampler with drop_last does): processes
    must run the same number of steps, and together they see each image at most once an epoch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        shard: "Shard | None" = None,
    ):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = shard or Shard(0, 1)
        self.epoch = 0

    def _share(self) -> int:
        n = len(self.labels)
        return n // self.world_size if self.shuffle else n

    def __len__(self) -> int:
        return -(-self._share() // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
            order = order[: self._share() * self.world_size][self.rank :: self.world_size]
            self.epoch += 1
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                yield self.images[index], self.labels[index]
        else:
            for start in range(0, n, self.batch_size):
                stop = start + self.batch_size
                yield self.images[start:stop], self.labels[start:stop]


class ImageDataModule(L.LightningDataModule):
    """The normalized splits of data/normalized/, held in memory as uint8 tensors."""

    def __init__(
        self,
        data_dir: Path,
        batch_size: int,
        seed: int,
        augment: AugmentConfig,
        eval_batch_size: int = 1024,
    ):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size, self.seed, self.eval_batch_size = batch_size, seed, eval_batch_size
        self.augment_config = augment
        self.augment = BatchAugment(self.augment_config, seed)
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val"):  # the test split is for evaluate, on the exported model
            if split not in self.splits:
                images, labels = load_split(self.data_dir, split)
                self.splits[split] = (torch.from_numpy(images), torch.from_numpy(labels))
        if self.trainer is not None and self.trainer.global_rank:
            # DDP processes draw different variants of their batches.
            self.augment = BatchAugment(self.augment_config, self.seed + self.trainer.global_rank)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            images, labels = batch
            return self.augment(images), labels
        return batch

    def train_dataloader(self) -> TensorBatches:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return TensorBatches(
            *self.splits["train"],
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            shard=Shard(rank, world_size),
        )

    def val_dataloader(self) -> TensorBatches:
        return TensorBatches(*self.splits["val"], self.eval_batch_size, shuffle=False)
