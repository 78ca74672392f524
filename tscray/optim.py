"""Optimiser and learning-rate schedule settings shared by training, fine-tuning and curve fitting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch


@dataclass(frozen=True)
class OptimConfig:
    """SGD/Adam with a per-epoch cosine (or constant) schedule.

    ``t_max`` is the cosine period in epochs (default: the number of epochs). The released TSC
    code uses ``t_max=100`` over 200 curve epochs, so its learning rate rises again.
    ``l2`` adds ``0.5 * l2 * ||θ||²`` to the loss on top of the optimiser's weight decay.
    """

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    t_max: int | None = None
    l2: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.name!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")

    def build(self, params: Iterable[torch.Tensor], epochs: int
              ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimiser and its per-epoch scheduler."""
        params = list(params)
        if self.name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                                         weight_decay=self.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.schedule == "cosine":
            sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=max(1, self.t_max or epochs))
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        return opt, sched
