"""SAPA, Sharpness-Aware Data Poisoning Attack (He et al., ICLR 2024), backdoor variant.

SAPA's backdoor attack is Sleeper Agent (Souri et al., NeurIPS 2022) with a sharpness-aware objective: the
poisons' per-image perturbations δ (‖δ‖∞ ≤ ε) are optimised by *gradient matching* on a surrogate θ so that
training on them moves the model like the gradient of the backdoor loss does, where that gradient is taken at
the worst-case model near θ (SAM's first step, θ̂ = θ + ρ·g/‖g‖ with g the backdoor-loss gradient):

    min_δ  1 − cos( ∇θ L(f_θ(aug(x_p + δ)), y_p),  ∇θ L_bd(θ̂) ),
    L_bd = cross-entropy of triggered source images to the target class.

The poisoned images are therefore data-dependent: the attack is a **resource** (:meth:`SAPA.make_resource`)
keyed by the poison rate, holding the poison indices (chosen by :meth:`Attack.select` with the same seeded
generator as :func:`tscray.attacks.poison_train`) and their rounded integer perturbations. ``poison(x, idx,
"train")`` returns the base poison plus the stored perturbation; the test-time trigger (``apply``) is the
trigger alone.

Two threat models (``hidden``):

* ``hidden = False`` (default): poisons are non-target images carrying the trigger *and* δ, relabelled to the
  target (a dirty-label trigger attack whose poisons are additionally optimised for a flat backdoor region).
* ``hidden = True``: Sleeper Agent's hidden-trigger, clean-label setting: poisons are target-class images with
  δ only (no trigger, labels kept); the trigger appears only at test time. This is what the SAPA and TSC papers
  evaluate, but gradient matching needs far more surrogate training and steps than a CPU budget allows, so it
  is weak at our scale.

Parameters (paper values from the TSC paper, Appendix L.1, which adopts SAPA's/Sleeper Agent's defaults):

* ``trigger = "badnets"`` and ``trigger_kw``: the trigger (built with :func:`tscray.attacks.build`);
* ``eps = 16``: l∞ bound on the 0-255 scale (paper: 16/255);
* ``rho = 0.01``: SAM radius of the backdoor gradient (paper: "sharpness sigma = 0.01");
* ``sources = 256``: triggered non-target training images defining the backdoor loss (paper: 1000);
* ``steps = 40``: optimisation steps (paper: R = 250); ``retrain = 0``: surrogate retrainings on the current
  poisoned set during crafting (paper: T = 4 retraining periods); ``step_size = 2.0``: signed-Adam learning
  rate in grey levels, decayed ×0.1 at 3/8, 5/8, 7/8 of the steps (Witches' Brew/Sleeper Agent schedule);
* ``surrogate = "cnn"``, ``surrogate_epochs = 4``, ``surrogate_lr = 0.05``, ``batch_size = 128``: the surrogate,
  trained from a seeded init on the clean training set (Sleeper Agent trains a full clean model);
* ``hidden = False``: see above.

Departures and why:

* Scale: fewer steps, source images, surrogate epochs and retrainings than the paper (CPU budget); all are
  parameters.
* Poison selection: a seeded random choice among eligible images (the shared :meth:`Attack.select`), not
  Sleeper Agent's largest-gradient-norm selection, so poison indices do not depend on the surrogate and match
  :func:`tscray.attacks.poison_train` exactly.
* Trigger: BadNets' white patch by default instead of Sleeper Agent's random colourful 8×8 patch (the embedded
  data is 28×28 grayscale); Blended is available.
* The default (dirty-label, triggered poisons) departs from SAPA's hidden-trigger threat model, as explained
  above; ``hidden=True`` follows it.
* The surrogate is evaluated in eval mode (BatchNorm running statistics) during crafting; perturbations are
  crafted on images with the dataset's own differentiable augmentation (random crop, flip where the dataset
  flips), then rounded to integers, since tscray poisons uint8 images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence, cast

import torch
from torch import nn
from torch.nn import functional as F

from tscray.attacks.base import ATTACKS, Attack, Split
from tscray.data.tensors import ImageData, Loader, Preprocess

if TYPE_CHECKING:
    from tscray.data import Dataset
    from tscray.train import Progress


def flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def sharp_backdoor_gradient(model: nn.Module, x: torch.Tensor, target: int, rho: float,
                            batch_size: int) -> list[torch.Tensor]:
    """Gradient of the backdoor loss (normalised ``x`` → target) at θ̂ = θ + ρ·g/‖g‖ (SAM's worst case)."""
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]

    def grad_at() -> list[torch.Tensor]:
        total = [torch.zeros_like(p) for p in params]
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            loss = F.cross_entropy(model(xb), torch.full((len(xb),), target, device=x.device), reduction="sum")
            torch._foreach_add_(total, flat_grad(loss / len(x), params))
        return total

    g = grad_at()
    if rho == 0:
        return g
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
    eps = [t * (rho / (norm + 1e-12)) for t in g]
    with torch.no_grad():
        torch._foreach_add_(params, eps)
    try:
        return grad_at()
    finally:
        with torch.no_grad():
            torch._foreach_sub_(params, eps)


def craft(model: nn.Module, base: torch.Tensor, labels: torch.Tensor, adv_grad: list[torch.Tensor],
          delta: torch.Tensor, prep: Preprocess, eps: float, steps: int, step_size: float, batch_size: int,
          gen: torch.Generator) -> torch.Tensor:
    """Gradient matching: signed-Adam steps on δ (0-255 scale) towards cos(poison gradient, ``adv_grad``) = 1."""
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    adv_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in adv_grad]))
    delta = delta.clone().requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=step_size)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [steps * 3 // 8, steps * 5 // 8, steps * 7 // 8], 0.1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for i in range(0, len(base), batch_size):
            sl = slice(i, i + batch_size)
            x = prep.normalize(prep.augment(base[sl] + delta[sl], gen))
            g = flat_grad(F.cross_entropy(model(x), labels[sl]), params, create_graph=True)
            dot = sum((a * b).sum() for a, b in zip(g, adv_grad))
            norm = torch.sqrt(cast(torch.Tensor, sum((a * a).sum() for a in g)))  # g is non-empty: not sum()'s 0
            (1 - dot / (norm * adv_norm + 1e-12)).backward()
        with torch.no_grad():
            assert delta.grad is not None  # base is non-empty, so backward reached delta
            delta.grad.sign_()
        opt.step()
        sched.step()
        with torch.no_grad():
            delta.clamp_(-eps, eps)
            delta.copy_((base + delta).clamp(0, 255) - base)
    return delta.detach()


@ATTACKS.register("sapa")
class SAPA(Attack):
    name = "sapa"

    def __init__(self, trigger: str = "badnets", trigger_kw: dict[str, Any] | None = None, eps: float = 16,
                 rho: float = 0.01, sources: int = 256, steps: int = 40, retrain: int = 0, step_size: float = 2.0,
                 surrogate: str = "cnn", surrogate_epochs: int = 4, surrogate_lr: float = 0.05,
                 batch_size: int = 128, hidden: bool = False) -> None:
        from tscray.attacks import build
        if trigger in ("sapa", "sbl", "adaptive"):
            raise ValueError(f"sapa trigger must be a trigger-only attack, got {trigger!r}")
        if not 0 < eps <= 255:
            raise ValueError(f"sapa eps must be in (0, 255] (grey levels), got {eps}")
        if rho < 0:
            raise ValueError(f"sapa rho must be >= 0, got {rho}")
        if sources < 1 or steps < 0 or retrain < 0 or surrogate_epochs < 0 or batch_size < 1:
            raise ValueError("sapa sources and batch_size must be >= 1; steps, retrain, surrogate_epochs >= 0")
        if step_size <= 0 or surrogate_lr <= 0:
            raise ValueError("sapa step_size and surrogate_lr must be > 0")
        self.trigger = build(trigger, **(trigger_kw or {}))
        if self.trigger.resource_params(0.1) is not None:
            raise ValueError(f"sapa needs a trigger without a resource, got {trigger!r}")
        self.config: dict[str, Any] = {
            "trigger": trigger, "trigger_kw": dict(trigger_kw or {}), "eps": float(eps), "rho": float(rho),
            "sources": sources, "steps": steps, "retrain": retrain, "step_size": float(step_size),
            "surrogate": surrogate, "surrogate_epochs": surrogate_epochs,
            "surrogate_lr": float(surrogate_lr), "batch_size": batch_size, "hidden": bool(hidden)}
        self.hidden = bool(hidden)
        self.clean_label = self.hidden
        self._idx: torch.Tensor | None = None
        self._delta: torch.Tensor | None = None

    # ------------------------------------------------------------------ trigger and poisons
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.trigger.apply(x)

    def base_poison(self, x: torch.Tensor) -> torch.Tensor:
        """The poison before its perturbation: the raw image (hidden trigger) or the triggered one."""
        return x.clone() if self.hidden else self.trigger.apply(x)

    def poison(self, x: torch.Tensor, idx: torch.Tensor, split: Split) -> torch.Tensor:
        if split == "test":
            return self.apply(x)
        if self._idx is None or self._delta is None:
            raise RuntimeError("sapa needs its resource: call prepare(...) or load_resource(...) first")
        idx = torch.as_tensor(idx, dtype=torch.long)
        pos = torch.searchsorted(self._idx, idx).clamp_max(len(self._idx) - 1)
        if len(idx) and not torch.equal(self._idx[pos], idx):
            raise ValueError("sapa: these training indices were not poisoned by the loaded resource "
                             "(was it made for another rate, target or seed?)")
        out = self.base_poison(x).to(torch.int16) + self._delta[pos].to(x.device)
        return out.clamp_(0, 255).to(torch.uint8)

    # ------------------------------------------------------------------ resource
    def resource_params(self, rate: float) -> dict[str, Any]:
        return {"rate": float(rate), **self.config}

    @property
    def ready(self) -> bool:
        return self._idx is not None and self._delta is not None

    def load_resource(self, tensors: dict[str, torch.Tensor]) -> None:
        idx, delta = tensors["idx"].long(), tensors["delta"]
        if delta.shape[0] != idx.shape[0]:
            raise ValueError(f"sapa resource: {idx.shape[0]} indices but {delta.shape[0]} perturbations")
        if len(idx) and int(delta.abs().max()) > self.config["eps"]:
            raise ValueError("sapa resource exceeds this attack's eps")
        self._idx, self._delta = idx.cpu(), delta.to(torch.int16).cpu()

    def make_resource(self, dataset: Dataset, rate: float, target: int, seed: int,
                      device: torch.device | str = "cpu", progress: Progress | None = None
                      ) -> dict[str, torch.Tensor]:
        """Train a surrogate, then craft the perturbations of the poisons ``poison_train`` will choose."""
        from tscray.methods.supervised import Supervised
        from tscray.models import build as build_model
        from tscray.optim import OptimConfig
        from tscray.train import train as train_loop

        cfg, train = self.config, dataset.train
        idx = self.select(train.y, rate, target, torch.Generator().manual_seed(seed))
        base = self.base_poison(train.x[idx]).to(device, torch.float32)
        labels = train.y[idx].clone() if self.hidden else torch.full((len(idx),), target, dtype=torch.long)
        labels = labels.to(device)
        gen = torch.Generator().manual_seed(seed * 7919 + 3)
        if len(idx) == 0:
            return {"idx": idx, "delta": torch.zeros((0, *train.x.shape[1:]), dtype=torch.int16)}
        delta = ((torch.rand(base.shape, generator=gen) * 2 - 1) * cfg["eps"]).to(device)
        delta = (base + delta).clamp(0, 255) - base

        non_target = torch.nonzero(train.y != target).flatten()
        src = non_target[torch.randperm(len(non_target), generator=gen)[:cfg["sources"]]]
        src_x = dataset.prep.normalize(self.trigger.apply(train.x[src]).to(device))

        optim = OptimConfig(lr=cfg["surrogate_lr"])
        periods = cfg["retrain"] + 1
        for period in range(periods):
            torch.manual_seed(seed * 1_000_003 + period)
            model = build_model(cfg["surrogate"], dataset.num_classes, dataset.in_channels).to(device)
            data = train
            if period > 0:  # retrain on the current poisoned set
                x, y = train.x.clone(), train.y.clone()
                x[idx] = (base + delta).round().clamp(0, 255).to(torch.uint8).cpu()
                y[idx] = labels.cpu()
                data = ImageData(x, y)
            loader = Loader(data, dataset.prep, cfg["batch_size"], shuffle=True, augment=True, seed=seed + period,
                            device=device)
            train_loop(model, loader, Supervised(), cfg["surrogate_epochs"], optim, progress)
            model.eval()
            adv = sharp_backdoor_gradient(model, src_x, target, cfg["rho"], cfg["batch_size"])
            steps = cfg["steps"] // periods + (1 if period < cfg["steps"] % periods else 0)
            delta = craft(model, base, labels, adv, delta, dataset.prep, cfg["eps"], steps, cfg["step_size"],
                          cfg["batch_size"], gen)
        poisoned = (base + delta).round().clamp(0, 255)
        bound = int(cfg["eps"])  # integer grey levels within the bound
        return {"idx": idx, "delta": (poisoned - base).clamp(-bound, bound).to(torch.int16).cpu()}
