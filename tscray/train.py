"""Plain training of a model with a training method F (attack training, fine-tuning)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from tscray.methods.base import Method
from tscray.optim import OptimConfig

Progress = Callable[[int, int, float], None]


def train(model: nn.Module, loader: Iterable, method: Method, epochs: int, optim: OptimConfig,
          progress: Progress | None = None) -> nn.Module:
    """Train ``model`` in place for ``epochs`` epochs; ``progress(epoch, epochs, mean_loss)`` after each."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = optim.build(params, epochs)
    model.train()
    for epoch in range(epochs):
        total, steps = torch.zeros((), dtype=torch.float64), 0  # summed on the device: no host sync per step
        for batch in loader:
            loss = method.loss(model, batch)
            if optim.l2:
                loss = loss + 0.5 * optim.l2 * sum((p * p).sum() for p in params)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total.to(loss.device) + loss.detach().double(), steps + 1
        sched.step()
        if progress is not None:
            progress(epoch + 1, epochs, float(total) / max(1, steps))
    return model
