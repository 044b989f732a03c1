"""Seeded augmentation of segmentation pairs: the mask moves with the image.

One augmentation = random scale (image bilinear, mask nearest) -> random crop to the output size
with padding (image padded with ``fill``, mask with the ignore index 255) -> horizontal flip. The
three are done at once, per sample, as one separable resampling (two gathers): output pixel
``(y, x)`` of sample ``b`` reads pixel ``(top + y, left + x')`` of the scaled image, with
``x' = w - 1 - x`` where the sample is flipped. Pixels outside the scaled image are padding.

Scaling follows ``F.interpolate`` without antialiasing: the image becomes ``height x width``
(``round(H * scale)``); output row ``ys`` reads source row ``(ys + 0.5) * H / height - 0.5``
(bilinear, ``align_corners=False``, clamped to the border) for images and
``floor((ys + 0.5) * H / height)`` (``nearest-exact``) for masks.

Randomness comes only from the generator passed in, drawn in a fixed order
(``seg_augment_params``), so an augmentation is reproducible from its seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from mtkd.data.dataset import DataError

IGNORE_INDEX = 255
"""Mask value of pixels that have no class (padding, unlabelled): losses and metrics skip them."""


@dataclass(frozen=True)
class SegAugmentConfig:
    """What to augment.

    Attributes:
        crop_size: ``(h, w)`` of the output (an int ``S`` means ``(S, S)``); None keeps the input size.
        padding: extra pixels of padding on each side before the random crop (the crop may stick
            out of the scaled image by up to this much); 0 with ``crop_size=None`` and no scale
            means no crop.
        hflip: flip each sample left-right with probability 0.5.
        scale: ``(lo, hi)``: each sample is scaled by a factor drawn uniformly in it; None: no scale.
        fill: image value of padding pixels, one float or one per channel, in the images' own scale
            (0 is the mean of normalised images).
        ignore_index: mask value of padding pixels.
    """

    crop_size: tuple[int, int] | None = None
    padding: int = 0
    hflip: bool = True
    scale: tuple[float, float] | None = None
    fill: float | tuple[float, ...] = 0.0
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.crop_size is not None:
            size = (self.crop_size, self.crop_size) if isinstance(self.crop_size, int) else tuple(self.crop_size)
            if len(size) != 2 or min(size) < 1:
                raise DataError(f"seg augment: crop_size={self.crop_size}; expected (h, w) with h, w >= 1")
            object.__setattr__(self, "crop_size", (int(size[0]), int(size[1])))
        if not isinstance(self.fill, (int, float)):
            object.__setattr__(self, "fill", tuple(map(float, self.fill)))
        if self.padding < 0:
            raise DataError(f"seg augment: padding={self.padding}; expected >= 0")
        if self.scale is not None:
            lo, hi = map(float, self.scale)
            if not 0 < lo <= hi:
                raise DataError(f"seg augment: scale={self.scale}; expected (lo, hi) with 0 < lo <= hi")
            object.__setattr__(self, "scale", (lo, hi))
        if not 0 <= self.ignore_index:
            raise DataError(f"seg augment: ignore_index={self.ignore_index}; expected >= 0")


class SegAugmentParams(NamedTuple):
    """Per-sample augmentation of B samples (all ``[B]`` tensors).

    Attributes:
        scale: float64 factor drawn (1 without ``scale``).
        height, width: int64 size of the scaled image, ``max(1, round(H * scale))``.
        top, left: int64 position of the crop's top-left pixel in the scaled image; negative or
            past the far edge where the crop takes padding.
        flip: bool, True where the crop is flipped left-right.
    """

    scale: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor


class Taps(NamedTuple):
    """Where each output row (or column) reads: ``value = x[i0] + weight * (x[i1] - x[i0])``.

    Attributes:
        i0, i1: ``[B, n]`` int64 source indices.
        weight: ``[B, n]`` float weight of ``i1``; None: nearest (reads ``i0`` only).
    """

    i0: torch.Tensor
    i1: torch.Tensor
    weight: torch.Tensor | None = None


def resample_separable(x: torch.Tensor, rows: Taps, cols: Taps) -> torch.Tensor:
    """Resample each sample's rows, then columns, by per-sample taps (two gathers each).

    Every output value is computed element by element (no reduction, no fused kernel), so a
    sample's result is bit-identical whatever the batch it is computed in.

    Args:
        x: ``[B, C, H, W]`` (float for weighted taps; any dtype for nearest).
        rows: taps of ``[B, h]`` into ``H``.
        cols: taps of ``[B, w]`` into ``W``.

    Returns:
        ``[B, C, h, w]`` with ``x``'s dtype.
    """
    b, c, _, width = x.shape
    h, w = rows.i0.shape[1], cols.i0.shape[1]

    def along(src: torch.Tensor, taps: Taps, dim: int, shape: tuple[int, ...], view: tuple[int, ...]) -> torch.Tensor:
        out = src.gather(dim, taps.i0.view(view).expand(shape))
        if taps.weight is None:
            return out
        step = src.gather(dim, taps.i1.view(view).expand(shape)) - out
        return out + taps.weight.to(src.dtype).view(view) * step

    r = along(x, rows, 2, (b, c, h, width), (b, 1, h, 1))
    return along(r, cols, 3, (b, c, h, w), (b, 1, 1, w))


def seg_augment_params(
    batch_size: int, image_size: tuple[int, int], generator: torch.Generator, config: SegAugmentConfig
) -> SegAugmentParams:
    """Draw the augmentation of B samples of size ``image_size = (H, W)``.

    Draw order (always all four, as float64 ``rand(B)``): scale, top, left, flip; so turning one
    part off does not change the draws of the others. ``top`` is uniform over the integers between
    ``-padding`` and ``height + padding - h`` (either way round: a crop larger than the padded
    image puts the image at a random place inside it), likewise ``left``; ``flip`` is ``u < 0.5``.
    """
    device = generator.device
    draw = lambda: torch.rand(batch_size, dtype=torch.float64, generator=generator, device=device)  # noqa: E731
    u_scale, u_top, u_left, u_flip = draw(), draw(), draw(), draw()
    in_h, in_w = image_size
    out_h, out_w = config.crop_size or (in_h, in_w)
    if config.scale is None:
        scale = torch.ones_like(u_scale)
    else:
        lo, hi = config.scale
        scale = lo + u_scale * (hi - lo)
    height = torch.floor(in_h * scale + 0.5).clamp_min(1).to(torch.int64)
    width = torch.floor(in_w * scale + 0.5).clamp_min(1).to(torch.int64)
    top = _offset(u_top, height, out_h, config.padding)
    left = _offset(u_left, width, out_w, config.padding)
    return SegAugmentParams(scale, height, width, top, left, (u_flip < 0.5) & config.hflip)


def _offset(u: torch.Tensor, size: torch.Tensor, crop: int, padding: int) -> torch.Tensor:
    """Integer uniform between ``-padding`` and ``size + padding - crop`` (inclusive, either order)."""
    a = torch.full_like(size, -padding)
    b = size + padding - crop
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    return lo + torch.minimum(torch.floor(u * (hi - lo + 1).to(u.dtype)).to(torch.int64), hi - lo)


def apply_seg_augment(
    images: torch.Tensor, masks: torch.Tensor, params: SegAugmentParams, config: SegAugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale, crop and flip ``images`` and ``masks`` as ``params`` say.

    Args:
        images: ``[B, C, H, W]`` float, or uint8 (read as ``x / 255``).
        masks: ``[B, H, W]`` int64 or uint8 class ids.
        params: from ``seg_augment_params`` with the same B, ``(H, W)`` and config.
        config: the crop size, fill and ignore index.

    Returns:
        ``(images [B, C, h, w], masks [B, h, w])``: images float (float32 for uint8 input, else
        their dtype), masks with their dtype; ``(h, w)`` is ``config.crop_size`` or ``(H, W)``.
    """
    _check_pair(images, masks)
    if images.dtype == torch.uint8:
        images = images.to(torch.float32) / 255.0
    elif not images.is_floating_point():
        raise DataError(f"seg augment: images are {images.dtype}; expected float or uint8")
    if masks.dtype == torch.uint8 and config.ignore_index > 255:
        raise DataError(f"seg augment: uint8 masks cannot hold ignore_index={config.ignore_index}")
    b, c, in_h, in_w = images.shape
    out_h, out_w = config.crop_size or (in_h, in_w)
    device = images.device
    ys = params.top.to(device)[:, None] + torch.arange(out_h, device=device)  # [B, h] rows of the scaled image
    xs = torch.arange(out_w, device=device).expand(b, out_w)
    xs = torch.where(params.flip.to(device)[:, None], out_w - 1 - xs, xs) + params.left.to(device)[:, None]
    height, width = params.height.to(device)[:, None], params.width.to(device)[:, None]
    row_in = (ys >= 0) & (ys < height)
    col_in = (xs >= 0) & (xs < width)
    inside = row_in[:, :, None] & col_in[:, None, :]  # [B, h, w]
    out = resample_separable(images, _linear_taps(ys, height, in_h), _linear_taps(xs, width, in_w))
    fill = torch.as_tensor(config.fill, dtype=out.dtype, device=device).reshape(-1)
    if fill.numel() not in (1, c):
        raise DataError(f"seg augment: fill has {fill.numel()} values for {c} channels; expected 1 or {c}")
    out = torch.where(inside[:, None], out, fill.view(1, -1, 1, 1))
    mask = resample_separable(masks[:, None], _nearest_taps(ys, height, in_h), _nearest_taps(xs, width, in_w))[:, 0]
    mask = torch.where(inside, mask, torch.tensor(config.ignore_index, dtype=mask.dtype, device=device))
    return out, mask


def _linear_taps(pos: torch.Tensor, scaled: torch.Tensor, size: int) -> Taps:
    """Bilinear taps of positions ``pos [B, n]`` in a ``scaled``-long axis read from ``size`` source pixels."""
    src = ((pos.to(torch.float64) + 0.5) * (size / scaled.to(torch.float64)) - 0.5).clamp(0, size - 1)
    i0 = src.floor()
    return Taps(i0.to(torch.int64), (i0 + 1).clamp(max=size - 1).to(torch.int64), (src - i0).to(torch.float32))


def _nearest_taps(pos: torch.Tensor, scaled: torch.Tensor, size: int) -> Taps:
    src = torch.floor((pos.to(torch.float64) + 0.5) * (size / scaled.to(torch.float64)))
    i0 = src.clamp(0, size - 1).to(torch.int64)
    return Taps(i0, i0)


def _check_pair(images: torch.Tensor, masks: torch.Tensor) -> None:
    if images.dim() != 4 or masks.dim() != 3:
        raise DataError(
            f"seg augment: images {list(images.shape)}, masks {list(masks.shape)}; expected [B, C, H, W] and [B, H, W]"
        )
    if images.shape[0] != masks.shape[0] or images.shape[2:] != masks.shape[1:]:
        raise DataError(
            f"seg augment: images {list(images.shape)} and masks {list(masks.shape)} do not match; "
            "expected [B, C, H, W] and [B, H, W]"
        )
    if masks.dtype not in (torch.int64, torch.uint8):
        raise DataError(f"seg augment: masks are {masks.dtype}; expected int64 or uint8")


def seg_augment_batch(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator, config: SegAugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch of same-size pairs, each sample its own draw.

    Args:
        images: ``[B, C, H, W]`` float or uint8 (read as ``x / 255``).
        masks: ``[B, H, W]`` int64 or uint8.
        generator: the only source of randomness (see ``seg_augment_params`` for the draw order).
        config: what to augment.

    Returns:
        ``(images [B, C, h, w] float, masks [B, h, w])``, ``(h, w)`` = ``config.crop_size`` or ``(H, W)``.
    """
    _check_pair(images, masks)
    params = seg_augment_params(images.shape[0], tuple(images.shape[2:]), generator, config)
    return apply_seg_augment(images, masks, params, config)


def seg_augment_sample(
    image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, config: SegAugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment one pair: ``image [C, H, W]``, ``mask [H, W]`` -> ``([C, h, w], [h, w])``.

    The same draws and result as ``seg_augment_batch`` on the batch of this one sample.
    """
    if image.dim() != 3 or mask.dim() != 2:
        raise DataError(
            f"seg augment: image {list(image.shape)}, mask {list(mask.shape)}; expected [C, H, W] and [H, W]"
        )
    out, out_mask = seg_augment_batch(image[None], mask[None], generator, config)
    return out[0], out_mask[0]


def seg_collate(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]], generator: torch.Generator, config: SegAugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment pairs of any sizes one by one (in list order) and stack them into a batch.

    Args:
        samples: ``(image [C, Hi, Wi] float or uint8, mask [Hi, Wi])`` pairs (a dataset's items).
        generator: drawn for sample 0, then 1, ... (``seg_augment_sample`` each).
        config: needs ``crop_size`` unless every sample has the same size.

    Returns:
        ``(images [B, C, h, w] float, masks [B, h, w])``.
    """
    if not samples:
        raise DataError("seg_collate: got no samples; expected at least one")
    sizes = {tuple(image.shape[1:]) for image, _ in samples}
    if config.crop_size is None and len(sizes) > 1:
        raise DataError(f"seg_collate: samples of sizes {sorted(sizes)} need a crop_size to be batched")
    pairs = [seg_augment_sample(image, mask, generator, config) for image, mask in samples]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
