"""Garment canvases as a detection set: a box per visible garment, from its visible mask.

The canvases' class masks (:mod:`mtkd.data.canvases`) cannot tell two touching garments of one class
apart, so each canvas's *instance* map is rebuilt from its layout with the generator's own
placement code (``garment_layers``) and threshold rule: pixel ``(y, x)`` belongs to the last placed
garment that covers it. ``tests/test_detection_data.py`` checks that this map gives back the class mask exactly.

A garment's box is the tight box of its visible pixels (``x0`` = first column, ``x1`` = last column
+ 1; rows alike). A garment whose visible pixels are fewer than ``min_visible`` of its (in-canvas)
coverage is dropped: mostly hidden below later garments, it is no fair target. Its class is its
Fashion-MNIST label (0-9: detection has no background class).

Boxes depend only on the canvases (so on ``(seed, split, i, params)``) and ``min_visible``; with a
``cache_dir`` they are kept next to the canvases, keyed by the canvases' key.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch

from mtkd.data.augment import normalize
from mtkd.data.canvases import CanvasDataset, CanvasLayout, CanvasParams, garment_layers, garment_pool
from mtkd.data.dataset import DataError
from mtkd.data.idx import FASHION_MNIST_CLASSES
from mtkd.detection.boxes import PAD_CLASS

__all__ = ["CANVAS_DET_CLASSES", "DetectionCanvases", "canvas_instances", "canvas_targets"]

CANVAS_DET_CLASSES = list(FASHION_MNIST_CLASSES)
BOXES_VERSION = 1
_CHUNK = 128


def canvas_instances(pool_images: torch.Tensor, layout: CanvasLayout,
                     params: CanvasParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The instance map of canvases from their layout.

    Args:
        pool_images: ``[P, 1, 28, 28]`` uint8 garments of the split the canvases were drawn from.
        layout: the canvases' :class:`~mtkd.data.canvases.CanvasLayout` (B canvases, G slots).
        params: the canvases' parameters.

    Returns:
        ``(instance [B, S, S] int64 slot of the garment on top, -1 for background;
        coverage [B, G] int64 pixels each garment would cover if nothing hid it)``.
    """
    pool = pool_images.reshape(-1, 28, 28)
    batch, slots = layout.source.shape
    size = params.size
    placed = torch.arange(slots)[None] < layout.count[:, None]  # [B, G]
    instance = torch.full((batch, size, size), -1, dtype=torch.int64)
    coverage = torch.zeros(batch, slots, dtype=torch.int64)
    b_idx, g_idx = placed.nonzero(as_tuple=True)
    if b_idx.numel() == 0:
        return instance, coverage
    source = layout.source[b_idx, g_idx]
    place = layout.place[b_idx, g_idx]  # [L, 4] (scale, top, left, gain)
    # the generator's own placement and threshold rule (element-wise, so per garment bit-identical)
    layers = garment_layers(pool, source, place[:, 0], place[:, 1], place[:, 2], size)  # [L, S, S]
    peak = pool[source].reshape(len(source), -1).amax(1).to(torch.float32) / 255.0
    on = torch.zeros(batch, slots, size, size, dtype=torch.bool)
    on[b_idx, g_idx] = layers > (params.threshold * peak)[:, None, None]
    for slot in range(slots):  # later garments cover earlier ones
        instance = torch.where(on[:, slot], torch.tensor(slot), instance)
    return instance, on.flatten(2).sum(2)


def _tight_boxes(instance: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, S, S]`` instance map -> (boxes ``[B, G, 4]`` tight xyxy, visible pixels ``[B, G]``)."""
    size = instance.shape[-1]
    member = instance[:, None] == torch.arange(slots)[None, :, None, None]  # [B, G, S, S]
    rows, cols = member.any(3), member.any(2)  # [B, G, S]
    index = torch.arange(size)
    big = torch.full((), size, dtype=torch.int64)

    def span(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = torch.where(hit, index, big).amin(2)
        last = torch.where(hit, index, -1).amax(2)
        return first, last + 1

    x0, x1 = span(cols)
    y0, y1 = span(rows)
    return torch.stack([x0, y0, x1, y1], 2).to(torch.float32), member.flatten(2).sum(2)


def canvas_targets(pool_images: torch.Tensor, layout: CanvasLayout, params: CanvasParams,
                   min_visible: float = 0.3) -> torch.Tensor:
    """Packed detection targets of canvases (see the module docstring).

    Args:
        pool_images: ``[P, 1, 28, 28]`` uint8 garments of the canvases' split.
        layout: their layout (B canvases, G = ``params.garments[1]`` slots).
        params: their parameters.
        min_visible: drop a garment with fewer visible pixels than this fraction of its coverage.

    Returns:
        ``[B, G, 5]`` float32 rows ``(class, x0, y0, x1, y1)`` in slot order; class -1 for empty slots
        and dropped garments.
    """
    if not 0 <= min_visible <= 1:
        raise DataError(f"detection canvases: min_visible={min_visible}; expected 0 <= min_visible <= 1")
    parts = []
    for start in range(0, layout.count.shape[0], _CHUNK):
        chunk = CanvasLayout(*(t[start:start + _CHUNK] for t in layout))
        instance, coverage = canvas_instances(pool_images, chunk, params)
        boxes, visible = _tight_boxes(instance, chunk.source.shape[1])
        keep = (visible > 0) & (visible >= min_visible * coverage)
        label = torch.where(keep, chunk.label, torch.full_like(chunk.label, PAD_CLASS)).to(torch.float32)
        boxes = torch.where(keep[..., None], boxes, torch.zeros_like(boxes))
        parts.append(torch.cat([label[..., None], boxes], 2))
    if not parts:
        return torch.zeros(0, params.garments[1], 5)
    return torch.cat(parts)


class DetectionCanvases:
    """One split of garment canvases with their boxes (a detection set that needs no download).

    Items are ``(image [1, S, S] float32 normalised, targets [G, 5])``; the whole split is held as
    ``images`` (uint8 ``[N, 1, S, S]``) and ``targets`` (``[N, G, 5]``, G = ``params.garments[1]``, so
    any batch of canvases stacks without re-packing).

    Args:
        split, num_canvases, seed, params, root, cache_dir, mean, std: as
            :class:`~mtkd.data.canvases.CanvasDataset`.
        min_visible: see :func:`canvas_targets`.
    """

    task = "detection"
    num_classes = len(CANVAS_DET_CLASSES)
    class_names = CANVAS_DET_CLASSES
    name = "canvases_det"

    def __init__(self, split: str = "train", *, num_canvases: int | None = None, seed: int = 0,
                 params: CanvasParams | None = None, root: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, min_visible: float = 0.3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        self.canvases = CanvasDataset(split, num_canvases=num_canvases, seed=seed, params=params, root=root,
                                      cache_dir=cache_dir, mean=mean, std=std)
        if not 0 <= min_visible <= 1:
            raise DataError(f"detection canvases: min_visible={min_visible}; expected 0 <= min_visible <= 1")
        self.min_visible = float(min_visible)
        self._targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.canvases)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.batch(torch.tensor([int(i)]))
        return images[0], targets[0]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Canvases ``index [B]`` -> ``(images [B, 1, S, S] float32 normalised, targets [B, G, 5])``."""
        c = self.canvases
        return normalize(c.images[index], c.mean, c.std), self.targets[index]

    @property
    def images(self) -> torch.Tensor:
        """``[N, 1, S, S]`` uint8 canvases."""
        return self.canvases.images

    @property
    def key(self) -> str:
        """sha256 hex of the canvases' key, ``min_visible`` and the box version."""
        spec = f"{self.canvases.key}:{self.min_visible!r}:{BOXES_VERSION}"
        return hashlib.sha256(spec.encode()).hexdigest()

    @property
    def targets(self) -> torch.Tensor:
        """``[N, G, 5]`` packed boxes (computed once, or read from the cache)."""
        if self._targets is None:
            path = self._cache_path()
            self._targets = self._read(path) if path is not None else None
            if self._targets is None:
                c = self.canvases
                pool = garment_pool(c.split, c.root)
                self._targets = canvas_targets(pool.images, c.layout, c.params, self.min_visible)
                if path is not None:
                    self._write(path)
        return self._targets

    def _cache_path(self) -> Path | None:
        c = self.canvases
        return None if c.cache_dir is None else c.cache_dir / f"canvas-boxes-{c.split}-{self.key[:16]}.safetensors"

    def _read(self, path: Path) -> torch.Tensor | None:
        from safetensors import safe_open

        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != self.key:
                    return None
                targets = f.get_tensor("targets")
        except Exception:  # a damaged cache file is regenerated (safetensors raises its own types)
            return None
        expected = (len(self), self.canvases.params.garments[1], 5)
        return targets if tuple(targets.shape) == expected else None

    def _write(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.{os.getpid()}.tmp")
        save_file({"targets": self._targets.contiguous()}, str(tmp), metadata={"key": self.key})
        os.replace(tmp, path)

    def __repr__(self) -> str:
        c = self.canvases
        return (f"DetectionCanvases(split={c.split!r}, n={len(c)}, size={c.params.size}, seed={c.seed}, "
                f"min_visible={self.min_visible})")
