"""Batched augmentation on the batch's own device: random crop + horizontal flip, normalisation.

The seed paper's augmentation is torchvision's ``RandomCrop(32, padding=4)`` followed by
``RandomHorizontalFlip()``, applied per image on the CPU. Here the whole batch is done in one
gather on whatever device it lives on (no Python loop over images), so a training loop that
keeps the data set on the GPU never sends images back to the host.

To match torchvision's pipeline (crop and flip, then ``ToTensor``, then ``Normalize``), crop the
uint8 (or [0, 1] float) batch first and normalise afterwards: the padding is then black, as
torchvision's, rather than the mean colour it would be after normalisation::

    x = normalize(random_crop_flip(images_uint8, generator=g), dataset.mean, dataset.std)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["random_crop_flip", "random_crop_flip_params", "crop_flip", "normalize"]


def random_crop_flip_params(
    n: int,
    *,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random draws of :func:`random_crop_flip` for ``n`` images: (top, left, flipped).

    ``top`` and ``left`` are int64 offsets into the padded image, uniform in [0, 2·padding];
    ``flipped`` is bool, True with probability 1/2 (all False when ``flip`` is False). They are
    drawn on the generator's device (``device``, default CPU, when ``generator`` is None) in
    this order: one ``randint`` of shape (2, n) for top and left, then one of shape (n,) for
    the flips, and returned on ``device`` (default: where they were drawn).
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    draw_device = generator.device if generator is not None else torch.device(device or "cpu")
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=draw_device)
    if flip:
        flipped = torch.randint(0, 2, (n,), generator=generator, device=draw_device).bool()
    else:
        flipped = torch.zeros(n, dtype=torch.bool, device=draw_device)
    top, left = offsets[0], offsets[1]
    if device is not None:
        device = torch.device(device)
        top, left, flipped = top.to(device), left.to(device), flipped.to(device)
    return top, left, flipped


def crop_flip(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    flipped: torch.Tensor,
    *,
    padding: int = 4,
) -> torch.Tensor:
    """Crop each image of a zero-padded batch at given offsets, mirroring the flagged ones.

    Args:
        images: N×C×H×W, any dtype (uint8 or float), on any device.
        top, left: N integer offsets in [0, 2·padding] into the padded (H+2p)×(W+2p) image
            (checked when they are on the CPU; moved to the images' device).
        flipped: N bools; image i is mirrored left-right after its crop.
        padding: p, the zeros added on every side before cropping (default 4).

    Returns:
        N×C×H×W, same dtype and device: out[i, :, y, x] = padded[i, :, top_i + y, left_i + x']
        with x' = W−1−x when flipped, else x; pixels from the padding are 0.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be N×C×H×W, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    for name, t in (("top", top), ("left", left), ("flipped", flipped)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if top.is_floating_point() or left.is_floating_point():
        raise TypeError(f"top and left must be integer tensors, got {top.dtype} and {left.dtype}")
    # Checked only on the CPU: on a GPU the check would synchronise every batch, and the offsets
    # from random_crop_flip_params are in range by construction.
    if top.device.type == "cpu" and left.device.type == "cpu":
        if bool(((top < 0) | (top > 2 * padding) | (left < 0) | (left > 2 * padding)).any()):
            raise ValueError(f"top and left must be in [0, {2 * padding}] for padding={padding}")
    device = images.device
    top, left, flipped = top.to(device), left.to(device), flipped.to(device, torch.bool)
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    wp = w + 2 * padding
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    rows = top[:, None] + ys  # N×H
    # A flip of the crop reads the crop's columns right to left: fold it into the column index.
    cols = left[:, None] + torch.where(flipped[:, None], w - 1 - xs, xs)  # N×W
    flat_index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w)
    out = torch.gather(padded.reshape(n, c, -1), 2, flat_index.expand(n, c, h * w))
    return out.reshape(n, c, h, w)


def random_crop_flip(
    images: torch.Tensor,
    *,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop with zero padding, then a random horizontal flip, for a whole batch at once.

    Same distribution as torchvision's ``RandomCrop(H, padding=padding)`` followed by
    ``RandomHorizontalFlip(0.5)``, per image, on the device the batch is on.

    Args:
        images: N×C×H×W, uint8 or float (crop before :func:`normalize` to get black padding).
        padding: zeros added on each side before cropping back to H×W (default 4; 0: no crop).
        flip: mirror each image with probability 1/2 (default True).
        generator: a ``torch.Generator`` for reproducible draws; for no host-device copy, make it
            on the images' device. Default: the global generator of the images' device.

    Returns:
        N×C×H×W, same dtype and device. The draws are those of :func:`random_crop_flip_params`
        with the same generator, so ``crop_flip(images, *params, padding=padding)`` reproduces it.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be N×C×H×W, got shape {tuple(images.shape)}")
    # Without a generator, draw on the images' device (its default generator); with one, draw
    # where the generator lives, so a seeded CPU generator gives the same numbers for any batch.
    params = random_crop_flip_params(
        images.shape[0],
        padding=padding,
        flip=flip,
        generator=generator,
        device=images.device if generator is None else None,
    )
    return crop_flip(images, *params, padding=padding)


def normalize(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(images / 255 − mean) / std per channel, as ``dtype`` (default float32).

    Args:
        images: uint8 N×C×H×W (or C×H×W), values 0..255, on any device.
        mean, std: C floats each, of the images scaled to [0, 1] (``Dataset.mean``/``.std``).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images (0..255), got {images.dtype}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating type, got {dtype}")
    channels = images.shape[-3] if images.dim() >= 3 else -1
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)}"
        )
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    # x·scale + shift with scale = 1/(255·std), shift = −mean/std: one fused op on the batch.
    # The constants are made in float64 and rounded once to dtype.
    mean_t = torch.tensor(mean, dtype=torch.float64)
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std_t)).to(dtype=dtype, device=images.device)[:, None, None]
    shift = (-mean_t / std_t).to(dtype=dtype, device=images.device)[:, None, None]
    return torch.addcmul(shift, images.to(dtype), scale)
