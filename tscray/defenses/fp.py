"""Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): prune the feature units that clean data leaves
dormant, then fine-tune on the clean set.

Sources: the paper ("Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks"),
BackdoorBench's ``defense/fp.py`` and ``config/defense/fp/cifar10.yaml`` (the defaults below), and
TrojanZoo's ``fine_pruning`` (its ``prune_ratio`` 0.95 cap).

Mechanism, for any architecture. The pruned units are the classifier's feature units
(:func:`tscray.defenses.layers.classifier`): the last stage's channels of a residual net, the last
conv's channels of a plain CNN, the last hidden layer of an MLP or of VGG's classifier, and for a
flatten head each unit's ``repeat`` input columns. A unit's activation is the mean of the classifier's
input over the clean set (the mean of its columns when ``repeat`` > 1). Units are pruned least-active
first, ``ceil(units · once_prune_ratio)`` more at each step, by zeroing their classifier input columns
(the unit's whole contribution to the output, as BackdoorBench's mask on the first Linear of the last
module). The step is kept while clean accuracy stays within BackdoorBench's bound
``|acc − acc₀| / acc₀ < acc_ratio``; the first step outside it ends the search, and the model of the
last kept step is fine-tuned with the pruned columns held at zero (their gradient is masked, and they
are re-zeroed at the end).

Defaults (BackdoorBench CIFAR-10, 5% clean data; also the TSC paper's L.2: SGD lr 0.01, pruning rate 1%,
100 epochs): ``acc_ratio`` 0.1, ``once_prune_ratio`` 0.01, fine-tuning 100 epochs of SGD lr 0.01,
momentum 0.9, weight decay 5e-4, cosine schedule, batch 256. ``paper`` and ``released`` presets are the same.

Departures from BackdoorBench's fp.py:
- Accuracy during the search is measured on the defender's clean set (BackdoorBench reads the clean
  *test* set, data a defender does not have), and activations on the unaugmented clean set
  (BackdoorBench forwards its augmented training loader).
- A step of n prunes exactly the n least-active units (BackdoorBench's ``seq_sort[0:num_pruned - 1]``
  prunes n − 1), and the model kept is the last one inside the bound (BackdoorBench prunes in place, so
  the model it fine-tunes already carries the step that broke the bound).
- Pruning stops at ``max_prune_ratio`` of the units (0.95, TrojanZoo's default; BackdoorBench has no cap
  but never reaches 100%).
- The layer pruned is the one :func:`~tscray.defenses.layers.classifier` finds; for VGG-19-BN that is the
  last hidden Linear (4096 units), where BackdoorBench hooks the first Linear of the ``classifier`` block
  (the 25,088 flattened columns, one per channel × position).
- The mask is a gradient mask on an unchanged module (no ``torch.nn.utils.prune`` re-parametrisation),
  so the purified model keeps its ordinary state-dict keys. No AMP.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from tscray.defenses import layers
from tscray.defenses.base import DEFENSES, CleanData, Defense, DefenseResult, Evaluate, Log
from tscray.methods.base import Method
from tscray.nnutil import eval_mode
from tscray.optim import OptimConfig
from tscray.train import train


@dataclass(frozen=True)
class FPConfig:
    """Fine-Pruning settings; defaults are BackdoorBench's CIFAR-10 ``fp`` config (see module docstring)."""

    acc_ratio: float = 0.1
    once_prune_ratio: float = 0.01
    max_prune_ratio: float = 0.95
    epochs: int = 100
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.01, momentum=0.9, weight_decay=5e-4))
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.acc_ratio <= 1.0:
            raise ValueError(f"acc_ratio must be in [0, 1], got {self.acc_ratio}")
        if not 0.0 < self.once_prune_ratio <= 1.0:
            raise ValueError(f"once_prune_ratio must be in (0, 1], got {self.once_prune_ratio}")
        if not 0.0 <= self.max_prune_ratio <= 1.0:
            raise ValueError(f"max_prune_ratio must be in [0, 1], got {self.max_prune_ratio}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def preset(cls, name: str = "paper") -> "FPConfig":
        """``paper`` and ``released``: BackdoorBench's CIFAR-10 defaults (the TSC paper used them)."""
        if name in ("paper", "released"):
            return cls()
        raise ValueError(f"unknown FP preset {name!r}; known: paper, released")


# --- the math: small pure functions --------------------------------------------------------------------


def prune_counts(units: int, once_prune_ratio: float, max_prune_ratio: float) -> list[int]:
    """Units pruned at each step: multiples of ``ceil(units · once_prune_ratio)`` up to the cap."""
    step = max(1, math.ceil(units * once_prune_ratio))
    cap = math.floor(units * max_prune_ratio + 1e-9)
    return list(range(step, cap + 1, step))


def within_bound(acc0: float, acc: float, acc_ratio: float) -> bool:
    """BackdoorBench's rule: keep pruning while ``|acc − acc₀| / acc₀ < acc_ratio``."""
    return abs(acc - acc0) < acc_ratio * acc0


def search(accuracy: Callable[[int], float], counts: list[int], acc_ratio: float
           ) -> tuple[int, list[tuple[int, float]]]:
    """The largest count of the pruning sequence before the first step outside the accuracy bound,
    and the (count, accuracy) trace it measured (count 0 first)."""
    acc0 = accuracy(0)
    trace, kept = [(0, acc0)], 0
    for n in counts:
        acc = accuracy(n)
        trace.append((n, acc))
        if not within_bound(acc0, acc, acc_ratio):
            break
        kept = n
    return kept, trace


def unit_activation(inputs: torch.Tensor, head: layers.Classifier) -> torch.Tensor:
    """Mean clean activation per feature unit from the classifier's inputs (N × in_features); a unit
    of a flatten head averages its ``repeat`` columns."""
    return inputs.mean(0).view(head.units, head.repeat).mean(1)


def prune_order(activation: torch.Tensor) -> torch.Tensor:
    """Units from least to most active (stable, so ties keep unit order)."""
    return torch.sort(activation, stable=True).indices


def column_mask(head: layers.Classifier, pruned: torch.Tensor) -> torch.Tensor:
    """1 for the classifier's kept input columns, 0 for the pruned units' columns."""
    mask = torch.ones(head.module.in_features)
    mask[head.unit_columns(pruned.cpu())] = 0.0
    return mask


# --- the model side ------------------------------------------------------------------------------------


@torch.no_grad()
def head_inputs(model: nn.Module, head: layers.Classifier, clean: CleanData, batch_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The classifier's inputs and the labels over the unaugmented clean set (eval mode), and whether
    the model's output is the classifier's output (then pruned accuracies need no further forwards)."""
    device = next(model.parameters()).device
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = head.module.register_forward_hook(lambda _m, inp, out: seen.append((inp[0].detach(), out)))
    inputs, labels, direct = [], [], True
    try:
        with eval_mode(model):
            for x, y in clean.loader(batch_size, 0, shuffle=False, augment=False):
                seen.clear()
                out = model(x.to(device))
                if len(seen) != 1:
                    raise layers.UnsupportedModel(f"{type(model).__name__}: classifier {head.name} ran "
                                                  f"{len(seen)} times in one forward")
                feats, head_out = seen[0]
                if feats.dim() != 2:
                    raise layers.UnsupportedModel(f"{type(model).__name__}: classifier {head.name} takes "
                                                  f"{feats.dim()}-D input, FP needs N x features")
                direct = direct and out.shape == head_out.shape and torch.equal(out, head_out)
                inputs.append(feats)
                labels.append(y.to(device))
    finally:
        handle.remove()
    return torch.cat(inputs), torch.cat(labels), direct


@torch.no_grad()
def zero_columns(head: nn.Linear, mask: torch.Tensor) -> None:
    """Remove pruned units' contribution: zero their input columns of the classifier."""
    head.weight.mul_(mask.to(head.weight.device, head.weight.dtype)[None, :])


def pruned_model(model: nn.Module, head_name: str, mask: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with the classifier's masked columns zeroed."""
    out = copy.deepcopy(model)
    head = out.get_submodule(head_name)
    assert isinstance(head, nn.Linear)
    zero_columns(head, mask)
    return out


@torch.no_grad()
def model_accuracy(model: nn.Module, clean: CleanData, batch_size: int) -> float:
    """Accuracy on the unaugmented clean set, eval mode."""
    device = next(model.parameters()).device
    right = total = 0
    with eval_mode(model):
        for x, y in clean.loader(batch_size, 0, shuffle=False, augment=False):
            right += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
            total += len(y)
    return right / max(1, total)


@dataclass
class Pruning:
    """The search's outcome: the pruned model (before fine-tuning), units pruned, units in the layer,
    the prune order (least active first), the kept-column mask and the (count, clean acc) trace."""

    model: nn.Module
    pruned: int
    units: int
    order: torch.Tensor
    mask: torch.Tensor
    trace: list[tuple[int, float]]


def prune(model: nn.Module, clean: CleanData, cfg: FPConfig) -> Pruning:
    """Rank the classifier's feature units by mean clean activation and prune the least active ones
    step by step while clean accuracy stays within the bound (``model`` is not modified)."""
    head = layers.classifier(model)
    inputs, labels, direct = head_inputs(model, head, clean, cfg.batch_size)
    order = prune_order(unit_activation(inputs, head).cpu())
    weight = head.module.weight.detach()
    bias = None if head.module.bias is None else head.module.bias.detach()

    def accuracy(n: int) -> float:
        mask = column_mask(head, order[:n]).to(inputs.device)
        if direct:
            pred = F.linear(inputs * mask, weight, bias).argmax(1)
            return float((pred == labels).float().mean())
        return model_accuracy(pruned_model(model, head.name, mask), clean, cfg.batch_size)

    counts = prune_counts(head.units, cfg.once_prune_ratio, cfg.max_prune_ratio)
    kept, trace = search(accuracy, counts, cfg.acc_ratio)
    mask = column_mask(head, order[:kept])
    return Pruning(pruned_model(model, head.name, mask), kept, head.units, order, mask, trace)


def finetune_masked(model: nn.Module, clean: CleanData, method: Method, mask: torch.Tensor, cfg: FPConfig
                    ) -> nn.Module:
    """A copy of the pruned model fine-tuned on the clean set with the pruned columns held at zero: their
    gradient is masked (so SGD/Adam, momentum and weight decay leave them at exactly 0) and they are
    re-zeroed at the end."""
    tuned = copy.deepcopy(model)
    head = layers.classifier(tuned).module
    m = mask.to(head.weight.device, head.weight.dtype)[None, :]
    handle = head.weight.register_hook(lambda g: g * m)
    try:
        train(tuned, clean.loader(cfg.batch_size, cfg.seed), method, cfg.epochs, cfg.optim)
    finally:
        handle.remove()
    zero_columns(head, mask)
    return tuned


def run(model: nn.Module, clean: CleanData, method: Method, cfg: FPConfig,
        evaluate: Evaluate | None = None, log: Log | None = None) -> DefenseResult:
    """Prune the least-active feature units within the accuracy bound, then fine-tune with them pruned.
    With ``evaluate``, a ``pruned`` record (the model before fine-tuning) precedes the ``final`` one; the
    pruned model is also ``points[(1, "pruned")]``."""
    p = prune(model, clean, cfg)
    if log:
        log(f"fp: pruned {p.pruned}/{p.units} units, clean acc {p.trace[0][1]:.4f} -> "
            f"{dict(p.trace)[p.pruned]:.4f} (stopped at {p.trace[-1][0]}: {p.trace[-1][1]:.4f})")
    tuned = finetune_masked(p.model, clean, method, p.mask, cfg)
    extra = {"fp_pruned": p.pruned, "fp_units": p.units}
    records = []
    if evaluate is not None:
        records.append({"defense": "fp", "round": 1, "stage": "pruned", **evaluate(p.model), **extra})
    records.append({"defense": "fp", "round": 1, "stage": "final", **(evaluate(tuned) if evaluate else {}),
                    **extra})
    if log:
        log(f"fp: {records[-1]}")
    return DefenseResult(tuned, [tuned], records, {(1, "pruned"): p.model})


def check_model(model: nn.Module) -> None:
    """FP needs a Linear classifier whose input units it can prune."""
    layers.classifier(model)


DEFENSES.register("fp")(Defense("fp", FPConfig, run, columns={"fp_pruned": "int", "fp_units": "int"},
                                check_model=check_model,
                                summary="fine-pruning: prune dormant feature units, then fine-tune"))
