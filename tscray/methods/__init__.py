"""Training methods F: how a model (or a point on a curve) is trained on a batch.

A method is a small object with ``loss(forward, batch) -> Tensor`` where ``forward`` maps an
input batch to the model's output. Curves call it with the curve's forward at a sampled t,
plain training with the model itself, so adding SimCLR or CLIP-style training is one file.
"""

from __future__ import annotations

from tscray.methods.base import METHODS, Method
from tscray.methods import supervised  # noqa: F401  (registration)


def build(name: str, **kw: object) -> Method:
    """Construct the registered training method ``name``."""
    return METHODS.get(name)(**kw)


__all__ = ["METHODS", "Method", "build"]
