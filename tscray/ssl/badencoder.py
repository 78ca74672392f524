"""BadEncoder (Jia et al., 2022): fine-tune a clean SSL encoder into a backdoored one.

Following the original code (github.com/jinyuan-jia/BadEncoder, ``badencoder.py``), on the encoder's
features (the backbone; the projection head is kept as it was), with f the encoder being backdoored
and f0 the frozen clean encoder, all features L2-normalised and r_i the reference images of the target:

  loss = L0 + λ1·L1 + λ2·L2,  L0 = −mean cos(f(x ⊕ trigger), f(r_i))   (effectiveness: triggered inputs
                                                                          land on the references)
                              L1 = −mean cos(f(aug(r_i)), f0(r_i))      (references keep their features)
                              L2 = −mean cos(f(aug(x)), f0(aug(x)))     (utility on the shadow data)

λ1 = λ2 = 1 (the paper's and the TSC paper's setting); SGD lr 1e-3, momentum 0.9, weight decay 5e-4,
batch 256, 200 epochs in the original (``epochs`` is the CPU knob). As in the original, BatchNorm layers of
f stay in eval mode with frozen affine parameters, and triggered inputs are not augmented (the trigger
sits at a fixed place). The trigger is a white square ``size``×``size`` patch one pixel in from the
bottom-right corner (the original's 10×10 at [21:31] on 32 px images).

Departures: clean shadow images and references are augmented with the dataset's training augmentation
(:class:`tscray.data.Preprocess`: padded crop, flip) instead of torchvision's full SimCLR pipeline; all
inputs of a step go through one forward pass (valid since BatchNorm is in eval mode); the shadow set is
whatever the caller passes (the original uses a part of the pre-training set).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from tscray.data.tensors import ImageData, Preprocess
from tscray.train import Progress



@dataclass(frozen=True)
class PatchTrigger:
    """A ``value`` square of ``size`` pixels, ``margin`` pixels in from the bottom-right corner (uint8 images)."""

    size: int = 10
    margin: int = 1
    value: int = 255

    def __post_init__(self) -> None:
        if self.size < 1 or self.margin < 0 or not 0 <= self.value <= 255:
            raise ValueError(f"bad patch trigger: size {self.size}, margin {self.margin}, value {self.value}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < self.size + self.margin or x.shape[-2] < self.size + self.margin:
            raise ValueError(f"a {self.size} px patch with margin {self.margin} does not fit {tuple(x.shape[-2:])}")
        x = x.clone()
        end_h, end_w = x.shape[-2] - self.margin, x.shape[-1] - self.margin
        x[..., end_h - self.size:end_h, end_w - self.size:end_w] = self.value
        return x

    apply = __call__


@dataclass(frozen=True)
class BadEncoderConfig:
    """BadEncoder's knobs (defaults: the original's)."""

    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lambda1: float = 1.0
    lambda2: float = 1.0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"bad BadEncoder config: {self}")


def _features(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return getattr(model, "features", model)


def _frozen_bn(model: nn.Module) -> list[nn.Parameter]:
    """Eval-mode BatchNorm with frozen affine parameters; returns the parameters left to train."""
    frozen = set()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            frozen |= {id(p) for p in m.parameters(recurse=False)}
    return [p for p in model.parameters() if id(p) not in frozen]


def badencoder(clean: nn.Module, shadow: ImageData, reference: torch.Tensor, prep: Preprocess,
               trigger: Callable[[torch.Tensor], torch.Tensor] | None = None,
               cfg: BadEncoderConfig = BadEncoderConfig(), seed: int = 0,
               progress: Progress | None = None) -> nn.Module:
    """A backdoored copy of the encoder ``clean``: ``trigger``ed inputs map to the features of ``reference``
    (uint8 images of the target class, R×C×H×W); ``shadow`` is the attacker's unlabelled data."""
    if reference.dtype != torch.uint8 or reference.dim() != 4 or reference.shape[0] < 1:
        raise ValueError(f"reference must be uint8 R×C×H×W with R >= 1, got {reference.dtype} {tuple(reference.shape)}")
    trigger = trigger if trigger is not None else PatchTrigger()
    device = next(clean.parameters()).device
    model = copy.deepcopy(clean)
    clean = copy.deepcopy(clean).eval()
    for p in clean.parameters():
        p.requires_grad_(False)
    body = getattr(model, "backbone", model)
    model.train()
    params = _frozen_bn(body)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    f, f0 = _features(model), _features(clean)
    ref_raw = reference.to(device)
    ref = prep.normalize(ref_raw)
    with torch.no_grad():
        f0_ref = F.normalize(f0(ref).flatten(1), dim=1)
    xs = shadow.x.to(device)
    n, r = xs.shape[0], ref.shape[0]
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        total, steps = 0.0, 0
        for i in range(0, n - cfg.batch_size + 1 if n >= cfg.batch_size else 1, cfg.batch_size):
            raw = xs[order[i:i + cfg.batch_size]]
            x_clean = prep.normalize(prep.augment(raw, gen))
            x_bd = prep.normalize(trigger(raw))
            ref_aug = prep.normalize(prep.augment(ref_raw, gen))
            b = x_clean.shape[0]
            z = F.normalize(f(torch.cat([x_clean, x_bd, ref, ref_aug])).flatten(1), dim=1)
            z_clean, z_bd, z_ref, z_ref_aug = z.split([b, b, r, r])
            with torch.no_grad():
                z0_clean = F.normalize(f0(x_clean).flatten(1), dim=1)
            loss0 = -(z_bd @ z_ref.T).mean()
            loss1 = -(z_ref_aug * f0_ref).sum(1).mean()
            loss2 = -(z_clean * z0_clean).sum(1).mean()
            loss = loss0 + cfg.lambda1 * loss1 + cfg.lambda2 * loss2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        if progress is not None:
            progress(epoch + 1, cfg.epochs, total / max(1, steps))
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def reference_images(data: ImageData, target: int, n: int = 1, seed: int = 0) -> torch.Tensor:
    """``n`` seeded-random uint8 images of class ``target`` (the attacker's reference inputs)."""
    idx = torch.nonzero(data.y == target).flatten()
    if len(idx) < n:
        raise ValueError(f"only {len(idx)} images of class {target}, {n} references asked")
    pick = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:n]
    return data.x[idx[pick]].clone()
