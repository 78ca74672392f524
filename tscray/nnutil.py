"""Small helpers over modules and loader batches, shared by every stage."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def batch_inputs(batch: object) -> torch.Tensor:
    """The input tensor of a loader batch: ``x`` or the first item of ``(x, y, ...)``."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch  # type: ignore[return-value]


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode and restore each module's training flag afterwards."""
    flags = [[m.training for m in model.modules()] for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, fl in zip(models, flags):
            for m, f in zip(model.modules(), fl):
                m.train(f)
