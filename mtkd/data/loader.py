"""``BatchLoader``: reproducible, shardable mini-batches of an in-memory ``ImageDataset``.

Reproducibility rule (other code relies on it):
    * the sample order of epoch ``e`` is ``torch.randperm`` from a generator seeded with
      ``derive_seed("order", seed, e)`` (or ``0..N-1`` when ``shuffle=False``);
    * global batch ``k`` of epoch ``e`` holds ``order[k * B : (k + 1) * B]`` and is augmented
      with a generator seeded with ``derive_seed("augment", seed, e, k)``;
    * with ``world_size > 1``, batch ``k`` goes to rank ``k % world_size`` and the number of
      global batches is truncated to a multiple of ``world_size``.
So a batch's content depends only on (dataset, seed, epoch, k, batch size, augmentation
settings), never on rank, world size, prefetching or where a run resumed.
"""
from __future__ import annotations

import hashlib
import operator
from typing import Iterator, NamedTuple

import torch

from mtkd.data.augment import apply_augment, augment_params, normalize
from mtkd.data.dataset import ImageDataset


class Batch(NamedTuple):
    """One mini-batch.

    Attributes:
        index: global batch index ``k`` within the epoch (the same on every rank layout).
        images: ``[B, C, H, W]`` float32, augmented (if enabled) and normalised.
        labels: ``[B]`` int64.
    """

    index: int
    images: torch.Tensor
    labels: torch.Tensor


def derive_seed(*parts: str | int) -> int:
    """A stable 63-bit seed from strings and integers (sha256 of their ``repr``; no Python ``hash()``).

    Integer-likes (``numpy.int64``, ...) count as the equal ``int``, so ``derive_seed("order", 1, 2)``
    is the same on every platform, Python and numpy version.
    """
    parts = tuple(p if isinstance(p, str) else operator.index(p) for p in parts)
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """``[N]`` int64 sample order of ``epoch``: a seeded permutation, or ``arange`` without shuffle."""
    if not shuffle:
        return torch.arange(num_samples)
    generator = torch.Generator().manual_seed(derive_seed("order", seed, epoch))
    return torch.randperm(num_samples, generator=generator)


def augment_generator(seed: int, epoch: int, batch_index: int) -> torch.Generator:
    """The CPU generator that augments global batch ``batch_index`` of ``epoch``."""
    return torch.Generator().manual_seed(derive_seed("augment", seed, epoch, batch_index))


class BatchLoader:
    """Iterate one rank's share of an epoch of ``dataset`` in mini-batches.

    Call ``set_epoch(e)`` before each epoch (like ``DistributedSampler``); iterating does not
    advance the epoch.

    Args:
        dataset: the in-memory split.
        batch_size: samples per global batch.
        shuffle: permute samples each epoch (seeded); else keep dataset order.
        augment: random crop (``crop_padding``) and horizontal flip (``hflip``).
        crop_padding: zero padding per side for the random crop.
        hflip: random horizontal flip with p = 0.5.
        seed: the run's data seed.
        drop_last: drop a last partial batch.
        rank: this worker's rank in ``[0, world_size)``.
        world_size: number of workers sharing the epoch round-robin.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: bool = False,
        crop_padding: int = 4,
        hflip: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_args(len(dataset), batch_size, crop_padding, rank, world_size)
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.augment, self.crop_padding, self.hflip = shuffle, augment, crop_padding, hflip
        self.seed, self.drop_last, self.rank, self.world_size = int(seed), drop_last, rank, world_size
        self.epoch = 0
        if self.num_global_batches == 0:
            raise ValueError(
                f"BatchLoader: {len(dataset)} samples in batches of {batch_size} (drop_last={drop_last}) give "
                f"fewer global batches than world_size={world_size}; expected at least one batch per rank"
            )

    @property
    def num_global_batches(self) -> int:
        """Batches in one epoch over all ranks (after truncation to a multiple of ``world_size``)."""
        n = len(self.dataset)
        batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return batches - batches % self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return self.num_global_batches // self.world_size

    def sample_indices(self, batch_index: int, order: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` dataset indices of global batch ``batch_index`` in the current epoch."""
        if order is None:
            order = epoch_order(len(self.dataset), self.seed, self.epoch, self.shuffle)
        start = batch_index * self.batch_size
        return order[start : start + self.batch_size]

    def __iter__(self) -> Iterator[Batch]:
        order = epoch_order(len(self.dataset), self.seed, self.epoch, self.shuffle)
        for k in range(self.rank, self.num_global_batches, self.world_size):
            yield self._make_batch(k, self.sample_indices(k, order))

    def _make_batch(self, k: int, index: torch.Tensor) -> Batch:
        images = self.dataset.images[index]  # [B, C, H, W] uint8
        if self.augment:  # = augment_batch, kept in uint8 so that normalize fuses the scaling
            generator = augment_generator(self.seed, self.epoch, k)
            params = augment_params(len(index), generator, self.crop_padding, self.hflip)
            images = apply_augment(images, params, self.crop_padding)
        images = normalize(images, self.dataset.mean, self.dataset.std)
        return Batch(k, images, self.dataset.labels[index])


def _check_args(n: int, batch_size: int, crop_padding: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"BatchLoader: batch_size={batch_size}; expected >= 1")
    if crop_padding < 0:
        raise ValueError(f"BatchLoader: crop_padding={crop_padding}; expected >= 0")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"BatchLoader: rank={rank}, world_size={world_size}; expected 0 <= rank < world_size")
    if n == 0:
        raise ValueError("BatchLoader: the dataset is empty; expected at least one sample")
