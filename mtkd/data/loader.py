"""``BatchLoader``: reproducible, shardable mini-batches of an in-memory ``ImageDataset``.

Reproducibility rule (other code relies on it):
    * the sample order of epoch ``e`` is ``torch.randperm`` from a generator seeded with
      ``derive_seed("order", seed, e)`` (or ``0..N-1`` when ``shuffle=False``);
    * global batch ``k`` of epoch ``e`` holds ``order[k * B : (k + 1) * B]`` and is augmented
      with a generator seeded with ``derive_seed("augment", seed, e, k)``;
    * with ``world_size > 1``, batch ``k`` goes to rank ``k % world_size`` and the number of
      global batches is truncated to a multiple of ``world_size``;
    * with an augmentation bank (``augment_bank=K > 0``, and ``augment``) the per-batch draw above is
      not made. Instead sample ``i`` has K fixed augmentations, column ``i`` of the ``[K, N]`` table
      ``augment_bank_table`` draws once from a generator seeded with ``derive_seed("augment-bank", seed)``.
      Epochs go in cycles of K: in epoch ``e``, sample ``i`` uses slot ``bank_slots(N, K, seed, e)[i]``,
      column ``e % K`` of a per-sample permutation of the K slots drawn from a generator seeded with
      ``derive_seed("augment-bank-slot", seed, e // K)``. Every sample thus uses each of its K
      augmentations once per cycle, and from epoch K on only augmentations it has used before.
So a batch's content depends only on (dataset, seed, epoch, k, batch size, augmentation
settings including K), never on rank, world size, prefetching or where a run resumed; with a bank,
a sample's augmentation depends only on (seed, epoch, K, crop settings, sample). Each batch also says
which samples it holds (``Batch.sample_index``) and how each was augmented (``Batch.augment``):
what a cache of teacher outputs needs for its keys.

A file-backed segmentation split (:class:`~mtkd.data.seg_files.SegmentationFileSet`) is ordered and
sharded by the same rules; each batch reads only its own files, augmented (scale, crop, flip) from
the same per-batch generator. Its batches carry ``augment=None``: a cache key can describe them only
without augmentation (centre crops, whole images), and it takes no augmentation bank.

A detection split (``task == "detection"``: :class:`~mtkd.detection.dataset.DetectionSet`) is
ordered and sharded by the same rules too; its batch's labels are packed boxes ``[B, N, 5]`` that the
split's own ``load_batch`` moves with the images (shift, flip, scale from the same per-batch
generator). The classification crop and flip never touch them; its batches carry ``augment=None``
and it takes no augmentation bank, as a file-backed segmentation split.
"""
from __future__ import annotations

import hashlib
import operator
from typing import Iterator, NamedTuple

import torch

from mtkd.data.augment import AugmentParams, apply_augment, augment_params, normalize
from mtkd.data.dataset import IGNORE_INDEX, ImageDataset
from mtkd.data.seg_files import SegmentationFileSet


class Batch(NamedTuple):
    """One mini-batch.

    Attributes:
        index: global batch index ``k`` within the epoch (the same on every rank layout).
        images: ``[B, C, H, W]`` float32, augmented (if enabled) and normalised.
        labels: ``[B]`` int64 (classification), ``[B, H, W]`` int64 masks, moved with their images
            (segmentation; padding pixels 255), or ``[B, N, 5]`` float32 packed boxes, moved with their
            images (detection; padding rows of class -1).
        sample_index: ``[B]`` int64 indices of the samples in the dataset (``BatchLoader`` always
            sets it; None only in batches built by hand).
        augment: the augmentation applied to each sample (``AugmentParams`` of ``[B]`` tensors:
            ``images`` = ``normalize(apply_augment(dataset.images[sample_index], augment, crop_padding))``);
            None when the batch is not augmented, and for a file-backed segmentation split or a
            detection split (their augmentations have no ``AugmentParams``: see the module docstring).
    """

    index: int
    images: torch.Tensor
    labels: torch.Tensor
    sample_index: torch.Tensor | None = None
    augment: AugmentParams | None = None


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


def augment_bank_table(num_samples: int, size: int, seed: int, crop_padding: int, hflip: bool) -> AugmentParams:
    """The fixed augmentations of an augmentation bank: ``AugmentParams`` of ``[K, N]`` tensors.

    Column ``i`` holds sample ``i``'s K augmentations. Drawn once, vectorised, as
    ``augment_params(K * N, ...)`` (all ``dy``, then all ``dx``, then all flips) from a generator
    seeded with ``derive_seed("augment-bank", seed)``, viewed as ``[K, N]``. Offsets are stored in
    int16 when they fit (``2 * crop_padding < 2**15``), flips as bool.
    """
    if size < 1 or num_samples < 1:
        raise ValueError(f"augment_bank_table: size={size}, num_samples={num_samples}; expected both >= 1")
    generator = torch.Generator().manual_seed(derive_seed("augment-bank", seed))
    drawn = augment_params(size * num_samples, generator, crop_padding, hflip)
    offsets = torch.int16 if 2 * crop_padding < 2**15 else torch.int64
    return AugmentParams(drawn.dy.view(size, num_samples).to(offsets), drawn.dx.view(size, num_samples).to(offsets),
                         drawn.flip.view(size, num_samples))


def bank_slots(num_samples: int, size: int, seed: int, epoch: int) -> torch.Tensor:
    """``[N]`` int64: the bank slot in ``[0, K)`` each sample uses in ``epoch``.

    Epochs ``cK .. cK + K - 1`` form cycle ``c``: each sample gets a random permutation of its K
    slots (``argsort`` of ``[N, K]`` uniforms from a generator seeded with
    ``derive_seed("augment-bank-slot", seed, c)``) and epoch ``e`` takes column ``e % K``.
    """
    if size < 1:
        raise ValueError(f"bank_slots: size={size}; expected >= 1")
    if size == 1:
        return torch.zeros(num_samples, dtype=torch.int64)
    cycle, column = divmod(int(epoch), size)
    generator = torch.Generator().manual_seed(derive_seed("augment-bank-slot", seed, cycle))
    return torch.rand(num_samples, size, generator=generator).argsort(dim=1)[:, column].contiguous()


class BatchLoader:
    """Iterate one rank's share of an epoch of ``dataset`` in mini-batches.

    Call ``set_epoch(e)`` before each epoch (like ``DistributedSampler``); iterating does not
    advance the epoch.

    Args:
        dataset: the in-memory split, or a file-backed segmentation split (read batch by batch).
        batch_size: samples per global batch.
        shuffle: permute samples each epoch (seeded); else keep dataset order.
        augment: random crop (``crop_padding``) and horizontal flip (``hflip``).
        crop_padding: zero padding per side for the random crop.
        hflip: random horizontal flip with p = 0.5.
        seed: the run's data seed.
        drop_last: drop a last partial batch.
        rank: this worker's rank in ``[0, world_size)``.
        world_size: number of workers sharing the epoch round-robin.
        augment_bank: K > 0 (with ``augment``): each sample has K fixed augmentations and each
            epoch uses one of them (see the module docstring); 0: a fresh draw per batch and epoch.
            Ignored without ``augment``.
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
        augment_bank: int = 0,
    ):
        _check_args(len(dataset), batch_size, crop_padding, rank, world_size)
        if isinstance(augment_bank, bool) or not isinstance(augment_bank, int) or augment_bank < 0:
            raise ValueError(f"BatchLoader: augment_bank={augment_bank!r}; expected an int >= 0")
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.augment, self.crop_padding, self.hflip = shuffle, augment, crop_padding, hflip
        self.seed, self.drop_last, self.rank, self.world_size = int(seed), drop_last, rank, world_size
        self.epoch = 0
        self.augment_bank = int(augment_bank) if augment else 0
        if self.augment_bank and isinstance(dataset, SegmentationFileSet):
            raise ValueError(f"BatchLoader: augment_bank={augment_bank}; {dataset.name} is read from files batch by "
                             f"batch and takes no augmentation bank (expected 0)")
        if self.augment_bank and _is_detection(dataset):
            raise ValueError(f"BatchLoader: augment_bank={augment_bank}; {dataset.name} is a detection set, whose "
                             f"box-moving augmentation takes no augmentation bank (expected 0)")
        self.bank = (augment_bank_table(len(dataset), self.augment_bank, self.seed, crop_padding, hflip)
                     if self.augment_bank else None)  # [K, N] each
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

    def epoch_slots(self) -> torch.Tensor | None:
        """``[N]`` int64 bank slot of every sample in the current epoch; None without a bank."""
        if self.bank is None:
            return None
        return bank_slots(len(self.dataset), self.augment_bank, self.seed, self.epoch)

    def __iter__(self) -> Iterator[Batch]:
        order = epoch_order(len(self.dataset), self.seed, self.epoch, self.shuffle)
        slots = self.epoch_slots()
        for k in range(self.rank, self.num_global_batches, self.world_size):
            yield self._make_batch(k, self.sample_indices(k, order), slots)

    def _make_batch(self, k: int, index: torch.Tensor, slots: torch.Tensor | None = None) -> Batch:
        if isinstance(self.dataset, SegmentationFileSet):
            generator = augment_generator(self.seed, self.epoch, k) if self.augment else None
            images, labels = self.dataset.load_batch(index, generator, self.hflip)
            return Batch(k, images, labels, index.clone(), None)
        if _is_detection(self.dataset):  # boxes move with their images; never the classification crop
            generator = augment_generator(self.seed, self.epoch, k) if self.augment else None
            images, labels = self.dataset.load_batch(index, generator, self.hflip, self.crop_padding)
            return Batch(k, images, labels, index.clone(), None)
        images = self.dataset.images[index]  # [B, C, H, W] uint8
        params = None
        if self.bank is not None:
            slot = slots[index]
            params = AugmentParams(self.bank.dy[slot, index].long(), self.bank.dx[slot, index].long(),
                                   self.bank.flip[slot, index])
        elif self.augment:  # = augment_batch
            generator = augment_generator(self.seed, self.epoch, k)
            params = augment_params(len(index), generator, self.crop_padding, self.hflip)
        labels = self.dataset.labels[index]
        if params is not None:  # kept in uint8 so that normalize fuses the scaling
            images = apply_augment(images, params, self.crop_padding)
            if labels.dim() == 3:  # masks move with their images
                labels = apply_augment(labels[:, None], params, self.crop_padding, fill=IGNORE_INDEX)[:, 0]
        images = normalize(images, self.dataset.mean, self.dataset.std)
        # index is a view of the epoch's order: clone it, so that a pickled batch does not carry all N
        return Batch(k, images, labels.long(), index.clone(), params)


def _is_detection(dataset) -> bool:
    """Whether ``dataset`` is a detection split (packed boxes as labels, its own ``load_batch``)."""
    return getattr(dataset, "task", None) == "detection"


def _check_args(n: int, batch_size: int, crop_padding: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"BatchLoader: batch_size={batch_size}; expected >= 1")
    if crop_padding < 0:
        raise ValueError(f"BatchLoader: crop_padding={crop_padding}; expected >= 0")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"BatchLoader: rank={rank}, world_size={world_size}; expected 0 <= rank < world_size")
    if n == 0:
        raise ValueError("BatchLoader: the dataset is empty; expected at least one sample")
