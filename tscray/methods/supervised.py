"""Supervised cross-entropy training (the paper's F for classifiers)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from tscray.methods.base import METHODS, Forward


@METHODS.register("supervised")
class Supervised:
    """Cross-entropy on (images, labels) batches, optional label smoothing."""

    name = "supervised"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def loss(self, forward: Forward, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return F.cross_entropy(forward(x), y, label_smoothing=self.label_smoothing)
