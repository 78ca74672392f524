"""The adaptive attack against TSC (the TSC paper, Appendix G.1, Algorithm 4): a backdoored subspace.

TSC's first stage connects θadv to its un-aligned copy θ'adv by a Bézier curve fitted on clean data, and relies
on the backdoor loss rising along it. The adaptive attacker, who controls training, places θadv and θ'adv in a
subspace where the *backdoor* loss is low along the curve between them, following the subspace learning of
Wortsman et al. (2021). Algorithm 4, on the poisoned set Dadv:

1. θ'adv = PERMUTELAYERS(θadv, θadv, Dadv, MAX): the un-aligned copy (tscray's ``match(..., "unalign")``,
   as in TSC's stage 1: the paper's MAX maximises the matching *cost*, i.e. minimises correlation);
2. θm = (θadv + θ'adv)/2 and γ(t) = (1−t)²θadv + 2t(1−t)θm + t²θ'adv;
3. for e epochs: sample t ~ U(0, 1) per batch and update θadv, θm **and** θ'adv together with the loss of F
   (cross-entropy) at γ(t) on Dadv (the endpoints are not fixed, unlike TSC's curves);
4. return θadv (the curve's start).

θadv itself is first trained normally on the poisoned set (the paper converts already-backdoored models).

Parameters:

* ``trigger = "badnets"`` (any registered trigger-only attack: ``"badnets"``, ``"blended"``, ``"sig"``,
  ``"wanet"``...) and ``trigger_kw``; the poisoned set is that attack's;
* ``curve_share = 0.5``: share of the recipe's epochs spent on the curve (the rest trains θadv);
* ``curve_epochs = None``: if given, θadv gets all the recipe's epochs and the curve ``curve_epochs`` more
  (the paper's setting: a backdoored model, then e curve epochs; e is not reported);
* ``curve_lr_scale = 1.0``: the curve's learning rate relative to the recipe's;
* ``match_batches = None``: batches of Dadv used to compute the un-aligning permutation (None: all).

Departures and why:

* e is not given in the paper; at the scale of our recipes the split of one epoch budget is the default so
  that the adaptive model costs what a plain one costs. The curve uses the recipe's optimiser (SGD, cosine,
  weight decay on all three control points).
* BatchNorm: the returned θadv's running statistics are recomputed exactly over the augmented poisoned set
  (:func:`tscray.curves.update_bn`), since its weights moved during curve training; the paper does not say.
* Matching uses tscray's default probes per architecture and the augmented poisoned set in a fixed order,
  like TSC's stage 1 uses the clean set.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tscray.attacks.base import ATTACKS, Attack
from tscray.curves import BezierCurve, coefficients, fit_epochs, strided_like
from tscray.data.tensors import ImageData, Loader
from tscray.methods.supervised import Supervised
from tscray.symmetry import match, permute

if TYPE_CHECKING:
    from tscray.data import Dataset
    from tscray.optim import OptimConfig
    from tscray.train import Progress


class SubspaceCurve(BezierCurve):
    """A quadratic Bézier curve whose endpoints are trainable too (Algorithm 4's backdoored subspace)."""

    def __init__(self, start: nn.Module, end: nn.Module) -> None:
        super().__init__(start, end)
        for name in list(self._buffers):
            if name.startswith(("start__", "end__")):
                value = self._buffers.pop(name)
                assert value is not None  # BezierCurve registers the endpoints as tensors
                self.register_parameter(name, nn.Parameter(value))

    def weights(self, t: float) -> dict[str, torch.Tensor]:
        """Parameters at t, differentiable with respect to both endpoints and the bend."""
        c0, c1, c2 = coefficients(float(t))
        base = dict(self.base.named_parameters())
        return {k: strided_like(c0 * a + c1 * m + c2 * b, base[k])
                for k, a, m, b in zip(self.names, self.endpoint("start"), self.bend, self.endpoint("end"))}

    def trainable(self) -> list[nn.Parameter]:
        return [*self.endpoint("start"), *self.bend, *self.endpoint("end")]


def fit_subspace(curve: SubspaceCurve, loader: Loader, epochs: int, optim: OptimConfig, seed: int = 0,
                 progress: Progress | None = None) -> list[float]:
    """Algorithm 4's loop: one t ~ U(0, 1) per batch, cross-entropy at γ(t), all control points updated
    (:func:`tscray.curves.fit_epochs` over :meth:`SubspaceCurve.trainable`). Returns each epoch's mean loss."""
    return fit_epochs(curve, loader, Supervised(), epochs, optim, seed, progress)


@ATTACKS.register("adaptive")
class Adaptive(Attack):
    name = "adaptive"
    version = 2  # 2: the curve start's BN refresh merges per-batch moments (curves.update_bn)

    def __init__(self, trigger: str = "badnets", trigger_kw: dict[str, Any] | None = None, curve_share: float = 0.5,
                 curve_epochs: int | None = None, curve_lr_scale: float = 1.0,
                 match_batches: int | None = None) -> None:
        from tscray.attacks import build
        if trigger == "adaptive":
            raise ValueError("adaptive trigger cannot be 'adaptive'")
        if not 0.0 < curve_share < 1.0:
            raise ValueError(f"adaptive curve_share must be in (0, 1), got {curve_share}")
        if curve_epochs is not None and curve_epochs < 1:
            raise ValueError(f"adaptive curve_epochs must be >= 1 or None, got {curve_epochs}")
        if curve_lr_scale <= 0:
            raise ValueError(f"adaptive curve_lr_scale must be > 0, got {curve_lr_scale}")
        if match_batches is not None and match_batches < 1:
            raise ValueError(f"adaptive match_batches must be >= 1 or None, got {match_batches}")
        self.base = build(trigger, **(trigger_kw or {}))
        if type(self.base).train_model is not Attack.train_model or self.base.resource_params(0.1) is not None:
            raise ValueError(f"adaptive needs a trigger-only attack, got {trigger!r}")
        self.trigger_name, self.clean_label = trigger, self.base.clean_label
        self.curve_share, self.curve_epochs = float(curve_share), curve_epochs
        self.curve_lr_scale, self.match_batches = float(curve_lr_scale), match_batches
        self.curve: SubspaceCurve | None = None
        self.history: dict[str, Any] = {}

    # the poisoned set is the base attack's
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.apply(x)

    def poison(self, x: torch.Tensor, idx: torch.Tensor, split: Any) -> torch.Tensor:
        return self.base.poison(x, idx, split)

    def select(self, y: torch.Tensor, rate: float, target: int, gen: torch.Generator) -> torch.Tensor:
        return self.base.select(y, rate, target, gen)

    def extra_training(self, train: ImageData, poison_idx: torch.Tensor, rate: float, target: int,
                       gen: torch.Generator) -> ImageData | None:
        return self.base.extra_training(train, poison_idx, rate, target, gen)

    def split_epochs(self, epochs: int) -> tuple[int, int]:
        """(epochs training θadv, curve epochs) for a recipe of ``epochs`` epochs."""
        if self.curve_epochs is not None:
            return epochs, self.curve_epochs
        curve = min(max(1, round(self.curve_share * epochs)), epochs - 1) if epochs >= 2 else 0
        return epochs - curve, curve

    def train_model(self, model: nn.Module, train: ImageData, dataset: Dataset, target: int, seed: int,
                    epochs: int, batch_size: int, optim: OptimConfig, device: torch.device | str = "cpu",
                    progress: Progress | None = None) -> nn.Module:
        """Train θadv on Dadv, un-align a copy, learn the backdoored subspace, return its start θadv."""
        e0, e1 = self.split_epochs(epochs)
        super().train_model(model, train, dataset, target, seed, e0, batch_size, optim, device, progress)
        self.history = {"pretrain_epochs": e0, "curve_epochs": e1, "curve_losses": []}
        if e1 == 0:
            return model
        fixed = Loader(train, dataset.prep, batch_size, shuffle=False, augment=True, seed=seed + 2, device=device)
        perm = match(model, model, fixed, "unalign", None, self.match_batches)
        curve = SubspaceCurve(model, permute(model, perm)).to(device)
        loader = Loader(train, dataset.prep, batch_size, shuffle=True, augment=True, seed=seed + 3, device=device)
        curve_optim = dataclasses.replace(optim, lr=optim.lr * self.curve_lr_scale)
        self.history["curve_losses"] = fit_subspace(curve, loader, e1, curve_optim, seed + 4, progress)
        self.history["permutation"] = {g: p.clone() for g, p in perm.items()}
        start = curve.point(0.0, Loader(train, dataset.prep, batch_size, shuffle=False, augment=True,
                                        seed=seed + 5, device=device))
        model.load_state_dict(start.state_dict())
        self.curve = curve
        return model


__all__ = ["Adaptive", "SubspaceCurve", "fit_subspace"]
