"""Training a backdoored model: the attacker's side of an experiment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tscray.attacks.base import Attack
from tscray.attacks.poison import PoisonedTrain, poison_test, poison_train
from tscray.data import Dataset
from tscray.metrics import Evaluator
from tscray.models import build as build_model
from tscray.optim import OptimConfig
from tscray.train import Progress


@dataclass(frozen=True)
class TrainRecipe:
    """The attacker's training recipe (paper, Appendix L.1: SGD lr 0.01, cosine, batch 256, 100 epochs)."""

    epochs: int = 100
    batch_size: int = 256
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.01))


@dataclass
class Backdoored:
    """A backdoored model with the poisoned training set that made it and its evaluator (whose ASR is
    measured against ``target``, the class the model was poisoned towards)."""

    model: nn.Module
    poisoned: PoisonedTrain
    evaluate: Evaluator

    @property
    def target(self) -> int:
        return self.poisoned.target

    @property
    def rate(self) -> float:
        return self.poisoned.rate


def evaluator(dataset: Dataset, attack: Attack | None, target: int | None = None) -> Evaluator:
    """ACC on the clean test set and, given an attack, ASR on its triggered non-target test images, labelled
    ``target`` (required with an attack: there is no default class to measure ASR against)."""
    if attack is not None and target is None:
        raise ValueError(f"evaluator: attack {attack.name!r} needs the model's target class (e.g. Backdoored.target)")
    triggered = poison_test(dataset.test, attack, target) if attack is not None and target is not None else None
    return Evaluator(dataset.test, dataset.prep, triggered)


def train_backdoored(dataset: Dataset, arch: str, attack: Attack, rate: float, target: int = 0, seed: int = 0,
                     recipe: TrainRecipe = TrainRecipe(), device: torch.device | str = "cpu",
                     arch_kw: dict[str, Any] | None = None, progress: Progress | None = None,
                     channels_last: bool = False) -> Backdoored:
    """Poison ``rate`` of the training set with ``attack`` towards class ``target`` and train ``arch`` on it
    from a seeded init. The result carries ``target`` and ``rate``, and its evaluator measures ASR against it.

    An attack that needs a resource (a surrogate, a generator...) and has none loaded computes it
    first (:meth:`Attack.prepare`); the sweep instead loads it from its own cached step. ``channels_last``
    trains in NHWC (the sweep's ``resources.channels_last``).
    """
    attack.prepare(dataset, rate, target, seed, device)
    poisoned = poison_train(dataset.train, attack, rate, target, seed)
    torch.manual_seed(seed)
    model = build_model(arch, dataset.num_classes, dataset.in_channels, input_hw=dataset.input_hw,
                        **(arch_kw or {})).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs omit memory_format
    attack.train_model(model, poisoned.data, dataset, target, seed, recipe.epochs, recipe.batch_size, recipe.optim,
                       device, progress)
    return Backdoored(model, poisoned, evaluator(dataset, attack, target))
