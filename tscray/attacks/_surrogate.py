"""Private helpers of the surrogate-based attacks (LC, Narcissus, LF).

A *surrogate* is a small classifier the attacker trains itself (seeded, plain cross-entropy with the
dataset's augmentation), standing in for the pre-trained models the original attacks download. The
attacks then optimise perturbations against it in pixel space: images are floats on the 0-255 scale,
normalised exactly as the dataset's :class:`~tscray.data.tensors.Preprocess` does before the forward
pass, so gradients are taken with respect to raw pixels and bounds are in grey levels.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from tscray.data import Dataset
from tscray.data.tensors import ImageData, Loader, Preprocess
from tscray.optim import OptimConfig
from tscray.train import Progress

Forward = Callable[[torch.Tensor], torch.Tensor]


def check_positive(attack: str, **values: float) -> None:
    """Raise a clear ValueError for any value that is not > 0."""
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{attack} {name} must be > 0, got {v}")


def train_surrogate(data: ImageData, dataset: Dataset, arch: str, epochs: int, lr: float, batch_size: int,
                    seed: int, device: torch.device | str = "cpu", progress: Progress | None = None) -> nn.Module:
    """A clean classifier trained on ``data`` from a seeded init (SGD, cosine, augmentation), in eval mode."""
    from tscray.methods.supervised import Supervised
    from tscray.models import build as build_model
    from tscray.train import train as train_loop

    torch.manual_seed(seed)
    model = build_model(arch, dataset.num_classes, dataset.in_channels).to(device)
    loader = Loader(data, dataset.prep, batch_size, shuffle=True, augment=True, seed=seed, device=device)
    train_loop(model, loader, Supervised(), epochs, OptimConfig(lr=lr), progress)
    return model.eval()


def pixel_forward(model: nn.Module, prep: Preprocess) -> Forward:
    """``model`` as a function of float images on the 0-255 scale (differentiable normalisation)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(prep.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(prep.std, device=x.device).view(1, -1, 1, 1)
        return model((x / 255.0 - mean) / std)
    return forward


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients: the model is only attacked from here on."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Round float 0-255 images to uint8."""
    return x.round().clamp_(0, 255).to(torch.uint8)


def pgd(forward: Forward, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int,
        batch_size: int = 256) -> torch.Tensor:
    """Untargeted l-inf PGD (no random start): maximise the loss on the true labels ``y``.

    ``x`` is uint8; ``eps`` and ``step`` are in grey levels. Returns uint8 images within ``eps`` of ``x``
    (the rounded result stays in the ball because ``x`` is integral).
    """
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].float(), y[i:i + batch_size]
        adv = xb.clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(forward(adv), yb)
            grad, = torch.autograd.grad(loss, adv)
            adv = adv.detach() + step * grad.sign()
            adv = (xb + (adv - xb).clamp(-eps, eps)).clamp(0, 255)
        out.append(to_uint8(adv.detach()))
    return torch.cat(out) if out else x.clone()


def fit_pattern(pattern: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """An additive (C, H, W) float pattern resized (bilinear) to the image size and matched to its channels.

    A one-channel pattern is repeated over the channels; a three-channel one is reduced to luminance for
    one-channel images (ITU-R 601-2, as PIL's ``convert("L")``).
    """
    p = pattern.float()
    if p.shape[0] != channels:
        if p.shape[0] == 1:
            p = p.expand(channels, -1, -1)
        elif p.shape[0] == 3 and channels == 1:
            p = (p * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        else:
            raise ValueError(f"a {p.shape[0]}-channel pattern cannot be applied to {channels}-channel images")
    if p.shape[-2:] != (height, width):
        p = F.interpolate(p[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return p.contiguous()


def add_pattern(x: torch.Tensor, pattern: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``clip(x + scale * pattern)`` rounded to uint8, the pattern fitted to the images (a copy)."""
    p = fit_pattern(pattern, x.shape[1], x.shape[2], x.shape[3]).to(x.device)
    return to_uint8(x.float() + scale * p)


def lookup(index: torch.Tensor, idx: torch.Tensor, what: str) -> torch.Tensor:
    """Positions of ``idx`` in the sorted ``index``; a ValueError names any index the resource lacks."""
    idx = torch.as_tensor(idx, dtype=torch.long).cpu()
    if len(index) == 0:
        pos, missing = torch.zeros_like(idx), idx
    else:
        pos = torch.searchsorted(index, idx).clamp_(max=len(index) - 1)
        missing = idx[index[pos] != idx]
    if len(missing):
        raise ValueError(f"training images {missing[:5].tolist()} are not among the {what} the resource holds")
    return pos
