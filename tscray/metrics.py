"""ACC and ASR, BackdoorBench's protocol.

ACC: accuracy on the full clean test set. ASR: share of triggered test images whose true label
is not the target that the model classifies as the target (see ``attacks.poison_test``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from tscray.data.tensors import ImageData, Loader, Preprocess
from tscray.nnutil import eval_mode


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, data: ImageData, prep: Preprocess,
                      batch_size: int = 512) -> tuple[float, float]:
    """(accuracy in %, mean cross-entropy) of ``model`` on ``data`` in eval mode."""
    device = next(model.parameters()).device
    correct, loss, n = 0, 0.0, 0
    with eval_mode(model):
        for x, y in Loader(data, prep, batch_size, device=device):
            out = model(x)
            correct += int((out.argmax(1) == y).sum())
            loss += float(F.cross_entropy(out.float(), y, reduction="sum"))
            n += len(y)
    if n == 0:
        raise ValueError("cannot evaluate on an empty set")
    return 100.0 * correct / n, loss / n


@dataclass
class Evaluator:
    """Evaluates a classifier's ACC on clean test data and, when given, ASR on triggered test data."""

    clean: ImageData
    prep: Preprocess
    poisoned: ImageData | None = None
    batch_size: int = 512

    def __call__(self, model: nn.Module) -> dict[str, float]:
        acc, clean_loss = accuracy_and_loss(model, self.clean, self.prep, self.batch_size)
        out = {"acc": acc, "clean_loss": clean_loss}
        if self.poisoned is not None:
            asr, poison_loss = accuracy_and_loss(model, self.poisoned, self.prep, self.batch_size)
            out |= {"asr": asr, "poison_loss": poison_loss}
        return out
