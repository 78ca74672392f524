"""Backdoor attacks, one module each, in one registry.

An attack edits raw uint8 images (triggers go in before augmentation) and decides which
training images to poison; :mod:`tscray.attacks.poison` builds the poisoned views from it.
"""

from __future__ import annotations

from tscray.attacks.base import ATTACKS, Attack
from tscray.attacks import badnets, blended, sig, wanet  # noqa: F401  (registration)
from tscray.attacks.poison import PoisonedTrain, poison_test, poison_train
from tscray.attacks.train import Backdoored, TrainRecipe, evaluator, train_backdoored


def build(name: str, **kw: object) -> Attack:
    """Construct the registered attack ``name`` with its parameters."""
    return ATTACKS.get(name)(**kw)


__all__ = ["ATTACKS", "Attack", "Backdoored", "PoisonedTrain", "TrainRecipe", "build", "evaluator", "poison_test",
           "poison_train", "train_backdoored"]
