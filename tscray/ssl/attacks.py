"""Self-supervised backdoor attacks by name, as the sweep uses them: a trigger and a way to backdoor an encoder.

``badencoder`` fine-tunes a clean SimCLR encoder (the sweep's ``ssl_pretrain`` step, shared by every
BadEncoder trial of a seed); ``ctrl`` poisons the pre-training set and pre-trains on it. Both return an
encoder; :class:`tscray.ssl.probe.ProbeEvaluator` measures it downstream with the attack's ``trigger``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from tscray.data import Dataset
from tscray.data.tensors import ImageData, Loader
from tscray.optim import OptimConfig
from tscray.registry import Registry
from tscray.ssl import ctrl as ctrl_mod
from tscray.ssl.badencoder import BadEncoderConfig, PatchTrigger, badencoder, reference_images
from tscray.train import Progress, train

SSL_ATTACKS: Registry = Registry("self-supervised attack")


@dataclass(frozen=True)
class PretrainRecipe:
    """SimCLR pre-training: epochs, batch size, optimiser (Adam by default, as the paper's SSL recipe)."""

    epochs: int = 200
    batch_size: int = 256
    optim: OptimConfig = OptimConfig(name="adam", lr=1e-3, weight_decay=1e-6)


def pretrain(model: nn.Module, data: ImageData, dataset: Dataset, method: Any, recipe: PretrainRecipe, seed: int = 0,
             device: torch.device | str = "cpu", progress: Progress | None = None) -> nn.Module:
    """Pre-train ``model`` in place on ``data`` with the self-supervised ``method`` (labels unused)."""
    loader = Loader(data, dataset.prep, recipe.batch_size, shuffle=True, seed=seed, device=device, drop_last=True)
    return train(model, loader, method, recipe.epochs, recipe.optim, progress)


class SSLAttack:
    """A backdoor attack on a self-supervised encoder."""

    name = "ssl-attack"
    needs_clean_encoder = False

    def trigger(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The test-time trigger on uint8 images."""
        raise NotImplementedError

    def backdoor(self, dataset: Dataset, model: nn.Module, method: Any, recipe: PretrainRecipe, rate: float,
                 target: int, seed: int, device: torch.device | str = "cpu") -> nn.Module:
        """A backdoored encoder: ``model`` is the clean pre-trained encoder (``needs_clean_encoder``) or a
        fresh one to pre-train."""
        raise NotImplementedError


@SSL_ATTACKS.register("badencoder")
class BadEncoderAttack(SSLAttack):
    """BadEncoder on the sweep's clean encoder. ``shadow_ratio`` of the training set (seeded) is the
    attacker's shadow data, ``references`` target-class images are the reference inputs; the patch is
    ``patch`` pixels (the original's 10 on 32 px images). The poison rate does not apply."""

    name = "badencoder"
    needs_clean_encoder = True

    def __init__(self, epochs: int = 200, batch_size: int = 256, lr: float = 1e-3, lambda1: float = 1.0,
                 lambda2: float = 1.0, patch: int = 10, shadow_ratio: float = 0.2, references: int = 1) -> None:
        if not 0 < shadow_ratio <= 1:
            raise ValueError(f"badencoder shadow_ratio must be in (0, 1], got {shadow_ratio}")
        if references < 1:
            raise ValueError(f"badencoder references must be >= 1, got {references}")
        self.cfg = BadEncoderConfig(epochs=epochs, batch_size=batch_size, lr=lr, lambda1=lambda1, lambda2=lambda2)
        self.patch, self.shadow_ratio, self.references = PatchTrigger(patch), shadow_ratio, references

    def trigger(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.patch

    def backdoor(self, dataset: Dataset, model: nn.Module, method: Any, recipe: PretrainRecipe, rate: float,
                 target: int, seed: int, device: torch.device | str = "cpu") -> nn.Module:
        train_set = dataset.train
        gen = torch.Generator().manual_seed(seed)
        k = max(1, round(self.shadow_ratio * len(train_set)))
        shadow = train_set.subset(torch.randperm(len(train_set), generator=gen)[:k].sort().values)
        refs = reference_images(train_set, target, self.references, seed)
        return badencoder(model, shadow, refs, dataset.prep, self.patch, self.cfg, seed)


@SSL_ATTACKS.register("ctrl")
class CTRLAttack(SSLAttack):
    """CTRL: pre-train SimCLR on a set with ``rate`` of it (target-class images) carrying the frequency
    trigger (the paper's rate is 0.5%)."""

    name = "ctrl"

    def __init__(self, magnitude: float = 100.0, window: int = 32) -> None:
        self.trig = ctrl_mod.CTRLTrigger(magnitude=magnitude, window=window)

    def trigger(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.trig

    def backdoor(self, dataset: Dataset, model: nn.Module, method: Any, recipe: PretrainRecipe, rate: float,
                 target: int, seed: int, device: torch.device | str = "cpu") -> nn.Module:
        poisoned, _ = ctrl_mod.poison(dataset.train, target, rate, self.trig, seed)
        return pretrain(model, poisoned, dataset, method, recipe, seed, device)


def build(name: str, **kw: Any) -> SSLAttack:
    """Construct the registered self-supervised attack ``name``."""
    return SSL_ATTACKS.get(name)(**kw)


__all__ = ["SSL_ATTACKS", "BadEncoderAttack", "CTRLAttack", "PretrainRecipe", "SSLAttack", "build", "pretrain"]
