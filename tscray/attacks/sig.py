"""SIG (Barni et al., 2019): a horizontal sinusoid added to target-class images, labels untouched.

``x'[..., i, j] = clip(x[..., i, j] + delta * sin(2π · j · f / W), 0, 255)`` for every row ``i`` and
channel: a vertical-stripe signal that varies along the columns ``j`` only. A clean-label attack: only
target-class training images are poisoned and nothing is relabelled; at test time the same signal is
added to non-target images (:func:`tscray.attacks.poison.poison_test`), and ASR counts those classified
as the target.

Parameters (BackdoorBench's ``sigTriggerAttack`` defaults, which the paper uses through BackdoorBench):

* ``delta = 40``: amplitude on the 0-255 scale;
* ``f = 6``: number of periods across the image width.

Poisoning rate: as BackdoorBench, ``rate`` is a share of the *whole* training set, drawn among the
target-class images (:meth:`Attack.select`; a rate beyond their number is an error). With 10 balanced
classes a rate of 0.1 therefore poisons every target-class image, and a higher one is refused.

Departures: none in the trigger itself (BackdoorBench computes the same float sum and clips; we round
to the nearest integer before the cast, BackdoorBench truncates: at most one grey level apart). The
signal is defined by the image width, so it scales to any image size.
"""

from __future__ import annotations

import math

import torch

from tscray.attacks.base import ATTACKS, Attack


@ATTACKS.register("sig")
class SIG(Attack):
    name = "sig"
    clean_label = True

    def __init__(self, delta: float = 40.0, f: float = 6.0) -> None:
        if delta <= 0:
            raise ValueError(f"sig delta must be > 0, got {delta}")
        if f <= 0:
            raise ValueError(f"sig frequency f must be > 0, got {f}")
        self.delta, self.f = float(delta), float(f)

    def signal(self, width: int) -> torch.Tensor:
        """The per-column signal ``delta * sin(2π j f / W)``, float32 of shape (W,)."""
        j = torch.arange(width, dtype=torch.float64)
        return (self.delta * torch.sin(2 * math.pi * j * self.f / width)).float()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        s = self.signal(x.shape[-1]).to(x.device)
        return (x.float() + s).round_().clamp_(0, 255).to(torch.uint8)
