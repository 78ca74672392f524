"""LC, label-consistent backdoor (Turner et al., 2019): adversarially hardened target images + a corner trigger.

A clean-label attack. The attacker makes target-class training images *hard* to classify by their
(correct) label with an l-inf PGD attack on a surrogate model (maximise the surrogate's loss on the true
label), then stamps the trigger on them; labels stay untouched. A model can no longer fit these images
from their content and leans on the trigger, so at test time the trigger alone (no adversarial
perturbation) sends non-target images to the target class.

Trigger: BackdoorBench's ``lc`` ``all-corners`` pattern at full amplitude (``reduced_amplitude = 1``): a
3×3 black/white checkerboard-like pattern in each of the four corners (both left corners carry the same
pattern, the right corners its left-right mirror), 36 pixels set to 0 or 255 in every channel.

Parameters (defaults; BackdoorBench's ``resource/label-consistent/craft_adv_dataset.py`` in brackets):

* ``eps = 8``: PGD l-inf radius in grey levels (8/255) [8/255];
* ``step_size = 1.5``: PGD step in grey levels [1.5/255];
* ``steps = 10``: PGD steps [100], fewer for CPU runs (the loss saturates within a few steps on our
  small surrogates; pass ``steps=100`` for the original);
* ``amplitude = 1.0``: trigger amplitude (BackdoorBench's ``reduced_amplitude``) [1];
* ``surrogate_arch = "cnn"``, ``surrogate_epochs = 4``, ``surrogate_lr = 0.05``, ``surrogate_batch = 128``:
  the surrogate (below).

The resource is the PGD-perturbed copy of every target-class training image (``index``: their training
indices, ``images``: uint8), so it does not depend on the poisoning rate; :meth:`LC.poison` looks the
chosen images up and stamps the trigger, and the test-time trigger (:meth:`LC.apply`) is the corner
pattern alone. Poisoning rate: as BackdoorBench, a share of the whole training set drawn among the
target-class images (a rate beyond their number is an error).

Departures from the original and why:

* The surrogate. Turner et al. and BackdoorBench attack an *adversarially trained* ResNet-18 downloaded
  with the code; we cannot download it, so the attack trains its own surrogate, a *standard* (not
  adversarially trained) ``surrogate_arch`` model on the clean training set for ``surrogate_epochs``
  epochs (seeded). Perturbations against a standard model are less semantic (less "hard" for a victim of
  another init), so the attack can be weaker than the original at the same rate.
* PGD steps: 10 instead of 100 by default (CPU budget); the result is rounded to uint8 (BackdoorBench
  truncates), which stays inside the ε-ball since the clean image is integral.
* Image size: the 3×3 corner patterns are placed pixel-exactly at any size; BackdoorBench resizes its
  32×32 mask with nearest interpolation, which distorts the pattern at other sizes (e.g. 28×28).
"""

from __future__ import annotations

from typing import Any

import torch

from tscray.attacks._surrogate import check_positive, freeze, lookup, pgd, pixel_forward, train_surrogate
from tscray.attacks.base import ATTACKS, Attack, Split
from tscray.data import Dataset
from tscray.train import Progress

# BackdoorBench's "all-corners" pattern, left corners: +1 → white, -1 → black; the right corners mirror it.
_CORNER = torch.tensor([[1, -1, -1],
                        [-1, 1, -1],
                        [1, -1, 1]], dtype=torch.float32)


def corner_mask(height: int, width: int) -> torch.Tensor:
    """The four-corner trigger as an (H, W) mask in {-1, 0, 1}."""
    if height < 3 or width < 3:
        raise ValueError(f"lc trigger needs images of at least 3×3 pixels, got {height}×{width}")
    m = torch.zeros(height, width)
    m[:3, :3] = _CORNER
    m[:3, -3:] = _CORNER.flip(1)
    m[-3:, :3] = _CORNER
    m[-3:, -3:] = _CORNER.flip(1)
    return m


@ATTACKS.register("lc")
class LC(Attack):
    name = "lc"
    clean_label = True

    def __init__(self, eps: float = 8.0, step_size: float = 1.5, steps: int = 10, amplitude: float = 1.0,
                 surrogate_arch: str = "cnn", surrogate_epochs: int = 4, surrogate_lr: float = 0.05,
                 surrogate_batch: int = 128) -> None:
        check_positive("lc", eps=eps, step_size=step_size, surrogate_lr=surrogate_lr, surrogate_batch=surrogate_batch)
        if steps < 0 or surrogate_epochs < 0:
            raise ValueError(f"lc steps and surrogate_epochs must be >= 0, got {steps}, {surrogate_epochs}")
        if not 0 < amplitude <= 1:
            raise ValueError(f"lc amplitude must be in (0, 1], got {amplitude}")
        self.eps, self.step_size, self.steps, self.amplitude = float(eps), float(step_size), steps, float(amplitude)
        self.surrogate_arch, self.surrogate_epochs = surrogate_arch, surrogate_epochs
        self.surrogate_lr, self.surrogate_batch = float(surrogate_lr), surrogate_batch
        self._index: torch.Tensor | None = None
        self._images: torch.Tensor | None = None

    # ------------------------------------------------------------------ trigger
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        m = corner_mask(x.shape[-2], x.shape[-1]).to(x.device)
        return (x.float() + self.amplitude * 255.0 * m).round_().clamp_(0, 255).to(torch.uint8)

    def poison(self, x: torch.Tensor, idx: torch.Tensor, split: Split) -> torch.Tensor:
        """Training images: their adversarial copies from the resource, plus the trigger; test: the trigger."""
        if split == "test":
            return self.apply(x)
        if self._index is None or self._images is None:  # (not self.ready: both are set together)
            raise RuntimeError("lc needs its resource (the adversarial target-class images) to poison training images")
        pos = lookup(self._index, idx, "target-class training images")
        return self.apply(self._images[pos].to(x.device))

    # ------------------------------------------------------------------ resource
    def resource_params(self, rate: float) -> dict[str, Any]:
        return {"eps": self.eps, "step_size": self.step_size, "steps": self.steps,
                "surrogate_arch": self.surrogate_arch, "surrogate_epochs": self.surrogate_epochs,
                "surrogate_lr": self.surrogate_lr, "surrogate_batch": self.surrogate_batch}

    def make_resource(self, dataset: Dataset, rate: float, target: int, seed: int,
                      device: torch.device | str = "cpu", progress: Progress | None = None
                      ) -> dict[str, torch.Tensor]:
        """Train the surrogate, then PGD every target-class training image away from its label."""
        model = freeze(train_surrogate(dataset.train, dataset, self.surrogate_arch, self.surrogate_epochs,
                                       self.surrogate_lr, self.surrogate_batch, seed, device, progress))
        index = torch.nonzero(dataset.train.y == target).flatten()
        x = dataset.train.x[index].to(device)
        y = dataset.train.y[index].to(device)
        adv = pgd(pixel_forward(model, dataset.prep), x, y, self.eps, self.step_size, self.steps)
        return {"index": index.cpu(), "images": adv.cpu()}

    def load_resource(self, tensors: dict[str, torch.Tensor]) -> None:
        index, images = tensors["index"].long().cpu(), tensors["images"].cpu()
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(index):
            raise ValueError(f"lc resource: expected uint8 N×C×H×W images for {len(index)} indices, got "
                             f"{images.dtype} {tuple(images.shape)}")
        order = index.argsort()
        self._index, self._images = index[order], images[order]

    @property
    def ready(self) -> bool:
        return self._images is not None
