"""SimCLR (Chen et al., 2020) as a training method F: two augmented views, NT-Xent on the projection.

The batch is a loader batch of normalised images (labels ignored). Both views are drawn inside
``loss`` on the batch's device with batched tensor ops and the method's own seeded generator (a fresh
method with the same seed replays the same views for the same batches):
- random resized crop (area ``crop_scale``, aspect ratio 3/4-4/3, bilinear, one affine grid per image),
- horizontal flip (p 0.5),
- colour jitter (p 0.8; brightness 0.4, contrast 0.4, and on 3-channel images saturation 0.4) and, on
  3-channel images, random grayscale (p 0.2).
NT-Xent with temperature τ = 0.5 (the TSC code's SimCLR setting) over the 2N projections of one forward
pass; each view's positive is the other view of its image, the other 2N − 2 are negatives.

Parameters and departures: SimCLR's CIFAR recipe crops area (0.08, 1); the default here is (0.2, 1),
kinder to 28 px grayscale images (configurable). Hue jitter (0.1) is left out: it needs an HSV round
trip per image and does nothing on 1-channel data. Jitter works in pixel space when ``mean``/``std`` of
the dataset's normalisation are given (then clamped to [0, 1] like torchvision's); without them it acts
directly on the normalised values (no clamp).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.nn import functional as F

from tscray.methods.base import METHODS, Forward


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised-temperature cross-entropy over the 2N views (z1[i] and z2[i] are positives)."""
    if z1.shape != z2.shape:
        raise ValueError(f"view projections differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(n, generator=gen)).to(device)


def resized_crop(x: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """Random resized crop (and horizontal flip) of every image, output at the input size."""
    n, dev = x.shape[0], x.device
    area = _uniform(n, scale[0], scale[1], gen, dev)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen, dev)
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (1 - w) * _uniform(n, -1.0, 1.0, gen, dev)
    cy = (1 - h) * _uniform(n, -1.0, 1.0, gen, dev)
    sx = w * (torch.where(torch.rand(n, generator=gen).to(dev) < 0.5, -1.0, 1.0) if flip else 1.0)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).expand_as(x)


def color_jitter(x: torch.Tensor, gen: torch.Generator, strength: float = 0.4, p: float = 0.8,
                 gray_p: float = 0.2, clamp: bool = True) -> torch.Tensor:
    """Brightness, contrast (and saturation, grayscale on RGB) per image, in a random order of the three."""
    n, dev = x.shape[0], x.device
    on = (torch.rand(n, generator=gen) < p).to(dev).view(n, 1, 1, 1)
    lo, hi = max(0.0, 1 - strength), 1 + strength
    b = _uniform(n, lo, hi, gen, dev).view(n, 1, 1, 1)
    c = _uniform(n, lo, hi, gen, dev).view(n, 1, 1, 1)
    s = _uniform(n, lo, hi, gen, dev).view(n, 1, 1, 1)
    order = torch.randperm(3, generator=gen).tolist()
    y = x
    for op in order:
        if op == 0:
            y = y * b
        elif op == 1:
            y = (y - _gray(y).mean((1, 2, 3), keepdim=True)) * c + _gray(y).mean((1, 2, 3), keepdim=True)
        elif x.shape[1] == 3:
            g = _gray(y)
            y = (y - g) * s + g
        if clamp:
            y = y.clamp(0.0, 1.0)
    y = torch.where(on, y, x)
    if x.shape[1] == 3:
        gray = (torch.rand(n, generator=gen) < gray_p).to(dev).view(n, 1, 1, 1)
        y = torch.where(gray, _gray(y), y)
    return y


@METHODS.register("simclr")
class SimCLR:
    """SimCLR's NT-Xent on two on-device augmented views of each batch image (see module docstring)."""

    name = "simclr"

    def __init__(self, temperature: float = 0.5, crop_scale: Sequence[float] = (0.2, 1.0), flip: bool = True,
                 jitter: float = 0.4, jitter_p: float = 0.8, gray_p: float = 0.2,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, seed: int = 0) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {crop_scale}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (the dataset's normalisation) or neither")
        self.temperature, self.crop_scale, self.flip = temperature, (float(crop_scale[0]), float(crop_scale[1])), flip
        self.jitter, self.jitter_p, self.gray_p = jitter, jitter_p, gray_p
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.gen = torch.Generator().manual_seed(seed)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """One random augmented view of a batch of normalised images."""
        x = resized_crop(x, self.gen, self.crop_scale, flip=self.flip)
        if self.jitter <= 0 or self.jitter_p <= 0:
            return x
        if self.mean is None:
            return color_jitter(x, self.gen, self.jitter, self.jitter_p, self.gray_p, clamp=False)
        m = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (color_jitter(x * s + m, self.gen, self.jitter, self.jitter_p, self.gray_p) - m) / s

    def loss(self, forward: Forward, batch: tuple[torch.Tensor, ...] | torch.Tensor) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if x.shape[0] < 2:
            raise ValueError("SimCLR needs at least two images per batch (negatives)")
        z = forward(torch.cat([self.view(x), self.view(x)]))
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.temperature)
