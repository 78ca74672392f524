"""The training-method interface."""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from tscray.registry import Registry

Forward = Callable[[torch.Tensor], torch.Tensor]


class Method(Protocol):
    """A training method F (cross-entropy, SimCLR, image-text contrastive, ...)."""

    name: str

    def loss(self, forward: Forward, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The training loss of ``forward`` on one batch."""
        ...


METHODS: Registry = Registry("training method")
