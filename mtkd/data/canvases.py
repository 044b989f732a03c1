"""Garment canvases: a segmentation set of real Fashion-MNIST garments that needs no download.

Canvas ``i`` of a split is composed from ``(seed, split, i, params)`` alone:

1. Background: a flat level, then fragments of other garments of the split (a random crop of a
   garment, scaled and placed anywhere) at low contrast, the brightest winning. Labelled background.
2. 2-5 garments of the split (``params.garments``), each scaled (0.6x-1.6x by default) and centred
   at a random point of the canvas's middle 80%, drawn in order: a later garment covers earlier ones.
   A garment covers a pixel where its (scaled, bilinear) intensity is above ``threshold`` times its
   own maximum; there the canvas shows the garment (times a brightness ``gain``) and the mask
   says its class; elsewhere the layers below show through.
3. Gaussian noise over everything, then quantisation to uint8.

Masks are exact: a pixel has the class of the garment on top there (Fashion-MNIST label ``k`` ->
class ``k + 1``), or 0 (background). The ignore index 255 never occurs. Train canvases take every
garment (and fragment) from Fashion-MNIST's train split, test canvases from its test split.

Placement: canvas pixel ``y`` (covering ``[y, y + 1)``) reads the garment at source row
``(y + 0.5 - top) / scale - 0.5`` (bilinear between source pixel centres, zero outside the garment);
columns likewise with ``left``. ``CanvasLayout`` records ``scale, top, left, gain`` of every garment.

Randomness: canvas ``i`` draws its uniforms and its noise from its own generator, seeded with
``derive_seed("canvas", seed, split, i)``; the rest is element-wise tensor work. So a canvas is
bit-identical whichever other canvases are generated with it, and in any order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from mtkd.data.augment import normalize
from mtkd.data.dataset import DataError, ImageDataset, channel_stats
from mtkd.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_STATS, fashion_mnist
from mtkd.data.loader import derive_seed
from mtkd.data.registry import DATASETS
from mtkd.data.seg_augment import IGNORE_INDEX, Taps, resample_separable

CANVAS_CLASSES = ["background", *FASHION_MNIST_CLASSES]
"""Class names: 0 is background, Fashion-MNIST label ``k`` is class ``k + 1``."""
NUM_CANVAS_CLASSES = len(CANVAS_CLASSES)
DEFAULT_COUNTS = {"train": 4000, "test": 1000}
CANVAS_VERSION = 1
"""Bumped whenever generation changes, so on-disk caches of older versions are not reused."""
_CHUNK = 128  # canvases rendered at once (bounds memory; has no effect on the result)
_GARMENT_COLS = 5  # uniforms per garment slot: source, scale, centre y, centre x, gain
_CLUTTER_COLS = 9  # per fragment: source, scale, centre y, centre x, contrast, row0, col0, rows, cols


@dataclass(frozen=True)
class CanvasParams:
    """How canvases are composed (every range is inclusive, drawn uniformly).

    Attributes:
        size: canvas height and width in pixels.
        garments: ``(lo, hi)`` garments per canvas.
        scale: ``(lo, hi)`` garment scale factor (1 = 28 pixels).
        gain: ``(lo, hi)`` brightness factor of a garment.
        clutter: ``(lo, hi)`` background fragments per canvas.
        clutter_contrast: ``(lo, hi)`` brightness factor of a fragment.
        fragment: ``(lo, hi)`` rows (and, drawn apart, columns) of the crop a fragment keeps, in
            source pixels out of 28.
        background: ``(lo, hi)`` flat background level, in ``[0, 1]`` scale.
        noise_std: standard deviation of the added Gaussian noise, ``[0, 1]`` scale.
        threshold: a garment covers a pixel where its intensity exceeds this fraction of its maximum.
    """

    size: int = 64
    garments: tuple[int, int] = (2, 5)
    scale: tuple[float, float] = (0.6, 1.6)
    gain: tuple[float, float] = (0.7, 1.0)
    clutter: tuple[int, int] = (3, 6)
    clutter_contrast: tuple[float, float] = (0.1, 0.3)
    fragment: tuple[int, int] = (6, 20)
    background: tuple[float, float] = (0.0, 0.1)
    noise_std: float = 0.03
    threshold: float = 0.1

    def __post_init__(self) -> None:
        def pair(name: str, kind: type, lo_bound: float, hi_bound: float | None = None) -> None:
            value = getattr(self, name)
            try:
                lo, hi = (kind(v) for v in value)
            except (TypeError, ValueError):
                raise DataError(f"canvases: {name}={value!r}; expected a pair (lo, hi)") from None
            if not (lo_bound <= lo <= hi and (hi_bound is None or hi <= hi_bound)):
                bound = f"{lo_bound} <= lo <= hi" + (f" <= {hi_bound}" if hi_bound is not None else "")
                raise DataError(f"canvases: {name}={value!r}; expected {bound}")
            object.__setattr__(self, name, (lo, hi))

        if not isinstance(self.size, int) or self.size < 8:
            raise DataError(f"canvases: size={self.size!r}; expected an int >= 8")
        pair("garments", int, 1)
        pair("scale", float, 1e-3)
        pair("gain", float, 0.0, 1.0)
        pair("clutter", int, 0)
        pair("clutter_contrast", float, 0.0, 1.0)
        pair("fragment", int, 1, 28)
        pair("background", float, 0.0, 1.0)
        if not self.noise_std >= 0:
            raise DataError(f"canvases: noise_std={self.noise_std!r}; expected >= 0")
        if not 0 < self.threshold < 1:
            raise DataError(f"canvases: threshold={self.threshold!r}; expected 0 < threshold < 1")

    def to_dict(self) -> dict:
        """The parameters as plain JSON types (lists for pairs)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class CanvasLayout(NamedTuple):
    """What each of B canvases holds, G = ``params.garments[1]`` slots (unused slots: -1 / NaN).

    Attributes:
        count: ``[B]`` int64 garments placed (some may end up fully covered or off the canvas).
        source: ``[B, G]`` int64 index of each garment in its Fashion-MNIST split.
        label: ``[B, G]`` int64 Fashion-MNIST label of each garment (its class is ``label + 1``).
        place: ``[B, G, 4]`` float64 ``(scale, top, left, gain)`` of each garment (see module doc).
    """

    count: torch.Tensor
    source: torch.Tensor
    label: torch.Tensor
    place: torch.Tensor


@lru_cache(maxsize=4)
def garment_pool(split: str, root: str | None = None) -> ImageDataset:
    """The Fashion-MNIST split canvases of ``split`` take their garments from (read once, cached).

    Returns:
        An ``ImageDataset`` of uint8 ``[N, 1, 28, 28]`` images and ``[N]`` labels.
    """
    if split not in DEFAULT_COUNTS:
        raise DataError(f"canvases: unknown split {split!r}; expected one of {sorted(DEFAULT_COUNTS)}")
    return fashion_mnist(root=root, split=split)


def render_canvases(
    pool_images: torch.Tensor,
    pool_labels: torch.Tensor,
    indices: Sequence[int] | torch.Tensor,
    *,
    seed: int,
    split: str,
    params: CanvasParams = CanvasParams(),
) -> tuple[torch.Tensor, torch.Tensor, CanvasLayout]:
    """Render canvases ``indices`` of a split from its garment pool.

    Args:
        pool_images: ``[N, 1, 28, 28]`` (or ``[N, 28, 28]``) uint8 garments of the split.
        pool_labels: ``[N]`` int64 their Fashion-MNIST labels in ``[0, 10)``.
        indices: ``[B]`` canvas indices (any order, repeats allowed).
        seed: the data seed; with ``split`` and an index it fixes a canvas.
        split: ``"train"`` or ``"test"`` (part of every canvas's seed).
        params: composition parameters.

    Returns:
        ``(images [B, 1, S, S] uint8, masks [B, S, S] uint8 in [0, 11), layout)`` with
        ``S = params.size``.
    """
    pool = pool_images.reshape(-1, 28, 28)
    if pool.dtype != torch.uint8 or pool.shape[0] == 0 or pool.shape[0] != pool_labels.shape[0]:
        raise DataError(
            f"canvases: garment pool {pool_images.dtype} {list(pool_images.shape)} with {pool_labels.shape[0]} "
            "labels; expected uint8 [N, 1, 28, 28] and N labels, N >= 1"
        )
    indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    parts = [_render_chunk(pool, pool_labels, indices[i : i + _CHUNK], seed, split, params)
             for i in range(0, indices.numel(), _CHUNK)]  # fmt: skip
    if not parts:
        s, g = params.size, params.garments[1]
        empty = CanvasLayout(torch.zeros(0, dtype=torch.int64), torch.zeros(0, g, dtype=torch.int64),
                             torch.zeros(0, g, dtype=torch.int64), torch.zeros(0, g, 4, dtype=torch.float64))
        return torch.zeros(0, 1, s, s, dtype=torch.uint8), torch.zeros(0, s, s, dtype=torch.uint8), empty
    layout = CanvasLayout(*(torch.cat([p[2][k] for p in parts]) for k in range(4)))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), layout


def _draws(indices: torch.Tensor, seed: int, split: str, params: CanvasParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Per canvas, from its own generator: ``[B, K]`` float64 uniforms, then ``[B, S, S]`` normal noise."""
    k = 3 + _GARMENT_COLS * params.garments[1] + _CLUTTER_COLS * params.clutter[1]
    uniforms, noise = [], []
    for index in indices.tolist():
        generator = torch.Generator().manual_seed(derive_seed("canvas", seed, split, index))
        uniforms.append(torch.rand(k, dtype=torch.float64, generator=generator))
        noise.append(torch.randn(params.size, params.size, generator=generator))
    return torch.stack(uniforms), torch.stack(noise)


def _uniform_int(u: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return (lo + torch.floor(u * (hi - lo + 1))).clamp(max=hi).to(torch.int64)


def _span(u: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    return bounds[0] + u * (bounds[1] - bounds[0])


def garment_layers(pool: torch.Tensor, source: torch.Tensor, scale: torch.Tensor, top: torch.Tensor,
                   left: torch.Tensor, size: int, window: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Place garments ``source [L]`` on ``[L, S, S]`` float32 layers (zero off the garment).

    ``window = (row0, col0, rows, cols)`` (each ``[L]``) keeps only that crop of each garment.
    """
    padded = F.pad(pool[source].to(torch.float32) / 255.0, (1, 1, 1, 1))  # [L, 30, 30], zero border
    if window is not None:
        row0, col0, rows, cols = (w[:, None] for w in window)
        r = torch.arange(28)
        keep_r = torch.zeros(len(source), 30)
        keep_c = torch.zeros(len(source), 30)
        keep_r[:, 1:29] = ((r >= row0) & (r < row0 + rows)).to(torch.float32)
        keep_c[:, 1:29] = ((r >= col0) & (r < col0 + cols)).to(torch.float32)
        padded = padded * keep_r[:, :, None] * keep_c[:, None, :]
    pixel = torch.arange(size, dtype=torch.float64) + 0.5

    def taps(offset: torch.Tensor) -> Taps:
        src = ((pixel[None] - offset[:, None]) / scale[:, None] + 0.5).clamp(0, 29)  # padded coordinates
        i0 = src.floor()
        return Taps(i0.to(torch.int64), (i0 + 1).clamp(max=29).to(torch.int64), (src - i0).to(torch.float32))

    return resample_separable(padded[:, None], taps(top), taps(left))[:, 0]


def _render_chunk(pool, pool_labels, indices, seed, split, params: CanvasParams):
    u, noise = _draws(indices, seed, split, params)
    b, s, g_max, c_max = indices.numel(), params.size, params.garments[1], params.clutter[1]
    n = pool.shape[0]
    count = _uniform_int(u[:, 0], *params.garments)
    n_clutter = _uniform_int(u[:, 1], *params.clutter)
    canvas = _span(u[:, 2], params.background).to(torch.float32)[:, None, None].expand(b, s, s).clone()

    if c_max:
        cu = u[:, 3 + _GARMENT_COLS * g_max :].reshape(b * c_max, _CLUTTER_COLS)
        scale = _span(cu[:, 1], params.scale)
        rows, cols = _uniform_int(cu[:, 7], *params.fragment), _uniform_int(cu[:, 8], *params.fragment)
        row0 = torch.floor(cu[:, 5] * (29 - rows)).to(torch.int64)
        col0 = torch.floor(cu[:, 6] * (29 - cols)).to(torch.int64)
        window = (row0, col0, rows, cols)
        layers = garment_layers(pool, _uniform_int(cu[:, 0], 0, n - 1), scale, cu[:, 2] * s - 14 * scale,
                         cu[:, 3] * s - 14 * scale, s, window).view(b, c_max, s, s)  # fmt: skip
        contrast = _span(cu[:, 4], params.clutter_contrast).to(torch.float32).view(b, c_max, 1, 1)
        active = (torch.arange(c_max)[None] < n_clutter[:, None]).view(b, c_max, 1, 1)
        canvas = torch.maximum(canvas, torch.where(active, layers * contrast, 0.0).amax(dim=1))

    gu = u[:, 3 : 3 + _GARMENT_COLS * g_max].reshape(b, g_max, _GARMENT_COLS)
    source = _uniform_int(gu[..., 0], 0, n - 1)
    scale = _span(gu[..., 1], params.scale)
    top = (0.1 + 0.8 * gu[..., 2]) * s - 14 * scale
    left = (0.1 + 0.8 * gu[..., 3]) * s - 14 * scale
    gain = _span(gu[..., 4], params.gain)
    flat = (t.reshape(-1) for t in (source, scale, top, left))
    layers = garment_layers(pool, *flat, s).view(b, g_max, s, s)
    peak = pool[source.reshape(-1)].reshape(b, g_max, -1).amax(dim=2).to(torch.float32) / 255.0
    placed = torch.arange(g_max)[None] < count[:, None]  # [B, G]
    label = pool_labels[source]
    mask = torch.zeros(b, s, s, dtype=torch.uint8)
    for slot in range(g_max):
        on = placed[:, slot, None, None] & (layers[:, slot] > (params.threshold * peak[:, slot])[:, None, None])
        canvas = torch.where(on, layers[:, slot] * gain[:, slot].to(torch.float32)[:, None, None], canvas)
        mask = torch.where(on, (label[:, slot] + 1).to(torch.uint8)[:, None, None], mask)
    if params.noise_std:
        canvas = canvas + noise * params.noise_std
    images = torch.round(canvas.clamp(0.0, 1.0) * 255.0).to(torch.uint8)[:, None]
    unused = ~placed
    layout = CanvasLayout(
        count,
        source.masked_fill(unused, -1),
        label.masked_fill(unused, -1),
        torch.stack([scale, top, left, gain], dim=2).masked_fill(unused[..., None], float("nan")),
    )
    return images, mask, layout


class CanvasDataset:
    """One split of garment canvases, generated on first use (or read from ``cache_dir``).

    Items are ``(image [1, S, S] float32, normalised, mask [S, S] int64)``. The whole split is held
    as ``images`` (uint8 ``[N, 1, S, S]``) and ``masks`` (uint8 ``[N, S, S]``) for batched use.

    Args:
        split: ``"train"`` (garments of Fashion-MNIST train) or ``"test"`` (of its test split).
        num_canvases: canvases in the split; default 4000 (train) or 1000 (test).
        seed: the data seed (canvas ``i`` depends only on seed, split, ``i`` and params).
        params: composition parameters.
        root: Fashion-MNIST folder (default ``/usr/share/datasets/fashion-mnist``).
        cache_dir: a folder for a safetensors copy of the split, keyed by everything that
            determines it (version, seed, split, count, params, the garment pool's digest, torch's
            version); None: no disk cache.
        mean, std: normalisation in ``[0, 1]`` scale; default Fashion-MNIST's (0.2860, 0.3530).
    """

    num_classes = NUM_CANVAS_CLASSES
    class_names = CANVAS_CLASSES
    ignore_index = IGNORE_INDEX
    name = "canvases"

    def __init__(self, split: str = "train", *, num_canvases: int | None = None, seed: int = 0,
                 params: CanvasParams | None = None, root: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:  # fmt: skip
        if split not in DEFAULT_COUNTS:
            raise DataError(f"canvases: unknown split {split!r}; expected one of {sorted(DEFAULT_COUNTS)}")
        self.split, self.seed = split, int(seed)
        self.num_canvases = DEFAULT_COUNTS[split] if num_canvases is None else int(num_canvases)
        if self.num_canvases < 1:
            raise DataError(f"canvases: num_canvases={num_canvases}; expected >= 1")
        self.params = params or CanvasParams()
        self.root = None if root is None else str(root)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.mean = tuple(map(float, mean or FASHION_MNIST_STATS[0]))
        self.std = tuple(map(float, std or FASHION_MNIST_STATS[1]))
        self._data: tuple[torch.Tensor, torch.Tensor, CanvasLayout] | None = None
        self._key: str | None = None

    def __len__(self) -> int:
        return self.num_canvases

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Canvas ``i`` as ``(image [1, S, S] float32 normalised, mask [S, S] int64)``."""
        images, masks = self.batch(torch.tensor([int(i)]))
        return images[0], masks[0]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Canvases ``index [B]`` as ``(images [B, 1, S, S] float32 normalised, masks [B, S, S] int64)``."""
        images, masks, _ = self.materialize()
        return normalize(images[index], self.mean, self.std), masks[index].to(torch.int64)

    @property
    def images(self) -> torch.Tensor:
        """``[N, 1, S, S]`` uint8 canvases (``[0, 255]``, not normalised)."""
        return self.materialize()[0]

    @property
    def masks(self) -> torch.Tensor:
        """``[N, S, S]`` uint8 class ids in ``[0, 11)``."""
        return self.materialize()[1]

    @property
    def layout(self) -> CanvasLayout:
        """What each canvas holds (``CanvasLayout`` of ``[N, ...]`` tensors)."""
        return self.materialize()[2]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(1, S, S)``."""
        return (1, self.params.size, self.params.size)

    @property
    def key(self) -> str:
        """sha256 hex of everything that determines the split (the cache key; also a content identity)."""
        if self._key is None:
            spec = {"version": CANVAS_VERSION, "seed": self.seed, "split": self.split, "count": self.num_canvases,
                    "params": self.params.to_dict(), "pool": garment_pool(self.split, self.root).digest,
                    "torch": torch.__version__.split("+")[0]}  # fmt: skip
            self._key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        return self._key

    @property
    def digest(self) -> str:
        """First 16 hex chars of ``key``."""
        return self.key[:16]

    @property
    def cache_path(self) -> Path | None:
        """The safetensors file of this split in ``cache_dir`` (None without a cache folder)."""
        return None if self.cache_dir is None else self.cache_dir / f"canvases-{self.split}-{self.digest}.safetensors"

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor, CanvasLayout]:
        """Generate the split (or read it from the cache) once; returns ``(images, masks, layout)``."""
        if self._data is None:
            self._data = self._read_cache() if self.cache_dir is not None else None
            if self._data is None:
                pool = garment_pool(self.split, self.root)
                self._data = render_canvases(pool.images, pool.labels, torch.arange(self.num_canvases),
                                             seed=self.seed, split=self.split, params=self.params)  # fmt: skip
                if self.cache_dir is not None:
                    self._write_cache()
        return self._data

    def _read_cache(self) -> tuple[torch.Tensor, torch.Tensor, CanvasLayout] | None:
        from safetensors import safe_open

        path = self.cache_path
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != self.key:
                    raise ValueError("its key does not match")
                t = {name: f.get_tensor(name) for name in f.keys()}
            data = t["images"], t["masks"], CanvasLayout(*(t[name] for name in CanvasLayout._fields))
        except Exception as err:  # safetensors raises its own error types; a missing tensor is a KeyError
            warnings.warn(f"canvases: ignoring cache file {path} ({err}); generating the split again", stacklevel=3)
            return None
        s, n = self.params.size, self.num_canvases
        if data[0].shape != (n, 1, s, s) or data[1].shape != (n, s, s):
            warnings.warn(f"canvases: ignoring cache file {path} (wrong shapes); generating the split again",
                          stacklevel=3)
            return None
        return data

    def _write_cache(self) -> None:
        from safetensors.torch import save_file

        images, masks, layout = self._data
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tensors = {"images": images, "masks": masks, **{k: v.contiguous() for k, v in layout._asdict().items()}}
        spec = {"seed": self.seed, "split": self.split, "count": self.num_canvases, "params": self.params.to_dict()}
        meta = {"key": self.key, "spec": json.dumps(spec)}
        tmp = Path(f"{self.cache_path}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self.cache_path)

    def __repr__(self) -> str:
        return (f"CanvasDataset(split={self.split!r}, n={self.num_canvases}, size={self.params.size}, "
                f"seed={self.seed}, num_classes={self.num_classes})")  # fmt: skip


@DATASETS.register(name="canvases")
def canvas_split(root=None, split="train", *, mean=None, std=None, num_canvases: int | None = None, seed: int = 0,
                 cache_dir: str | None = None, **params) -> ImageDataset:
    """A split of garment canvases as a segmentation :class:`ImageDataset` (masks ``[N, S, S]`` uint8,
    11 classes; the dataset registry's ``canvases``).

    Args:
        root: the Fashion-MNIST folder (default ``/usr/share/datasets/fashion-mnist``).
        split: ``"train"`` or ``"test"``.
        mean, std: normalisation; default the train canvases' own statistics.
        num_canvases: canvases in the split (default 4000 train, 1000 test).
        seed: the canvases' seed (the data; independent of the run's seed, so that paired runs see the
            same canvases).
        cache_dir: a folder for a safetensors copy of the split (None: generated every time, ~1,000/s).
        **params: :class:`CanvasParams` fields (``size``, ``garments``, ``scale``...).

    Example YAML:
        data: {name: canvases, options: {size: 64, num_canvases: 4000, cache_dir: cache/canvases}}
    """
    count = num_canvases
    if isinstance(num_canvases, dict):  # per split: {train: 4000, test: 1000}
        count = num_canvases.get(split)
    try:
        canvas_params = CanvasParams(**params)
    except TypeError as err:
        raise DataError(f"canvases: {err}; the options are num_canvases, seed, cache_dir and "
                        f"{', '.join(f.name for f in dataclasses.fields(CanvasParams))}") from None
    data = CanvasDataset(split, num_canvases=count, seed=seed, params=canvas_params, root=root, cache_dir=cache_dir)
    if mean is None or std is None:
        train = data if split == "train" else CanvasDataset(
            "train", num_canvases=count, seed=seed, params=canvas_params, root=root, cache_dir=cache_dir)
        mean, std = channel_stats(train.images)
    return ImageDataset(images=data.images, labels=data.masks, num_classes=NUM_CANVAS_CLASSES, name="canvases",
                        split=split, mean=mean, std=std, class_names=list(CANVAS_CLASSES))


canvas_split.task = "segmentation"  # read by mtkd.tasks.dataset_task before any canvas is made
