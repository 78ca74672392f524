"""Images held as tensors, their preprocessing, and a device-resident batch loader.

Datasets are kept as uint8 ``(N, C, H, W)`` tensors: attacks edit raw pixels (triggers are
applied before augmentation), and the loader augments and normalises whole batches on the
device, so a GPU is never starved by per-image Python transforms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


@dataclass
class ImageData:
    """Images (uint8, N×C×H×W) with integer labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"images must be uint8 N×C×H×W, got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"{self.x.shape[0]} images but labels of shape {tuple(self.y.shape)}")
        self.y = self.y.long()

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, idx: torch.Tensor | Sequence[int]) -> "ImageData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageData(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class Preprocess:
    """Normalisation and training augmentation of one dataset (BackdoorBench-style)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    hflip: bool = False

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images → normalised float32."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random crop with zero padding and optional horizontal flip, per image, on whole batches."""
        n, _, h, w = x.shape
        if self.crop_padding:
            p = self.crop_padding
            xp = torch.nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = xp[torch.arange(n, device=x.device)[:, None, None, None], chan, rows, cols]
        if self.hflip:
            flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x


class Loader:
    """Re-iterable batches of (normalised images, labels) kept resident on one device.

    Each iteration is one epoch: a fresh shuffle and fresh augmentation drawn from the loader's
    own generator, so a loader built with the same seed replays the same epochs.
    """

    def __init__(self, data: ImageData, prep: Preprocess, batch_size: int = 128, shuffle: bool = False,
                 augment: bool = False, seed: int = 0, device: torch.device | str = "cpu",
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.x = data.x.to(self.device)
        self.y = data.y.to(self.device)
        self.prep, self.batch_size, self.shuffle, self.augment = prep, batch_size, shuffle, augment
        self.drop_last = drop_last
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.x.shape[0]
        order = torch.randperm(n, generator=self.gen).to(self.device) if self.shuffle else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            idx = order[sl] if order is not None else None
            x = self.x[idx] if idx is not None else self.x[sl]
            y = self.y[idx] if idx is not None else self.y[sl]
            if self.augment:
                x = self.prep.augment(x, self.gen)
            yield self.prep.normalize(x), y
