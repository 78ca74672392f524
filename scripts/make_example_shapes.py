"""Build ``examples/shapes.npz``: a tiny bring-your-own dataset (the README's example, used by the tests).

Four classes of 24×24 grey glyphs (0 square, 1 disc, 2 cross, 3 ring) at random positions, sizes and
brightness over a blotchy background; 600 training and 200 test images (``x``, ``y``, ``x_test``, ``y_test``,
uint8 N×H×W). Deterministic: ``python scripts/make_example_shapes.py`` rewrites the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE, CLASSES = 24, ("square", "disc", "cross", "ring")


def glyph(cls: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    r = rng.uniform(4.0, 7.5)
    cy, cx = rng.uniform(r + 1, SIZE - r - 1, size=2)
    dy, dx = np.abs(yy - cy), np.abs(xx - cx)
    dist = np.hypot(yy - cy, xx - cx)
    mask = [np.maximum(dy, dx) <= r,
            dist <= r,
            ((dy <= r / 3.5) & (dx <= r)) | ((dx <= r / 3.5) & (dy <= r)),
            (dist <= r) & (dist >= r * 0.55)][cls]
    img = np.kron(rng.normal(40, 15, (SIZE // 4, SIZE // 4)), np.ones((4, 4)))  # blotchy background
    img[mask] = rng.uniform(150, 250)
    return np.clip(img, 0, 255).astype(np.uint8)


def make(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(n) % len(CLASSES)
    rng.shuffle(y)
    return np.stack([glyph(int(c), rng) for c in y]), y.astype(np.int64)


def main() -> None:
    rng = np.random.default_rng(2025)
    x, y = make(600, rng)
    xt, yt = make(200, rng)
    out = Path(__file__).resolve().parents[1] / "examples" / "shapes.npz"
    np.savez_compressed(out, x=x, y=y, x_test=xt, y_test=yt)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
