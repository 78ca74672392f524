"""WaNet (Nguyen & Tran, 2021): an imperceptible warp of the whole image as the trigger.

The trigger is one fixed, smooth random flow field. A ``k×k×2`` field of uniform noise in [-1, 1],
normalised to mean absolute value 1 (``ins = rand(1,2,k,k)*2-1; ins = ins / mean(|ins|)``), is upsampled
to the image size (bicubic, ``align_corners=True``); the sampling grid is the identity grid plus
``s * noise / H``, times ``grid_rescale``, clamped to [-1, 1], and images are resampled with
``grid_sample(align_corners=True)`` (bilinear). Poisoned images are relabelled to the target.

Noise mode (the paper's "cross" images): besides the poisoned images, WaNet trains on
``cross_ratio × #poisoned`` images warped with the trigger grid plus independent per-pixel noise
(``grid + (rand(N,H,W,2)*2-1)/H``, clamped) that keep their true labels, so the network learns the
*exact* warp and not any warp. :meth:`WaNet.extra_training` returns them and
:func:`tscray.attacks.poison.poison_train` appends them to the training set.

Parameters (BackdoorBench's ``wanet`` defaults, which are the WaNet paper's for CIFAR-10/GTSRB; the
paper uses BackdoorBench):

* ``k = 4``: control-grid size of the flow field;
* ``s = 0.5``: warping strength;
* ``grid_rescale = 1``;
* ``cross_ratio = 2``: noise-mode images per poisoned image;
* ``seed = 0``: seeds the flow field (BackdoorBench draws it from the global RNG; a parameter makes the
  trigger reproducible and the same on train and test sets). The same ``k×k`` field is used at every
  image size.

Departures from the original and why:

* Static poisoning. WaNet (and BackdoorBench) poison on the fly: in every batch the first
  ``rate × batch`` images are warped and relabelled and the next ``cross_ratio ×`` that many are warped
  with fresh noise, so over training every image is sometimes poisoned, sometimes a cross image, and the
  noise is redrawn each time. Our pipeline poisons the raw uint8 training set once, before augmentation,
  like the other attacks (so trained models and results are cached by content and every attack shares
  the loader); hence a fixed ``rate`` of the images is poisoned, and the cross images are a fixed,
  pre-drawn set of ``cross_ratio × #poisoned`` other (non-poisoned, seeded) images with one noise draw
  each, *appended* as extra training images (in the original they replace clean images in the batch; the
  clean originals stay here). So the counts per epoch match the original's, but not the shares: the set
  grows by the cross images, and at ``rate`` r the poisoned share is r / (1 + cross_ratio·r) (8.3% poisoned
  and 16.7% cross at r 0.1, cross_ratio 2, against 10 and 20%).
* uint8 images: the warp is computed in float and rounded back to uint8 (warping is done on raw pixels
  before normalisation; normalisation is per-channel affine, so it commutes with the bilinear
  resampling, which stays inside the image because the grid is clamped). Rounding costs at most half a
  grey level; the warp moves pixels by ~0.25 pixel on average at ``s = 0.5``, so the trigger is mostly
  kept, but a model could see a slightly weaker signal than in float.
* Non-square images (not used by the paper): the x displacement is divided by W and the y displacement
  by H (the original divides both by the height of its square images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tscray.attacks.base import ATTACKS, Attack
from tscray.data.tensors import ImageData

CHUNK = 256  # images warped at once (bounds the float copies for 224×224 images)


@ATTACKS.register("wanet")
class WaNet(Attack):
    name = "wanet"

    def __init__(self, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0, cross_ratio: float = 2.0,
                 seed: int = 0) -> None:
        if k < 1:
            raise ValueError(f"wanet k must be >= 1, got {k}")
        if s <= 0:
            raise ValueError(f"wanet s must be > 0, got {s}")
        if cross_ratio < 0:
            raise ValueError(f"wanet cross_ratio must be >= 0, got {cross_ratio}")
        self.k, self.s, self.grid_rescale, self.cross_ratio, self.seed = k, float(s), float(grid_rescale), \
            float(cross_ratio), seed
        gen = torch.Generator().manual_seed(seed)
        ins = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
        self.ins = ins / torch.mean(torch.abs(ins))  # the size-independent k×k flow field
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The trigger's sampling grid for one image size: (1, H, W, 2), x then y, in [-1, 1]."""
        key = (height, width)
        if key not in self._grids:
            noise = F.interpolate(self.ins, size=(height, width), mode="bicubic", align_corners=True)
            noise = noise.permute(0, 2, 3, 1)  # (1, H, W, 2)
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
            identity = torch.stack((xs, ys), dim=2)[None]
            scale = torch.tensor([width, height], dtype=torch.float32)
            grid = (identity + self.s * noise / scale) * self.grid_rescale
            self._grids[key] = grid.clamp(-1, 1)
        return self._grids[key]

    @staticmethod
    def _warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        out = F.grid_sample(x.float(), grid.expand(len(x), -1, -1, -1) if grid.shape[0] == 1 else grid,
                            mode="bilinear", padding_mode="zeros", align_corners=True)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid(x.shape[-2], x.shape[-1]).to(x.device)
        if not len(x):
            return x.clone()
        return torch.cat([self._warp(x[i:i + CHUNK], grid) for i in range(0, len(x), CHUNK)])

    def cross(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Noise-mode copies: warped with the trigger grid plus fresh per-pixel noise drawn from ``gen``."""
        h, w = x.shape[-2], x.shape[-1]
        grid = self.grid(h, w)
        scale = torch.tensor([w, h], dtype=torch.float32)
        out = []
        for i in range(0, len(x), CHUNK):
            part = x[i:i + CHUNK]
            noise = (torch.rand(len(part), h, w, 2, generator=gen) * 2 - 1) / scale
            out.append(self._warp(part, (grid + noise).clamp(-1, 1).to(x.device)))
        return torch.cat(out) if out else x.clone()

    def extra_training(self, train: ImageData, poison_idx: torch.Tensor, rate: float, target: int,
                       gen: torch.Generator) -> ImageData | None:
        """``cross_ratio × len(poison_idx)`` non-poisoned images (seeded), noise-warped, true labels.

        Capped at the number of non-poisoned images (only reached for rates above 1/(1 + cross_ratio)).
        """
        n = round(self.cross_ratio * len(poison_idx))
        if n == 0:
            return None
        free = torch.ones(len(train), dtype=torch.bool)
        free[poison_idx] = False
        candidates = torch.nonzero(free).flatten()
        chosen = candidates[torch.randperm(len(candidates), generator=gen)[:n]].sort().values
        return ImageData(self.cross(train.x[chosen], gen), train.y[chosen].clone())
