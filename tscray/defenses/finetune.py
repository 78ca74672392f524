"""Fine-tuning on the clean set: a baseline defense, and the brief step between TSC rounds."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from tscray.defenses.base import DEFENSES, CleanData, Defense, DefenseResult, Evaluate, Log
from tscray.methods.base import Method
from tscray.optim import OptimConfig
from tscray.train import train


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning recipe (defaults: SGD lr 0.01, cosine, 100 epochs, as the paper's FT baselines)."""

    epochs: int = 100
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.01))
    batch_size: int = 256
    seed: int = 0

    @classmethod
    def preset(cls, name: str = "paper") -> "FinetuneConfig":
        """``paper``/``released``: SGD lr 0.01. ``ssl``: the training method's own optimiser family for
        encoders, Adam lr 1e-4 wd 1e-6 (the paper gives no SSL fine-tuning baseline recipe: our choice, a
        tenth of the SimCLR pre-training lr)."""
        if name in ("paper", "released"):
            return cls()
        if name == "ssl":
            return cls(optim=OptimConfig(name="adam", lr=1e-4, weight_decay=1e-6))
        raise ValueError(f"unknown preset {name!r}; known: paper, released, ssl")


def finetune_model(model: nn.Module, clean: CleanData, method: Method, epochs: int, optim: OptimConfig,
                   batch_size: int, seed: int) -> nn.Module:
    """A fine-tuned copy of ``model``."""
    tuned = copy.deepcopy(model)
    return train(tuned, clean.loader(batch_size, seed), method, epochs, optim)


def run(model: nn.Module, clean: CleanData, method: Method, cfg: FinetuneConfig,
        evaluate: Evaluate | None = None, log: Log | None = None) -> DefenseResult:
    """Fine-tune a copy of the model on the clean set."""
    tuned = finetune_model(model, clean, method, cfg.epochs, cfg.optim, cfg.batch_size, cfg.seed)
    records = [{"defense": "finetune", "round": 1, "stage": "final", **(evaluate(tuned) if evaluate else {})}]
    if log:
        log(f"finetune: {records[-1]}")
    return DefenseResult(tuned, [tuned], records)


DEFENSES.register("finetune")(Defense("finetune", FinetuneConfig, run, methods=("supervised", "simclr"),
                                             summary="fine-tuning on the clean set"))
