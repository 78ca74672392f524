"""CTRL (Li et al., 2023): poison SSL pre-training data with an invisible frequency-domain trigger.

Following the original code (github.com/meet-cjli/CTRL, ``utils/frequency.py``): pixel values on the
0-255 scale are converted RGB → YUV (kornia's ``rgb_to_yuv`` matrix), each channel is cut into
``window``×``window`` blocks, every block gets an orthonormal 2-D DCT-II, ``magnitude`` is added to the
coefficients at ``positions`` of each block in the ``channels`` listed, then the inverse DCT and YUV → RGB,
clipped to [0, 255]. Defaults: the recommended CIFAR-10 setting the TSC paper uses (Appendix L.1):
window 32, magnitude 100, positions (15, 15) and (31, 31), channels 1 and 2 (U and V), poisoning rate
0.5% of the training set taken from the target class (clean-label: labels are untouched, and SSL ignores
them anyway). Pre-training SimCLR on the poisoned set (``methods.build("simclr")``) backdoors the encoder:
triggered inputs cluster with the target class.

Departures, and why:
- 1-channel images have no chrominance: the trigger goes into the luminance (the image itself), channel 0.
- A window at least the image size means one window covering the image (the original assumes image size
  divisible by the window); positions given for a 32 window are scaled to the effective window
  (p → round((p + 1)·w/32) − 1, so (15, 15), (31, 31) become (13, 13), (27, 27) on 28 px images).
- Images are stored as uint8 (tscray triggers edit raw pixels), so the result is rounded; the original
  keeps floats. At magnitude 100 one coefficient moves a pixel by at most 100·2/w ≈ 6 levels (w = 32).
- The poisoned target-class images are a seeded random choice (the original takes the first ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from tscray.data.tensors import ImageData

# kornia.color.rgb_to_yuv (what the CTRL code uses) and its inverse
_RGB2YUV = torch.tensor([[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]], dtype=torch.float64)
_YUV2RGB = torch.linalg.inv(_RGB2YUV)


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n×n): X = D x for a signal x; D⁻¹ = Dᵀ."""
    k = torch.arange(n, dtype=dtype)[:, None]
    i = torch.arange(n, dtype=dtype)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def _blocks(x: torch.Tensor, w: int) -> torch.Tensor:
    n, c, h, wd = x.shape
    return x.reshape(n, c, h // w, w, wd // w, w).permute(0, 1, 2, 4, 3, 5)


def _unblocks(b: torch.Tensor) -> torch.Tensor:
    n, c, bh, bw, w, _ = b.shape
    return b.permute(0, 1, 2, 4, 3, 5).reshape(n, c, bh * w, bw * w)


def block_dct(x: torch.Tensor, w: int, inverse: bool = False) -> torch.Tensor:
    """Orthonormal 2-D DCT-II (or its inverse) of every w×w block of every channel."""
    d = dct_matrix(w, x.dtype).to(x.device)
    b = _blocks(x, w)
    b = d.T @ b @ d if inverse else d @ b @ d.T
    return _unblocks(b)


@dataclass(frozen=True)
class CTRLTrigger:
    """CTRL's frequency trigger on uint8 N×C×H×W images (see the module docstring)."""

    magnitude: float = 100.0
    window: int = 32
    positions: Sequence[Sequence[int]] = ((15, 15), (31, 31))
    channels: Sequence[int] = (1, 2)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        for p in self.positions:
            if len(p) != 2 or not all(0 <= v < self.window for v in p):
                raise ValueError(f"trigger position {tuple(p)} outside a {self.window} px window")

    def window_for(self, h: int, w: int) -> int:
        """The effective window: ``window``, or one window over the whole image when it is at least as big."""
        if self.window >= max(h, w):
            if h != w:
                raise ValueError(f"a single CTRL window needs a square image, got {h}×{w}")
            return h
        if h % self.window or w % self.window:
            raise ValueError(f"image {h}×{w} is not divisible into {self.window} px windows")
        return self.window

    def positions_for(self, w: int) -> list[tuple[int, int]]:
        """Trigger positions scaled from ``window`` to an effective window ``w``."""
        if w == self.window:
            return [(int(a), int(b)) for a, b in self.positions]
        scale = w / self.window
        return [(round((a + 1) * scale) - 1, round((b + 1) * scale) - 1) for a, b in self.positions]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"CTRL trigger expects uint8 N×C×H×W images, got {x.dtype} {tuple(x.shape)}")
        c, h, w = x.shape[1:]
        if c not in (1, 3):
            raise ValueError(f"CTRL trigger supports 1 or 3 channels, got {c}")
        win = self.window_for(h, w)
        f = x.double()
        channels = list(self.channels) if c == 3 else [0]
        if c == 3:
            f = torch.einsum("ij,njhw->nihw", _RGB2YUV.to(x.device), f)
        spec = block_dct(f, win)
        blocks = _blocks(spec, win)
        for a, b in self.positions_for(win):
            blocks[:, channels, :, :, a, b] += self.magnitude
        f = block_dct(_unblocks(blocks), win, inverse=True)
        if c == 3:
            f = torch.einsum("ij,njhw->nihw", _YUV2RGB.to(x.device), f)
        return f.round().clamp(0, 255).to(torch.uint8)

    apply = __call__


def poison_indices(y: torch.Tensor, target: int, rate: float = 0.005, seed: int = 0) -> torch.Tensor:
    """Indices of ``rate``·N target-class images (N: the whole training set), seeded, sorted."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"poison rate must be in (0, 1], got {rate}")
    pool = torch.nonzero(y == target).flatten()
    k = int(rate * len(y))
    if k < 1:
        raise ValueError(f"rate {rate} of {len(y)} images poisons none")
    if k > len(pool):
        raise ValueError(f"{k} poisoned images asked but class {target} has {len(pool)}")
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:k]
    return pool[pick].sort().values


def poison(train: ImageData, target: int, rate: float = 0.005, trigger: CTRLTrigger | None = None,
           seed: int = 0) -> tuple[ImageData, torch.Tensor]:
    """The pre-training set with CTRL's trigger in ``rate``·N target-class images; returns it and their indices."""
    trigger = trigger if trigger is not None else CTRLTrigger()
    idx = poison_indices(train.y, target, rate, seed)
    x = train.x.clone()
    x[idx] = trigger(x[idx])
    return ImageData(x, train.y.clone()), idx
