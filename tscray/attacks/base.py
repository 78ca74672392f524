"""What every attack provides: a trigger on raw images and a choice of images to poison."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tscray.registry import Registry

if TYPE_CHECKING:
    from tscray.data.tensors import ImageData


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

    def extra_training(self, train: ImageData, poison_idx: torch.Tensor, rate: float, target: int,
                       gen: torch.Generator) -> ImageData | None:
        """Extra images, with their labels, appended to the poisoned training set (none by default).

        ``train`` is the clean training set, ``poison_idx`` the indices chosen by :meth:`select`, and
        ``gen`` the poisoning generator (already advanced by :meth:`select`), so extras are seeded too.
        Attacks that train on more than the poisoned images (WaNet's noise mode) override this.
        """
        return None


ATTACKS: Registry = Registry("attack")
