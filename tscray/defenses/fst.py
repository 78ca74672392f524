"""FST, Feature Shift Tuning (Min, Qin, Shen & Cheng, NeurIPS 2023, "Towards Stable Backdoor Purification
through Feature Shift Tuning"): re-initialise the classifier head and fine-tune the whole model while
pushing the head away from its original (compromised) direction at a fixed norm.

Sources: the paper (Algorithm 1 and its experimental setup) and the authors' code,
AISafety-HKUST/stable_backdoor_purification ``fine_tune/ft.py`` with ``--ft_mode fst`` (the README's
command). BackdoorBench has no FST.

Per step: ``loss = F(model, batch) + alpha · <w, w_orig>`` (the cross-entropy of the training method plus
the plain sum of the elementwise product of the head's weight with its original weight, as the official
code), an optimiser step on every parameter, then the head's weight is rescaled to the original weight's
Frobenius norm (the paper's constraint ``||w|| = C``). The head (weight and bias) is first re-initialised
as the official code does, uniformly in ±1/sqrt(fan_in). The head is
:func:`tscray.defenses.layers.classifier` (the output Linear; for VGG-19-BN the last of its three).

Defaults: the paper's CIFAR-10 setting (Section 5 / Appendix): SGD lr 0.01, momentum 0.9, no weight decay
(the official ``optim.SGD(params, lr, momentum=0.9)``), cosine annealing over the epochs, 10 epochs,
batch 128 (the script's default), alpha 0.2. Preset ``released``: alpha 0.1, the value in the README's
example command; otherwise the same.

Departures: the re-initialised weight is rescaled to the original norm at once (the official code
projects only after the first step; the paper's constraint holds from the start here). The paper tunes
on 2% of the training set; here the defender's clean set is whatever ``clean`` holds (the TSC paper's
5%). The re-initialisation draws from a generator seeded with ``cfg.seed``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from tscray.defenses import layers
from tscray.defenses.base import DEFENSES, CleanData, Defense, DefenseResult, Evaluate, Log
from tscray.methods.base import Method
from tscray.optim import OptimConfig


@dataclass(frozen=True)
class FSTConfig:
    """FST settings; defaults are the paper's CIFAR-10 ones (see module docstring)."""

    alpha: float = 0.2
    epochs: int = 10
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.01, momentum=0.9, weight_decay=0.0))
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def preset(cls, name: str = "paper") -> "FSTConfig":
        """``paper``: alpha 0.2 (the paper's CIFAR-10 value); ``released``: alpha 0.1 (the README command)."""
        if name == "paper":
            return cls()
        if name == "released":
            return cls(alpha=0.1)
        raise ValueError(f"unknown FST preset {name!r}; known: paper, released")


# --- the math ------------------------------------------------------------------------------------------


def shift_penalty(weight: torch.Tensor, original: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha · <w, w_orig>``: minimising it turns the head away from the original direction."""
    return alpha * (weight * original).sum()


@torch.no_grad()
def project_norm(weight: torch.Tensor, norm: float) -> None:
    """Rescale ``weight`` in place to Frobenius norm ``norm`` (the constraint ``||w|| = C``)."""
    weight.mul_(norm / weight.norm().clamp_min(1e-12))


@torch.no_grad()
def reinit_head(head: nn.Linear, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """Re-initialise the head as the official code (weight and bias uniform in ±1/sqrt(fan_in)), rescale
    the weight to its original norm, and return the original weight and that norm."""
    original = head.weight.detach().clone()
    norm = float(original.norm())
    bound = 1.0 / math.sqrt(head.in_features)
    w = (torch.rand(head.weight.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    head.weight.copy_(w.to(head.weight.dtype))
    if head.bias is not None:
        b = (torch.rand(head.bias.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        head.bias.copy_(b.to(head.bias.dtype))
    project_norm(head.weight, norm)
    return original, norm


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two weight tensors, flattened."""
    return float(torch.nn.functional.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0))


# --- the defense ---------------------------------------------------------------------------------------


def tune(model: nn.Module, head_name: str, original: torch.Tensor, norm: float, clean: CleanData,
         method: Method, cfg: FSTConfig, log: Log | None = None) -> nn.Module:
    """Fine-tune ``model`` in place with the shift penalty on the head, projecting the head's weight
    back to ``norm`` after every step."""
    device = next(model.parameters()).device
    head = model.get_submodule(head_name)
    assert isinstance(head, nn.Linear)
    original = original.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = cfg.optim.build(params, cfg.epochs)
    loader = clean.loader(cfg.batch_size, cfg.seed)
    model.train()
    for epoch in range(cfg.epochs):
        total, steps = 0.0, 0
        for x, y in loader:
            batch = (x.to(device), y.to(device))
            loss = method.loss(model, batch) + shift_penalty(head.weight, original, cfg.alpha)
            if cfg.optim.l2:
                loss = loss + 0.5 * cfg.optim.l2 * sum((p * p).sum() for p in params)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            project_norm(head.weight, norm)
            total, steps = total + float(loss.detach()), steps + 1
        sched.step()
        if log:
            log(f"fst: epoch {epoch + 1}/{cfg.epochs} loss {total / max(1, steps):.4f} "
                f"cos(w, w_orig) {cosine(head.weight, original):.3f}")
    return model


def run(model: nn.Module, clean: CleanData, method: Method, cfg: FSTConfig,
        evaluate: Evaluate | None = None, log: Log | None = None) -> DefenseResult:
    """Re-initialise a copy's head at the original norm and tune it with the feature-shift penalty."""
    tuned = copy.deepcopy(model)
    head = layers.classifier(tuned)
    original, norm = reinit_head(head.module, torch.Generator().manual_seed(cfg.seed))
    tune(tuned, head.name, original, norm, clean, method, cfg, log)
    extra = {"fst_head_cos": cosine(head.module.weight, original)}
    records = [{"defense": "fst", "round": 1, "stage": "final", **(evaluate(tuned) if evaluate else {}), **extra}]
    if log:
        log(f"fst: {records[-1]}")
    return DefenseResult(tuned, [tuned], records)


def check_model(model: nn.Module) -> None:
    """FST needs a Linear classifier head to re-initialise."""
    layers.classifier(model)


DEFENSES.register("fst")(Defense("fst", FSTConfig, run, columns={"fst_head_cos": "float"}, check_model=check_model,
                                 summary="feature shift tuning: re-initialised head pushed off its original direction"))
