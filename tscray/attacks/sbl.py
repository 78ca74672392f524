"""SBL, Sequential Backdoor Learning (Pham et al., ECCV 2024, "Flatness-aware Sequential Learning Generates
Resilient Backdoors"): a training-manipulation attack whose backdoor survives clean fine-tuning.

Training is split into two continual-learning tasks (the released code, ``mail-research/SBL-resilient-backdoors``,
``run_cifar.sh`` with ``--cl_method ewc --opt_mode sam --mixed_first``):

1. **Task 0, backdoor**: train on the poisoned set with sharpness-aware minimisation (SAM, Foret et al. 2021;
   ``rho = 0.05``, the released ``SAM`` default), so the backdoored model sits in a flat region. As in the
   released code, BatchNorm running statistics are updated only by SAM's first forward pass.
2. **Task 1, clean**: fine-tune on clean data the attacker holds with plain SGD at a lower learning rate and
   the EWC penalty ``ewc_lambda * Σ F_i (θ_i − θ*_i)²`` (Kirkpatrick et al. 2017), where θ* is the task-0 model
   and F the diagonal Fisher information of the task-0 (poisoned) data: ``F = mean_x p(y|x) · (∇ log p(y|x))²``
   with y the (poisoned) training label, as in the released ``models/ewc.py``. The model is thus moved to a
   region of clean-data minima that still holds the backdoor, so a defender's fine-tuning does not leave it.

The trigger is BadNets or Blended (``trigger``), built with :func:`tscray.attacks.build`; the TSC paper
evaluates SBL-BadNets and SBL-Blended with EWC (Appendix L.1).

Parameters:

* ``trigger = "badnets"`` (``"badnets"`` | ``"blended"``) and ``trigger_kw`` (its keyword arguments);
* ``seq_share = 0.4``: share of the recipe's epochs spent on task 1 (released: 150 + 100 epochs, i.e. 0.4);
* ``clean_share = 0.05``: the attacker's clean data, a seeded share of the training set (released
  ``--task_portion 0.05 0.1 0.85``: 5% clean for task 1);
* ``seq_lr_scale = 0.1``: task-1 learning rate relative to the recipe's (released: lr 0.01, sec_lr 0.001);
* ``rho = 0.05``: SAM radius; ``ewc_lambda = 1.0`` (released ``--lambd 1``);
* ``fisher_samples = None``: poisoned images the Fisher is estimated on (None: all of them).

Departures and why:

* Data split: the released code trains task 0 on 85% of the data (poisoned) and keeps 5% apart for task 1. Here
  task 0 is the whole poisoned set that :func:`tscray.attacks.poison_train` produced (so the poison rate means
  what it means for every other attack) and task 1 draws its clean share (clean labels, original pixels) from
  the same training set, seeded by the training seed; the attacker's clean images were also seen in task 0.
* Schedule: both tasks use the recipe's optimiser settings (cosine over each task's epochs, the recipe's weight
  decay); the released code builds cosine schedulers but never steps them under SAM, so its learning rates
  stay constant, and its SAM base optimiser has no weight decay.
* Triggers are static (poisoned once before training) rather than added on the fly (``--is_dat``), like every
  tscray attack, so poisoned sets are cached by content.
* The Fisher is computed with per-sample gradients (``torch.func``) in eval mode (BatchNorm running
  statistics); the released code back-propagates one image at a time in train mode, where a single image's
  batch statistics are degenerate. Same quantity otherwise, much faster.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, cast

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn import functional as F

from tscray.attacks.base import ATTACKS, Attack
from tscray.data.tensors import ImageData, Loader, Preprocess
from tscray.nnutil import eval_mode

if TYPE_CHECKING:
    from tscray.data import Dataset
    from tscray.optim import OptimConfig
    from tscray.train import Progress

TRIGGERS = ("badnets", "blended")


def build_trigger(trigger: str, trigger_kw: dict[str, Any] | None) -> Attack:
    """The base attack whose trigger SBL and the adaptive attack reuse."""
    from tscray.attacks import build
    return build(trigger, **(trigger_kw or {}))


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep their running statistics (momentum 0) inside the block: SAM's second pass."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


def sam_train(model: nn.Module, loader: Loader, epochs: int, optim: OptimConfig, rho: float,
              progress: Progress | None = None) -> nn.Module:
    """Cross-entropy training with SAM: ascend to θ + ρ·g/‖g‖, take the gradient there, step from θ."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = optim.build(params, epochs)
    tensors: list[torch.Tensor] = list(params)  # the same parameters, typed as torch._foreach_* wants

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        return loss + 0.5 * optim.l2 * sum((p * p).sum() for p in params) if optim.l2 else loss

    model.train()
    for epoch in range(epochs):
        total, steps = 0.0, 0
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_of(x, y)
            loss.backward()
            with torch.no_grad():
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                eps = [g * (rho / (norm + 1e-12)) for g in grads]
                torch._foreach_add_(tensors, eps)
            opt.zero_grad(set_to_none=True)
            with frozen_bn_stats(model):
                loss_of(x, y).backward()
            with torch.no_grad():
                torch._foreach_sub_(tensors, eps)
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        sched.step()
        if progress is not None:
            progress(epoch + 1, epochs, total / max(1, steps))
    return model


def fisher_diagonal(model: nn.Module, data: ImageData, prep: Preprocess, batch_size: int = 64,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """EWC's diagonal Fisher: mean over images of p(y|x)·(∇θ log p(y|x))², per parameter (eval mode)."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def log_prob(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return F.log_softmax(out, 1)[0].gather(0, y.unsqueeze(0)).squeeze(0)

    per_sample = vmap(grad_and_value(log_prob), in_dims=(None, 0, 0))
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    with eval_mode(model):
        for x, y in Loader(data, prep, batch_size, device=device):
            grads, logp = per_sample(params, x, y)
            w = logp.exp()
            for k, g in grads.items():
                fisher[k] += torch.einsum("n,n...->...", w, g * g)
    return {k: f / max(1, len(data)) for k, f in fisher.items()}


def ewc_train(model: nn.Module, loader: Loader, epochs: int, optim: OptimConfig, fisher: dict[str, torch.Tensor],
              anchor: dict[str, torch.Tensor], lam: float, progress: Progress | None = None) -> list[float]:
    """Cross-entropy plus ``lam·Σ F (θ − θ*)²`` (EWC); returns the mean penalty of each epoch."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt, sched = optim.build(params, epochs)
    penalties = []
    model.train()
    for epoch in range(epochs):
        total, pen_total, steps = 0.0, 0.0, 0
        for x, y in loader:
            # (named is non-empty, so the sum is a Tensor, not sum()'s start 0)
            penalty = cast(torch.Tensor, sum((fisher[k] * (p - anchor[k]) ** 2).sum() for k, p in named))
            loss = F.cross_entropy(model(x), y) + lam * penalty
            if optim.l2:
                loss = loss + 0.5 * optim.l2 * sum((p * p).sum() for p in params)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, pen_total, steps = total + float(loss.detach()), pen_total + float(penalty.detach()), steps + 1
        sched.step()
        penalties.append(pen_total / max(1, steps))
        if progress is not None:
            progress(epoch + 1, epochs, total / max(1, steps))
    return penalties


def attacker_clean_indices(n: int, share: float, seed: int) -> torch.Tensor:
    """The attacker's clean images for task 1: a seeded ``share`` of the training set (sorted indices)."""
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    k = max(1, round(share * n))
    return torch.randperm(n, generator=gen)[:k].sort().values


@ATTACKS.register("sbl")
class SBL(Attack):
    name = "sbl"

    def __init__(self, trigger: str = "badnets", trigger_kw: dict[str, Any] | None = None, seq_share: float = 0.4,
                 clean_share: float = 0.05, seq_lr_scale: float = 0.1, rho: float = 0.05, ewc_lambda: float = 1.0,
                 fisher_samples: int | None = None) -> None:
        if trigger not in TRIGGERS:
            raise ValueError(f"sbl trigger must be one of {TRIGGERS}, got {trigger!r}")
        if not 0.0 < seq_share < 1.0:
            raise ValueError(f"sbl seq_share must be in (0, 1), got {seq_share}")
        if not 0.0 < clean_share <= 1.0:
            raise ValueError(f"sbl clean_share must be in (0, 1], got {clean_share}")
        if seq_lr_scale <= 0:
            raise ValueError(f"sbl seq_lr_scale must be > 0, got {seq_lr_scale}")
        if rho < 0:
            raise ValueError(f"sbl rho must be >= 0, got {rho}")
        if ewc_lambda < 0:
            raise ValueError(f"sbl ewc_lambda must be >= 0, got {ewc_lambda}")
        if fisher_samples is not None and fisher_samples < 1:
            raise ValueError(f"sbl fisher_samples must be >= 1 or None, got {fisher_samples}")
        self.trigger = build_trigger(trigger, trigger_kw)
        self.trigger_name = trigger
        self.seq_share, self.clean_share, self.seq_lr_scale = float(seq_share), float(clean_share), float(seq_lr_scale)
        self.rho, self.ewc_lambda, self.fisher_samples = float(rho), float(ewc_lambda), fisher_samples
        self.history: dict[str, Any] = {}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.trigger.apply(x)

    def split_epochs(self, epochs: int) -> tuple[int, int]:
        """(task-0 epochs, task-1 epochs) of a recipe with ``epochs`` epochs; each task gets one if it can."""
        seq = min(max(1, round(self.seq_share * epochs)), epochs - 1) if epochs >= 2 else 0
        return epochs - seq, seq

    def train_model(self, model: nn.Module, train: ImageData, dataset: Dataset, target: int, seed: int,
                    epochs: int, batch_size: int, optim: OptimConfig, device: torch.device | str = "cpu",
                    progress: Progress | None = None) -> nn.Module:
        """Task 0 (SAM on the poisoned set), the Fisher at its end, task 1 (EWC on the attacker's clean share)."""
        e0, e1 = self.split_epochs(epochs)
        loader = Loader(train, dataset.prep, batch_size, shuffle=True, augment=True, seed=seed, device=device)
        sam_train(model, loader, e0, optim, self.rho, progress)
        self.history = {"task0_epochs": e0, "task1_epochs": e1, "penalties": []}
        if e1 == 0:
            return model
        fisher_data = train
        if self.fisher_samples is not None and self.fisher_samples < len(train):
            gen = torch.Generator().manual_seed(seed + 1)
            fisher_data = train.subset(torch.randperm(len(train), generator=gen)[:self.fisher_samples])
        fisher = fisher_diagonal(model, fisher_data, dataset.prep, device=device)
        anchor = {k: p.detach().clone() for k, p in model.named_parameters()}
        clean = dataset.train.subset(attacker_clean_indices(len(dataset.train), self.clean_share, seed))
        clean_loader = Loader(clean, dataset.prep, batch_size, shuffle=True, augment=True, seed=seed + 1,
                              device=device)
        optim1 = dataclasses.replace(optim, lr=optim.lr * self.seq_lr_scale)
        self.history["penalties"] = ewc_train(model, clean_loader, e1, optim1, fisher, anchor, self.ewc_lambda,
                                              progress)
        self.history["fisher_mean"] = float(torch.cat([f.flatten() for f in fisher.values()]).mean())
        self.history["drift"] = float(sum(((p.detach() - anchor[k]) ** 2).sum() for k, p in model.named_parameters()))
        return model


@ATTACKS.register("sbl-blended")
class SBLBlended(SBL):
    """SBL with the Blended trigger: the paper's SBL-Blended (``sbl`` is its SBL-BadNets)."""

    name = "sbl-blended"

    def __init__(self, trigger: str = "blended", **kw: Any) -> None:
        super().__init__(trigger=trigger, **kw)
