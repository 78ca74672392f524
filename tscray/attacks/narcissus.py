"""Narcissus (Zeng et al., 2023): a clean-label attack with a universal trigger optimised towards the target.

The attacker optimises one additive, l-inf bounded trigger so that a surrogate model classifies
*target-class* images carrying it as the target with high confidence (it minimises the target-class
loss): the trigger becomes the most "target-like" feature there is. Adding it to some target-class
training images (labels untouched) makes the victim learn it; at test time the trigger, magnified,
sends non-target images to the target class.

Algorithm (the authors' ``narcissus_function.py``), with our defaults and the original's in brackets:

1. Surrogate: a model trained on public out-of-distribution (POOD) data plus the target-class images
   (ResNet-18 on Tiny-ImageNet + the target class as a 201st class, 200 epochs) [here
   ``surrogate_arch = "cnn"``, ``surrogate_epochs = 4``, ``surrogate_lr = 0.05``, ``surrogate_batch =
   128``; see the POOD departure below].
2. Poison warm-up: fine-tune it on the target-class images alone for ``warmup_epochs = 2`` [5] with
   RAdam, ``warmup_lr = 0.1`` [0.1] (BN in training mode, as the original).
3. Trigger: starting from zero, Adam (``trigger_lr``; the original: RAdam) on the trigger to minimise
   the cross-entropy of the warmed-up model on augmented target-class images carrying it (clipped to the
   valid range), the trigger clamped to ``eps`` after each step; ``trigger_epochs = 20`` [1000] passes over the target
   class with ``trigger_batch = 128`` [350]. ``eps = 16`` grey levels (16/255) [16/255];
   ``trigger_lr = 1.0`` grey level [0.01 in the original's [-1, 1] normalised units = 1.275 grey levels].
4. Poison: ``clip(x + trigger)`` on target-class training images; test-time: ``clip(x + magnify ·
   trigger)`` with ``magnify = 3`` [``multi_test = 3``].

``trigger_file = <path.npy>`` skips steps 1-3 and uses a given trigger, such as the authors' released
CIFAR-10 one (``checkpoint/resnet18_trigger.npy`` of reds-lab/Narcissus, target class 2), which the TSC paper
uses: 1×3×32×32 in the authors' Normalize(0.5, 0.5) units, turned into grey levels by ``trigger_scale =
127.5`` (give 1 for an array already in grey levels); a trigger larger than ``eps`` is refused as a unit error.

The resource is the trigger (``trigger``: float32 C×H×W in grey levels), independent of the rate.
Poisoning rate: a share of the whole training set drawn among the target-class images (a rate beyond their
number is an error), as SIG and LC. Narcissus itself needs very few poisons (0.05% of CIFAR-10); the rate is the
sweep's.

Departures from the original and why:

* No POOD data offline. The stand-in POOD set is the non-target classes of the training set (with their
  own labels), and the surrogate is trained on them together with the target class: a standard clean
  classifier of the whole training set. This gives the attacker in-distribution data of the other
  classes, which Narcissus does not assume (it only needs the target class and unrelated public data);
  the trigger is optimised with target-class images only, as in the original.
* Scale: far fewer surrogate, warm-up and trigger epochs (CPU budget; documented defaults above, every
  one a constructor kwarg); the trigger step is in grey levels on raw pixels (the original's Adam step
  in normalised units, converted).
* Trigger optimiser: Adam instead of RAdam. After the warm-up the surrogate already calls target
  images the target, so trigger gradients are tiny; RAdam's rectified first steps then barely move the
  trigger within our few hundred steps (the original runs ~15k), where Adam's normalised steps do.
* Trigger mode: the surrogate is attacked in eval mode (the original leaves BN in training mode, so its
  running statistics drift during trigger optimisation; eval mode keeps the resource a pure function
  of the surrogate).
* uint8: poisoned images are rounded to integers (the original stores floats).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from tscray.attacks._surrogate import add_pattern, check_positive, freeze, pixel_forward, train_surrogate
from tscray.attacks.base import ATTACKS, Attack, Split
from tscray.data import Dataset
from tscray.data.tensors import Loader
from tscray.train import Progress


@ATTACKS.register("narcissus")
class Narcissus(Attack):
    name = "narcissus"
    clean_label = True

    def __init__(self, eps: float = 16.0, magnify: float = 3.0, trigger_epochs: int = 20, trigger_lr: float = 1.0,
                 trigger_batch: int = 128, warmup_epochs: int = 2, warmup_lr: float = 0.1,
                 surrogate_arch: str = "cnn", surrogate_epochs: int = 4, surrogate_lr: float = 0.05,
                 surrogate_batch: int = 128, trigger_file: str | None = None, trigger_scale: float = 127.5) -> None:
        check_positive("narcissus", eps=eps, magnify=magnify, trigger_lr=trigger_lr, trigger_batch=trigger_batch,
                       warmup_lr=warmup_lr, surrogate_lr=surrogate_lr, surrogate_batch=surrogate_batch,
                       trigger_scale=trigger_scale)
        for name, v in (("trigger_epochs", trigger_epochs), ("warmup_epochs", warmup_epochs),
                        ("surrogate_epochs", surrogate_epochs)):
            if v < 0:
                raise ValueError(f"narcissus {name} must be >= 0, got {v}")
        self.eps, self.magnify = float(eps), float(magnify)
        self.trigger_epochs, self.trigger_lr, self.trigger_batch = trigger_epochs, float(trigger_lr), trigger_batch
        self.warmup_epochs, self.warmup_lr = warmup_epochs, float(warmup_lr)
        self.surrogate_arch, self.surrogate_epochs = surrogate_arch, surrogate_epochs
        self.surrogate_lr, self.surrogate_batch = float(surrogate_lr), surrogate_batch
        self.trigger_file, self.trigger_scale = trigger_file, float(trigger_scale)
        self.trigger: torch.Tensor | None = self._released(trigger_file) if trigger_file is not None else None

    def _released(self, path: str) -> torch.Tensor:
        """A trigger from a .npy file (the authors' released ``checkpoint/resnet18_trigger.npy``: 1×3×32×32 in
        their Normalize(0.5, 0.5) units, ×127.5 to grey levels), checked against ``eps`` so that a file in
        other units (grey levels already: ``trigger_scale=1``) is refused rather than applied 127× too strong."""
        from tscray.attacks.lf import load_pattern

        t = load_pattern(path, "narcissus trigger_file") * self.trigger_scale
        peak = float(t.abs().max()) if t.numel() else 0.0
        if peak > self.eps * 1.01 + 0.5:
            raise ValueError(f"narcissus trigger_file {path}: ×{self.trigger_scale:g} it reaches {peak:.1f} grey "
                             f"levels, above eps {self.eps:g}; give trigger_scale for its units (127.5 for the "
                             "authors' [-1, 1] normalisation, 1 for grey levels) or raise eps")
        return t

    # ------------------------------------------------------------------ trigger
    def _need(self) -> torch.Tensor:
        if self.trigger is None:
            raise RuntimeError("narcissus needs its resource (the optimised trigger): call prepare or load_resource")
        return self.trigger

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger: ``magnify`` times the optimised trigger, added and clipped."""
        return add_pattern(x, self._need(), self.magnify)

    def poison(self, x: torch.Tensor, idx: torch.Tensor, split: Split) -> torch.Tensor:
        """Training images get the trigger at its optimised (l-inf ``eps``) strength, test images the magnified one."""
        return add_pattern(x, self._need()) if split == "train" else self.apply(x)

    # ------------------------------------------------------------------ resource
    def files(self) -> list[Path]:
        return [Path(self.trigger_file)] if self.trigger_file is not None else []

    def resource_params(self, rate: float) -> dict[str, Any] | None:
        if self.trigger_file is not None:
            return None  # the released trigger: nothing to compute
        return {"eps": self.eps, "trigger_epochs": self.trigger_epochs, "trigger_lr": self.trigger_lr,
                "trigger_batch": self.trigger_batch, "warmup_epochs": self.warmup_epochs,
                "warmup_lr": self.warmup_lr, "surrogate_arch": self.surrogate_arch,
                "surrogate_epochs": self.surrogate_epochs, "surrogate_lr": self.surrogate_lr,
                "surrogate_batch": self.surrogate_batch}

    def make_resource(self, dataset: Dataset, rate: float, target: int, seed: int,
                      device: torch.device | str = "cpu", progress: Progress | None = None
                      ) -> dict[str, torch.Tensor]:
        """Surrogate (POOD stand-in + target class), warm-up on the target class, then the trigger."""
        model = train_surrogate(dataset.train, dataset, self.surrogate_arch, self.surrogate_epochs, self.surrogate_lr,
                                self.surrogate_batch, seed, device, progress)
        target_set = dataset.train.subset(torch.nonzero(dataset.train.y == target).flatten())
        model = self._warm_up(copy.deepcopy(model), target_set, dataset, seed, device)
        forward = pixel_forward(freeze(model), dataset.prep)

        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        trigger = torch.zeros(dataset.in_channels, *dataset.train.x.shape[-2:], device=device, requires_grad=True)
        opt = torch.optim.Adam([trigger], lr=self.trigger_lr)
        x_all, n = target_set.x.to(device), len(target_set)
        labels = torch.full((n,), target, dtype=torch.long, device=device)
        for _ in range(self.trigger_epochs):
            order = torch.randperm(n, generator=gen).to(device)
            for i in range(0, n, self.trigger_batch):
                idx = order[i:i + self.trigger_batch]
                xb = dataset.prep.augment(x_all[idx], gen).float()
                loss = F.cross_entropy(forward((xb + trigger).clamp(0, 255)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    trigger.clamp_(-self.eps, self.eps)
        return {"trigger": trigger.detach().cpu().contiguous()}

    def _warm_up(self, model: torch.nn.Module, target_set, dataset: Dataset, seed: int,
                 device: torch.device | str) -> torch.nn.Module:
        """Fine-tune on the target-class images only (RAdam, BN in training mode), as the original's warm-up."""
        if self.warmup_epochs == 0:
            return model
        loader = Loader(target_set, dataset.prep, self.trigger_batch, shuffle=True, augment=True, seed=seed,
                        device=device)
        opt = torch.optim.RAdam(model.parameters(), lr=self.warmup_lr)
        model.train()
        for _ in range(self.warmup_epochs):
            for xb, yb in loader:
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return model

    def load_resource(self, tensors: dict[str, torch.Tensor]) -> None:
        t = tensors["trigger"]
        if t.dim() != 3 or not t.is_floating_point():
            raise ValueError(f"narcissus resource: expected a float C×H×W trigger, got {t.dtype} {tuple(t.shape)}")
        self.trigger = t.float().cpu()

    @property
    def ready(self) -> bool:
        return self.trigger is not None
