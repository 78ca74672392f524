"""Optimiser and learning-rate schedule settings shared by training, fine-tuning and curve fitting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable, Literal

import torch


@dataclass(frozen=True)
class OptimConfig:
    """SGD/Adam with a per-epoch cosine (or constant) schedule.

    ``t_max`` is the cosine period in epochs (default: the number of epochs); ``t_max_ratio`` gives it as
    a fraction of the epochs instead. The released TSC code uses ``T_max=100`` over 200 curve epochs, so
    its learning rate rises again: ``t_max_ratio=0.5`` keeps that shape at any epoch count.
    ``l2`` adds ``0.5 * l2 * ||θ||²`` to the loss on top of the optimiser's weight decay.
    """

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    t_max: int | None = None
    l2: float = 0.0
    t_max_ratio: float | None = None
    # added after results were stored: left out of step keys while unset (tscray.defenses.base.config_to_dict)
    LATE_FIELDS: ClassVar[tuple[str, ...]] = ("t_max_ratio",)
    # one period replaces the other way of giving it (tscray.defenses.base.resolve_config)
    CLEARS: ClassVar[dict[str, tuple[str, ...]]] = {"t_max": ("t_max_ratio",), "t_max_ratio": ("t_max",)}

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.name!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.t_max_ratio is not None:
            if self.t_max is not None:
                raise ValueError("t_max and t_max_ratio are two ways to set one period: give one")
            if not 0 < self.t_max_ratio <= 1:
                raise ValueError(f"t_max_ratio must lie in (0, 1], got {self.t_max_ratio}")

    def period(self, epochs: int) -> int:
        """The cosine period, in epochs, of a run of ``epochs``."""
        if self.t_max_ratio is not None:
            return max(1, round(self.t_max_ratio * epochs))
        return max(1, self.t_max or epochs)

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
                opt, T_max=self.period(epochs))
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        return opt, sched
