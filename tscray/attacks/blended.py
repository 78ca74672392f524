"""Blended (Chen et al., 2017): a fixed image blended into the whole input.

``x' = (1 - alpha) * x + alpha * pattern`` on the 0-255 scale, rounded back to uint8; poisoned images
are relabelled to the target (a label-flipping attack).

Parameters:

* ``alpha = 0.2``: the blending ratio of BackdoorBench's ``blended`` config and of the paper
  (Appendix L.1: "αt + (1 − α)x … with a value of α = 0.2").
* ``pattern = None``: path of the image to blend in; ``None`` uses the packaged
  ``blend_pattern.png``.

Departures from the paper and why:

* The trigger image. The paper (through BackdoorBench) blends a Hello Kitty photograph, which we cannot
  redistribute. The default pattern is generated deterministically by ``scripts/make_blend_pattern.py``:
  a 64×64 RGB colour gradient + 8-pixel checkerboard + seeded uniform noise, i.e. a fixed, full-image,
  high-frequency pattern like the photograph (not the same pixels, so absolute ASR/ACC can differ a
  little from the paper's). Pass ``pattern=<path>`` to use the original image.
* Resizing: the pattern is resized to the image's size with bilinear interpolation (as BackdoorBench's
  ``Resize``) and converted to the image's channels; for one-channel images it is converted to grayscale
  by luminance (ITU-R 601-2, PIL's ``convert("L")``). BackdoorBench only has RGB datasets.
* Rounding: the blend is rounded to the nearest integer (BackdoorBench casts the float blend to
  uint8 when it stores the poisoned image, which truncates); the two differ by at most one grey level.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tscray.attacks.base import ATTACKS, Attack
from tscray.data.files import eight_bit

PATTERN_FILE = "blend_pattern.png"


def default_pattern_path() -> Path:
    """The packaged default pattern (see ``scripts/make_blend_pattern.py``)."""
    return Path(str(resources.files("tscray.attacks").joinpath(PATTERN_FILE)))


def load_pattern(path: str | Path, channels: int, height: int, width: int) -> torch.Tensor:
    """The image at ``path`` as a uint8 C×H×W tensor: bilinear resize, grayscale (luminance) or RGB."""
    if channels not in (1, 3):
        raise ValueError(f"blended supports 1- or 3-channel images, got {channels} channels")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"blend pattern not found: {path}")
    with Image.open(path) as f:
        im = eight_bit(f, grey=channels == 1)
        if im.size != (width, height):
            im = im.resize((width, height), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1).contiguous()


@ATTACKS.register("blended")
class Blended(Attack):
    name = "blended"

    def __init__(self, alpha: float = 0.2, pattern: str | None = None) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"blended alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.pattern_path = Path(pattern) if pattern is not None else default_pattern_path()
        self.user_pattern = pattern is not None
        if not self.pattern_path.is_file():
            raise FileNotFoundError(f"blend pattern not found: {self.pattern_path}")
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The trigger at one image size, uint8 C×H×W (loaded once per size)."""
        key = (channels, height, width)
        if key not in self._cache:
            self._cache[key] = load_pattern(self.pattern_path, channels, height, width)
        return self._cache[key]

    def files(self) -> list[Path]:
        return [self.pattern_path] if self.user_pattern else []  # (the packaged one changes with tscray only)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        p = self.pattern(c, h, w).to(x.device, torch.float32)
        out = (1.0 - self.alpha) * x.float() + self.alpha * p
        return out.round_().clamp_(0, 255).to(torch.uint8)
