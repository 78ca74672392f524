"""LF, low-frequency trigger (Zeng et al., 2021, "Rethinking the backdoor attacks' triggers: a frequency perspective").

The trigger is a *smooth* universal adversarial perturbation: a perturbation computed against a clean
model that pushes images of any class towards the target, low-pass filtered so that it has no
high-frequency artefacts (which frequency-based detectors spot). It is added to the image; poisoned
training images are relabelled to the target (a label-flipping attack).

Resource computation (BackdoorBench's ``resource/lowFrequency``: ``generate_pattern.py``,
``universal_pert.py``, ``gauss_smooth.py``), our defaults with BackdoorBench's in brackets:

1. A clean surrogate: ``surrogate_arch = "cnn"`` trained for ``surrogate_epochs = 4`` epochs (lr
   ``surrogate_lr = 0.05``, batch ``surrogate_batch = 128``) on the clean training set [BackdoorBench
   loads a fully trained clean model of the victim's architecture].
2. ``n_images = 100`` random training images, any class (seeded) [100].
3. A targeted universal perturbation ``v``: ``steps = 100`` gradient steps on the mean cross-entropy
   towards the target over those images, each step the low-passed gradient scaled to a peak of
   ``step_size = 1`` grey level; after each step ``v`` is low-pass filtered (Gaussian blur, ``sigma = 3``
   pixels) and scaled back into the l-inf ball of radius ``eps = 25.5`` grey levels (0.1)
   [BackdoorBench: sequential targeted DeepFool per image, each update and the sum Gaussian-smoothed
   (σ = 6 px with a 30-tap kernel), then min-max normalised to a 0.2-wide range, up to 50 passes].
4. The trigger: ``clip(x + v)`` rounded to uint8, on train and test images alike.

``pattern = <path.npy>`` uses a precomputed perturbation instead (signed, in grey levels, shape H×W,
H×W×C or C×H×W, resized bilinearly and matched to the images' channels as needed); the attack then needs
no resource (:meth:`LF.resource_params` returns None).

Departures from the original and why:

* Optimiser: batched projected (low-passed, peak-normalised) gradient descent on the universal
  perturbation instead of per-image targeted DeepFool accumulation (same objective: one perturbation
  sending a fixed image set to the target class; vectorised and much cheaper on CPU).
* Filter and bound: the low-pass filter is applied to ``v`` after every step (BackdoorBench: to every
  increment and to the sum) with ``sigma = 3`` px, about half BackdoorBench's 6 px (which assumes 32 px
  images and zero-pads, darkening borders; we reflect-pad); the bound is an l-inf *rescaling* (which keeps
  the perturbation smooth, where clipping would add edges) to ±0.1, the same 0.2 peak-to-peak range as
  BackdoorBench's normalisation but centred on zero.
* Surrogate scale: a few epochs of the small CNN instead of a fully trained victim-architecture model
  (CPU budget).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from tscray.attacks._surrogate import add_pattern, check_positive, freeze, pixel_forward, train_surrogate
from tscray.attacks.base import ATTACKS, Attack
from tscray.data import Dataset
from tscray.train import Progress


def gaussian_blur(v: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian low-pass of (C, H, W) or (N, C, H, W) maps, reflect-padded (replicate if too small)."""
    squeeze = v.dim() == 3
    x = v[None] if squeeze else v
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    mode = "reflect" if radius < min(x.shape[-2:]) else "replicate"
    x = F.pad(x, (radius, radius, radius, radius), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0] if squeeze else x


def load_pattern(path: str | Path, what: str = "lf pattern file") -> torch.Tensor:
    """A user pattern from a .npy file as float32 C×H×W (H×W, H×W×C with C in {1, 3}, and a batch of one,
    1×C×H×W as PyTorch code saves one, accepted)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False).astype(np.float32)
    except (ValueError, OSError) as err:
        raise ValueError(f"{what} {path}: not a readable numeric .npy array ({str(err)[:80]})") from None
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3) and arr.shape[0] not in (1, 3):
        arr = arr.transpose(2, 0, 1)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(f"{what} must be H×W, H×W×C or C×H×W with C in (1, 3), got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr))


@ATTACKS.register("lf")
class LF(Attack):
    name = "lf"

    def __init__(self, pattern: str | None = None, eps: float = 25.5, sigma: float = 3.0, steps: int = 100,
                 step_size: float = 1.0, n_images: int = 100, surrogate_arch: str = "cnn", surrogate_epochs: int = 4,
                 surrogate_lr: float = 0.05, surrogate_batch: int = 128) -> None:
        check_positive("lf", eps=eps, sigma=sigma, step_size=step_size, n_images=n_images, surrogate_lr=surrogate_lr,
                       surrogate_batch=surrogate_batch)
        if steps < 0 or surrogate_epochs < 0:
            raise ValueError(f"lf steps and surrogate_epochs must be >= 0, got {steps}, {surrogate_epochs}")
        self.pattern_path = pattern
        self.eps, self.sigma, self.steps, self.step_size, self.n_images = float(eps), float(sigma), steps, \
            float(step_size), n_images
        self.surrogate_arch, self.surrogate_epochs = surrogate_arch, surrogate_epochs
        self.surrogate_lr, self.surrogate_batch = float(surrogate_lr), surrogate_batch
        self.pattern: torch.Tensor | None = load_pattern(pattern) if pattern is not None else None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern is None:
            raise RuntimeError("lf needs its resource (the low-frequency perturbation): call prepare or load_resource")
        return add_pattern(x, self.pattern)

    def files(self) -> list[Path]:
        return [Path(self.pattern_path)] if self.pattern_path is not None else []

    # ------------------------------------------------------------------ resource
    def resource_params(self, rate: float) -> dict[str, Any] | None:
        if self.pattern_path is not None:
            return None
        return {"eps": self.eps, "sigma": self.sigma, "steps": self.steps, "step_size": self.step_size,
                "n_images": self.n_images, "surrogate_arch": self.surrogate_arch,
                "surrogate_epochs": self.surrogate_epochs, "surrogate_lr": self.surrogate_lr,
                "surrogate_batch": self.surrogate_batch}

    def make_resource(self, dataset: Dataset, rate: float, target: int, seed: int,
                      device: torch.device | str = "cpu", progress: Progress | None = None
                      ) -> dict[str, torch.Tensor]:
        """Train the clean surrogate, then a smooth targeted universal perturbation against it."""
        model = train_surrogate(dataset.train, dataset, self.surrogate_arch, self.surrogate_epochs, self.surrogate_lr,
                                self.surrogate_batch, seed, device, progress)
        forward = pixel_forward(freeze(model), dataset.prep)
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(dataset.train), generator=gen)[:self.n_images]
        x = dataset.train.x[pick].to(device).float()
        labels = torch.full((len(x),), target, dtype=torch.long, device=device)
        v = torch.zeros(x.shape[1:], device=device)
        for _ in range(self.steps):
            v.requires_grad_(True)
            loss = F.cross_entropy(forward((x + v).clamp(0, 255)), labels)
            grad, = torch.autograd.grad(loss, v)
            with torch.no_grad():
                g = gaussian_blur(grad, self.sigma)
                v = gaussian_blur(v - self.step_size * g / g.abs().max().clamp_min(1e-12), self.sigma)
                peak = float(v.abs().max())
                if peak > self.eps:
                    v = v * (self.eps / peak)
        return {"pattern": v.detach().cpu().contiguous()}

    def load_resource(self, tensors: dict[str, torch.Tensor]) -> None:
        p = tensors["pattern"]
        if p.dim() != 3 or not p.is_floating_point():
            raise ValueError(f"lf resource: expected a float C×H×W pattern, got {p.dtype} {tuple(p.shape)}")
        self.pattern = p.float().cpu()

    @property
    def ready(self) -> bool:
        return self.pattern is not None
