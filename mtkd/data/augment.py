"""Seeded, vectorised augmentation of whole batches, and normalisation.

Augmentation = random crop with zero padding (per-sample offsets) + horizontal flip with
p = 0.5 per sample, done as one gather. Its randomness comes only from the generator passed
in, drawn in a fixed order (``AugmentParams``), so a batch's augmentation is reproducible.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F


class AugmentParams(NamedTuple):
    """Per-sample augmentation of a batch of B images.

    Attributes:
        dy: ``[B]`` int64 crop row offset into the padded image, in ``[0, 2 * padding]``
            (``padding`` means no shift).
        dx: ``[B]`` int64 crop column offset, likewise.
        flip: ``[B]`` bool, True where the sample is flipped left-right.
    """

    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor


def augment_params(batch_size: int, generator: torch.Generator, crop_padding: int, hflip: bool) -> AugmentParams:
    """Draw the augmentation of a batch: ``dy``, ``dx`` (randint), then ``flip`` (rand < 0.5).

    All three are always drawn, so the flips do not depend on ``crop_padding`` and vice versa
    (with ``crop_padding == 0`` the offsets are all 0; with ``hflip=False`` no sample is flipped).
    """
    if crop_padding < 0:
        raise ValueError(f"crop_padding={crop_padding}; expected >= 0")
    device = generator.device
    dy = torch.randint(0, 2 * crop_padding + 1, (batch_size,), generator=generator, device=device)
    dx = torch.randint(0, 2 * crop_padding + 1, (batch_size,), generator=generator, device=device)
    flip = torch.rand(batch_size, generator=generator, device=device) < 0.5
    return AugmentParams(dy, dx, flip & hflip)


def apply_augment(images: torch.Tensor, params: AugmentParams, crop_padding: int, fill: int = 0) -> torch.Tensor:
    """Crop (padding with ``fill``) and flip ``images`` as ``params`` say.

    Args:
        images: ``[B, C, H, W]`` uint8 or float (masks: ``[B, 1, H, W]`` with ``fill`` the ignore index,
            so that a mask moves with its image).
        params: from ``augment_params`` with the same ``B`` and ``crop_padding``.
        crop_padding: padding on each side before cropping back to ``H x W``.
        fill: value of the padding pixels (0 for images).

    Returns:
        ``[B, C, H, W]`` with ``images``' dtype.
    """
    b, c, h, w = images.shape
    p = crop_padding
    padded = F.pad(images, (p, p, p, p), value=fill) if p else images
    wp = w + 2 * p
    cols = torch.arange(w, device=images.device)
    cols = torch.where(params.flip.to(images.device)[:, None], w - 1 - cols, cols)  # [B, W]
    rows = params.dy.to(images.device)[:, None] + torch.arange(h, device=images.device)  # [B, H]
    cols = params.dx.to(images.device)[:, None] + cols
    flat_index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    out = padded.reshape(b, c, -1).gather(2, flat_index)
    return out.reshape(b, c, h, w)


def augment_batch(
    images: torch.Tensor, generator: torch.Generator, crop_padding: int = 4, hflip: bool = True
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per sample.

    Args:
        images: ``[B, C, H, W]`` uint8 (0..255) or float (``[0, 1]``).
        generator: the only source of randomness (see ``augment_params`` for the draw order).
        crop_padding: pixels of zero padding per side; 0 disables the crop.
        hflip: flip each sample with probability 0.5.

    Returns:
        ``[B, C, H, W]`` float32 in ``[0, 1]`` scale (uint8 input is divided by 255).
    """
    if images.dim() != 4:
        raise ValueError(f"augment_batch: images of shape {list(images.shape)}; expected [B, C, H, W]")
    params = augment_params(images.shape[0], generator, crop_padding, hflip)
    return _to_unit_float(apply_augment(images, params, crop_padding))


def _to_unit_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if not images.is_floating_point():
        raise ValueError(f"expected uint8 or float images; got {images.dtype}")
    return images.to(torch.float32)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel, with ``x`` in ``[0, 1]`` scale, fused as ``x * scale + shift``.

    Args:
        images: ``[B, C, H, W]`` uint8 (read as ``x = images / 255``) or float already in ``[0, 1]``.
        mean: C per-channel means (``[0, 1]`` scale).
        std: C per-channel standard deviations.

    Returns:
        ``[B, C, H, W]`` float32 (a new tensor).
    """
    channels = images.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"normalize: {len(mean)} means, {len(std)} stds for {channels} channels; expected equal")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise ValueError(f"normalize: expected uint8 or float images; got {images.dtype}")
    unit = 255.0 if images.dtype == torch.uint8 else 1.0
    scale = [1.0 / (unit * s) for s in std]
    shift = [-m / s for m, s in zip(mean, std)]
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)  # noqa: E731
    return torch.addcmul(as_tensor(shift), images.to(torch.float32), as_tensor(scale))
