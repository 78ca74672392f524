"""Generate tscray/attacks/blend_pattern.png, the default trigger of the ``blended`` attack.

The Blended attack (Chen et al., 2017) as run by the paper (via BackdoorBench) blends a Hello Kitty
photograph into the image. We cannot ship that image, so the project generates its own fixed pattern
instead: a 64×64 RGB uint8 image, the same on every run, made of

* a smooth colour gradient (red rises left → right, green top → bottom, blue along the anti-diagonal):
  low-frequency, global colour structure, like a photograph's;
* a checkerboard of 8×8-pixel squares: a sharp, recognisable, mid-frequency structure that survives
  downscaling to 28×28 or 32×32 (squares of ~3.5-4 pixels there) and a grayscale conversion;
* uniform noise from a seeded NumPy generator (PCG64, seed 2017): high-frequency texture, so the
  trigger is not a simple separable function a network could mistake for natural content.

Mixed as 0.45·gradient + 0.25·checkerboard + 0.30·noise (each in [0, 1]), scaled to 0-255 and rounded.
The PNG in the package is the source of truth (the attack never calls this script); the script documents
how it was made and regenerates it byte-for-byte with the same NumPy/Pillow (it prints the SHA-256).

    python scripts/make_blend_pattern.py            # writes tscray/attacks/blend_pattern.png
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

SIZE, SQUARE, SEED = 64, 8, 2017
WEIGHTS = (0.45, 0.25, 0.30)  # gradient, checkerboard, noise


def make_pattern(size: int = SIZE, square: int = SQUARE, seed: int = SEED) -> np.ndarray:
    """The pattern as a (size, size, 3) uint8 array."""
    ramp = np.arange(size, dtype=np.float64) / (size - 1)
    rows, cols = np.meshgrid(ramp, ramp, indexing="ij")
    gradient = np.stack([cols, rows, 1.0 - (rows + cols) / 2.0], axis=-1)
    idx = np.arange(size) // square
    checker = ((idx[:, None] + idx[None, :]) % 2).astype(np.float64)[..., None].repeat(3, axis=-1)
    noise = np.random.default_rng(seed).random((size, size, 3))
    wg, wc, wn = WEIGHTS
    mix = wg * gradient + wc * checker + wn * noise
    return np.clip(np.rint(mix * 255.0), 0, 255).astype(np.uint8)


def main() -> None:
    default = Path(__file__).resolve().parents[1] / "tscray" / "attacks" / "blend_pattern.png"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=default)
    args = ap.parse_args()
    Image.fromarray(make_pattern(), mode="RGB").save(args.out, optimize=False)
    print(f"wrote {args.out} sha256={hashlib.sha256(args.out.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
