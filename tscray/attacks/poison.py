"""Poisoned views of a dataset: the poisoned training set and the triggered test set."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tscray.attacks.base import Attack
from tscray.data.tensors import ImageData


@dataclass
class PoisonedTrain:
    """The poisoned training set and which indices were poisoned.

    ``data`` holds the training set (poisoned at ``poison_idx``) followed by any extra images the
    attack trains on (:meth:`Attack.extra_training`, e.g. WaNet's noise-mode images), so it can be
    longer than the clean set; ``poison_idx`` indexes its first ``len(train)`` images. ``target`` and
    ``rate`` travel with it, so the triggered test set and the ASR cannot be measured against another class.
    """

    data: ImageData
    poison_idx: torch.Tensor
    target: int
    rate: float


def _check_ready(attack: Attack) -> None:
    if not attack.ready:
        raise RuntimeError(f"attack {attack.name!r} needs its resource: call attack.prepare(...) or "
                           "attack.load_resource(...) first")


def poison_train(train: ImageData, attack: Attack, rate: float, target: int, seed: int = 0) -> PoisonedTrain:
    """Apply ``attack`` to a seeded ``rate`` of the training images (deterministic from the seed).

    Images the attack adds (:meth:`Attack.extra_training`) are appended after the training set.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"poison rate must be in [0, 1], got {rate}")
    _check_ready(attack)
    gen = torch.Generator().manual_seed(seed)
    idx = attack.select(train.y, rate, target, gen)
    x, y = train.x.clone(), train.y.clone()
    if len(idx):
        x[idx] = attack.poison(x[idx], idx, "train")
        if not attack.clean_label:
            y[idx] = target
    extra = attack.extra_training(train, idx, rate, target, gen)
    if extra is not None and len(extra):
        x, y = torch.cat([x, extra.x]), torch.cat([y, extra.y])
    return PoisonedTrain(ImageData(x, y), idx, target, rate)


def poison_test(test: ImageData, attack: Attack, target: int) -> ImageData:
    """Triggered test images whose true label is not the target, labelled with the target (no default
    target: it must be the backdoored model's, e.g. ``Backdoored.target``)."""
    _check_ready(attack)
    keep = torch.nonzero(test.y != target).flatten()
    x = attack.poison(test.x[keep], keep, "test")
    return ImageData(x, torch.full((len(keep),), target, dtype=torch.long))
