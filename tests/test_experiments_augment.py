"""isample.experiments.augment: batched crop + flip against a per-image loop, and normalize."""

from __future__ import annotations

import time

import pytest
import torch

from isample.experiments.augment import (
    crop_flip,
    normalize,
    random_crop_flip,
    random_crop_flip_params,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_crop_flip(images, top, left, flipped, padding):
    """One image at a time: a zero canvas, the image pasted at (p, p), a slice, a mirror."""
    n, c, h, w = images.shape
    out = torch.empty_like(images)
    for i in range(n):
        canvas = images.new_zeros(c, h + 2 * padding, w + 2 * padding)
        canvas[:, padding : padding + h, padding : padding + w] = images[i]
        y0, x0 = int(top[i]), int(left[i])
        crop = canvas[:, y0 : y0 + h, x0 : x0 + w]
        out[i] = crop.flip(-1) if bool(flipped[i]) else crop
    return out


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n=16, c=3, h=32, w=32, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 256, (n, c, h, w), generator=g, dtype=torch.uint8)  # no zeros inside
    return (x.to(dtype) / 255 if dtype.is_floating_point else x.to(dtype)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_padding_zero_without_flip_is_the_identity(device, dtype):
    x = batch(dtype=dtype, device=device)
    y = random_crop_flip(x, padding=0, flip=False, generator=torch.Generator().manual_seed(1))
    assert y.dtype == dtype and y.device == x.device and torch.equal(y, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", [1, 4])
def test_matches_a_per_image_loop_for_the_same_offsets(device, padding):
    x = batch(n=24, h=32, w=32, device=device)
    top, left, flipped = random_crop_flip_params(24, padding=padding, generator=seeded(7))
    # the draws cover the corners and both flip states, so every branch is compared
    assert flipped.any() and not flipped.all() and (top == 0).any() and (left == 2 * padding).any()
    expected = reference_crop_flip(x, top, left, flipped, padding)
    assert torch.equal(crop_flip(x, top, left, flipped, padding=padding), expected)
    assert torch.equal(random_crop_flip(x, padding=padding, generator=seeded(7)), expected)


def test_non_square_images_and_one_channel():
    x = batch(n=9, c=1, h=28, w=20)
    top, left, flipped = random_crop_flip_params(9, padding=3, generator=seeded(2))
    expected = reference_crop_flip(x, top, left, flipped, 3)
    assert torch.equal(crop_flip(x, top, left, flipped, padding=3), expected)


def test_same_as_torchvision_random_crop_then_flip():
    tf = pytest.importorskip("torchvision.transforms.functional")
    x = batch(n=12)
    top, left, flipped = random_crop_flip_params(12, padding=4, generator=seeded(3))
    out = crop_flip(x, top, left, flipped, padding=4)
    for i in range(12):
        # RandomCrop(32, padding=4) pads with zeros, then crops at (top, left) of the padded image
        want = tf.crop(tf.pad(x[i], [4]), int(top[i]), int(left[i]), 32, 32)
        if flipped[i]:
            want = tf.hflip(want)
        assert torch.equal(out[i], want)


def test_flips_are_exact_mirrors():
    x = batch(n=64)
    y = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(5))
    mirrored = [torch.equal(y[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(y[i], x[i]) for i in range(64)]
    assert all(m != k for m, k in zip(mirrored, kept))  # each image is exactly one of the two
    assert 16 < sum(mirrored) < 48


def test_outside_the_image_is_zero():
    x = torch.ones(32, 3, 8, 8)
    top, left, flipped = random_crop_flip_params(32, padding=4, generator=seeded(11))
    y = crop_flip(x, top, left, flipped, padding=4)
    ys = top[:, None] + torch.arange(8) - 4  # source row of each output row, in image coordinates
    xs = left[:, None] + torch.arange(8) - 4
    inside = ((ys >= 0) & (ys < 8))[:, :, None] & ((xs >= 0) & (xs < 8))[:, None, :]
    inside = torch.where(flipped[:, None, None], inside.flip(-1), inside)
    assert torch.equal(y, inside[:, None].expand(-1, 3, -1, -1).float())
    assert (y == 0).any() and (y == 1).any()


def test_offsets_and_flips_are_uniform():
    top, left, flipped = random_crop_flip_params(9000, padding=4, generator=seeded(0))
    for offsets in (top, left):
        counts = torch.bincount(offsets, minlength=9)
        assert counts.numel() == 9 and counts.min() > 850 and counts.max() < 1150  # 1000 ± 4.7 sd
    assert 0.48 < flipped.float().mean().item() < 0.52  # 0.5 ± 3.8 sd


def test_reproducible_with_a_seeded_generator():
    x = batch(n=32)
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(42))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(42))
    c = random_crop_flip(x, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(8)
    d = random_crop_flip(x)
    torch.manual_seed(8)
    assert torch.equal(d, random_crop_flip(x))


def test_bad_arguments():
    x = batch(n=4)
    with pytest.raises(ValueError, match="N×C×H×W"):
        random_crop_flip(x[0])
    with pytest.raises(ValueError, match="padding must be >= 0"):
        random_crop_flip(x, padding=-1)
    zeros = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"top and left must be in \[0, 8\]"):
        crop_flip(x, zeros, torch.tensor([0, 9, 0, 0]), zeros.bool(), padding=4)
    with pytest.raises(ValueError, match=r"top must have shape \(4,\)"):
        crop_flip(x, zeros[:3], zeros, zeros.bool())
    with pytest.raises(TypeError, match="integer tensors"):
        crop_flip(x, zeros.float(), zeros, zeros.bool())


def test_batch_of_512_is_fast_on_cpu():
    x = batch(n=512)
    g = torch.Generator().manual_seed(0)
    random_crop_flip(x, generator=g)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        random_crop_flip(x, generator=g)
        best = min(best, time.perf_counter() - start)
    assert best < 0.25, f"{best:.3f} s for 512 CIFAR-sized images"


@pytest.mark.parametrize("device", DEVICES)
def test_normalize_matches_float64_reference(device):
    x = batch(n=8, dtype=torch.uint8, device=device)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    y = normalize(x, mean, std)
    assert y.dtype == torch.float32 and y.device == x.device and y.shape == x.shape
    m = torch.tensor(mean, dtype=torch.float64, device=device)[:, None, None]
    s = torch.tensor(std, dtype=torch.float64, device=device)[:, None, None]
    want = (x.double() / 255 - m) / s
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-5)
    assert normalize(x, mean, std, dtype=torch.float64).dtype == torch.float64


def test_normalize_rejects_bad_input():
    x = batch(n=2, dtype=torch.uint8)
    with pytest.raises(TypeError, match="expects uint8"):
        normalize(x.float(), (0.5,) * 3, (0.2,) * 3)
    with pytest.raises(ValueError, match=r"one value per channel \(3\)"):
        normalize(x, (0.5,), (0.2,))
    with pytest.raises(ValueError, match="std must be positive"):
        normalize(x, (0.5,) * 3, (0.2, 0.0, 0.2))
