"""What every attack provides: a trigger on raw images, a choice of images to poison, and hooks.

Most attacks are a trigger and nothing more (BadNets, Blended, SIG, WaNet). The others need more,
and override one of three hooks, each with a plain default:

* **A resource** (a surrogate's adversarial images, a trained trigger generator, an encoder, a
  universal perturbation): :meth:`Attack.resource_params` names what it depends on,
  :meth:`Attack.make_resource` computes it as a dict of tensors, :meth:`Attack.load_resource`
  installs it. The sweep computes it as its own cached step keyed by those params, so every
  model poisoned by the same attack shares it; a direct call computes it on first use.
* **Per-image poison** (:meth:`Attack.poison`): a poisoned image may depend on which image it is
  (LC's adversarial training images, SSBA's pre-generated BackdoorBench arrays); by default it is
  :meth:`Attack.apply`.
* **Training** (:meth:`Attack.train_model`): training-manipulation attacks (SBL, the adaptive
  attack of the paper's Algorithm 4) replace plain cross-entropy training on the poisoned set.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from tscray.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from tscray.data import Dataset
    from tscray.data.tensors import ImageData
    from tscray.optim import OptimConfig
    from tscray.train import Progress

Split = Literal["train", "test"]


class Attack:
    """An all-to-one backdoor attack.

    ``clean_label`` attacks poison only target-class images and relabel nothing; the others
    poison non-target images and relabel them to the target.
    """

    name: str = "attack"
    clean_label: bool = False
    # bumped when a change alters what the attack computes; above 1 it is part of its backdoored models'
    # step params, so stores retrain those models, and only those
    version: int = 1

    # ------------------------------------------------------------------ trigger
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copies of uint8 images (N×C×H×W): the test-time trigger."""
        raise NotImplementedError

    def poison(self, x: torch.Tensor, idx: torch.Tensor, split: Split) -> torch.Tensor:
        """Poisoned copies of the images at indices ``idx`` of ``split`` (``x`` is those images).

        Defaults to :meth:`apply`; attacks whose poisoned images depend on the image's identity
        (pre-computed per-image arrays) override it.
        """
        return self.apply(x)

    def select(self, y: torch.Tensor, rate: float, target: int, gen: torch.Generator) -> torch.Tensor:
        """Indices of training images to poison: ``rate`` of the whole set, drawn among eligible images."""
        eligible = torch.nonzero(y == target if self.clean_label else y != target).flatten()
        problem = self.rate_problem(rate, len(y), len(eligible), target)
        if problem is not None:  # (it poisoned all it could without a word: the rate column then said 5% of 0.5%)
            raise ValueError(problem)
        return eligible[torch.randperm(len(eligible), generator=gen)[:round(rate * len(y))]].sort().values

    def rate_problem(self, rate: float, n: int, eligible: int, target: int) -> str | None:
        """Why ``rate`` of ``n`` images cannot be poisoned when ``eligible`` of them may be (None when it can):
        the check :meth:`select` makes, and a sweep's validation before any compute."""
        k = round(rate * n)
        if k <= eligible:
            return None
        who = f"images of target class {target}" if self.clean_label else f"images outside target class {target}"
        return (f"{self.name} at rate {rate:g} asks {k:,} poisoned images of {n:,}, but only {eligible:,} are {who} "
                f"({eligible / n:.2%} of the set)"
                + ("; a clean-label attack poisons only its target class" if self.clean_label else "")
                + f": lower the rate to at most {_floor_digits(eligible / n)}")

    def extra_training(self, train: ImageData, poison_idx: torch.Tensor, rate: float, target: int,
                       gen: torch.Generator) -> ImageData | None:
        """Extra images, with their labels, appended to the poisoned training set (none by default).

        ``train`` is the clean training set, ``poison_idx`` the indices chosen by :meth:`select`, and
        ``gen`` the poisoning generator (already advanced by :meth:`select`), so extras are seeded too.
        Attacks that train on more than the poisoned images (WaNet's noise mode) override this.
        """
        return None

    def files(self) -> list[Path]:
        """The user's files the attack reads (a pattern, a released trigger), with those of the attacks it
        builds on: a sweep keys them by path, so it records their content with the data's
        (:mod:`tscray.data_record`) and refuses a file edited between two runs."""
        return [f for v in vars(self).values() if isinstance(v, Attack) for f in v.files()]

    # ------------------------------------------------------------------ resource
    def resource_params(self, rate: float) -> dict[str, Any] | None:
        """JSON-able parameters the attack's precomputed resource depends on, or None if it needs none.

        The resource is keyed by these plus dataset, target and seed; include ``rate`` only if the
        resource depends on it (SAPA's optimised poisons do, a universal trigger does not).
        """
        return None

    def make_resource(self, dataset: Dataset, rate: float, target: int, seed: int,
                      device: torch.device | str = "cpu", progress: Progress | None = None
                      ) -> dict[str, torch.Tensor]:
        """Compute the resource (surrogate training, trigger optimisation...) as named tensors."""
        raise NotImplementedError(f"attack {self.name!r} has no resource")

    def load_resource(self, tensors: dict[str, torch.Tensor]) -> None:
        """Install a resource computed by :meth:`make_resource` (or loaded from a store/file)."""
        raise NotImplementedError(f"attack {self.name!r} has no resource")

    @property
    def ready(self) -> bool:
        """Whether the attack can poison now (its resource, if it needs one, is loaded)."""
        return True

    def prepare(self, dataset: Dataset, rate: float, target: int, seed: int,
                device: torch.device | str = "cpu", progress: Progress | None = None) -> dict[str, torch.Tensor] | None:
        """Compute and load the resource if the attack needs one and has none; returns it (or None)."""
        if self.resource_params(rate) is None or self.ready:
            return None
        tensors = self.make_resource(dataset, rate, target, seed, device, progress)
        self.load_resource(tensors)
        return tensors

    # ------------------------------------------------------------------ training
    def train_model(self, model: nn.Module, train: ImageData, dataset: Dataset, target: int, seed: int,
                    epochs: int, batch_size: int, optim: OptimConfig, device: torch.device | str = "cpu",
                    progress: Progress | None = None) -> nn.Module:
        """Train ``model`` on the poisoned set ``train``: cross-entropy with BackdoorBench's augmentation.

        Training-manipulation attacks override this (and may use ``dataset`` for clean data).
        """
        from tscray.data.tensors import Loader
        from tscray.methods.supervised import Supervised
        from tscray.train import train as train_loop

        loader = Loader(train, dataset.prep, batch_size, shuffle=True, augment=True, seed=seed, device=device)
        return train_loop(model, loader, Supervised(), epochs, optim, progress)


ATTACKS: Registry = Registry("attack")


def _floor_digits(x: float, digits: int = 4) -> str:
    """``x`` to ``digits`` significant digits, rounded down (a rate printed rounded up could ask one image too
    many again)."""
    import math

    if x <= 0:
        return "0"
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return f"{math.floor(x * scale) / scale:g}"
