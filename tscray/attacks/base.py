"""What every attack provides: a trigger on raw images and a choice of images to poison."""

from __future__ import annotations

import torch

from tscray.registry import Registry


class Attack:
    """An all-to-one data-poisoning attack.

    ``clean_label`` attacks poison only target-class images and relabel nothing; the others
    poison non-target images and relabel them to the target.
    """

    name: str = "attack"
    clean_label: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copies of uint8 images (N×C×H×W)."""
        raise NotImplementedError

    def select(self, y: torch.Tensor, rate: float, target: int, gen: torch.Generator) -> torch.Tensor:
        """Indices of training images to poison: ``rate`` of the whole set, drawn among eligible images."""
        eligible = torch.nonzero(y == target if self.clean_label else y != target).flatten()
        k = min(len(eligible), round(rate * len(y)))
        return eligible[torch.randperm(len(eligible), generator=gen)[:k]].sort().values


ATTACKS: Registry = Registry("attack")
