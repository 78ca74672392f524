"""BadNets (Gu et al., 2017): a small white square in the bottom-right corner.

As in BackdoorBench: a 3×3 patch of maximal intensity at the bottom-right, applied to the raw
image before augmentation; poisoned images are relabelled to the target.
"""

from __future__ import annotations

import torch

from tscray.attacks.base import ATTACKS, Attack


@ATTACKS.register("badnets")
class BadNets(Attack):
    name = "badnets"

    def __init__(self, size: int = 3, value: int = 255) -> None:
        if size < 1:
            raise ValueError(f"badnets trigger size must be >= 1, got {size}")
        self.size, self.value = size, value

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[..., -self.size:, -self.size:] = self.value
        return x
