"""Backdoor attacks, one module each, in one registry.

An attack edits raw uint8 images (triggers go in before augmentation) and decides which
training images to poison; :mod:`tscray.attacks.poison` builds the poisoned views from it.
Every module of this package registers itself on import, so adding an attack is one file.
"""

from __future__ import annotations

import importlib
import pkgutil

from tscray.attacks.base import ATTACKS, Attack
from tscray.attacks.poison import PoisonedTrain, poison_test, poison_train
from tscray.attacks.train import Backdoored, TrainRecipe, evaluator, train_backdoored

_INFRA = {"base", "poison", "train"}
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _INFRA and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")


def build(name: str, **kw: object) -> Attack:
    """Construct the registered attack ``name`` with its parameters."""
    return ATTACKS.get(name)(**kw)


__all__ = ["ATTACKS", "Attack", "Backdoored", "PoisonedTrain", "TrainRecipe", "build", "evaluator", "poison_test",
           "poison_train", "train_backdoored"]
