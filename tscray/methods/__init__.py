"""Training methods F: how a model (or a point on a curve) is trained on a batch.

A method is a small object with ``loss(forward, batch) -> Tensor`` where ``forward`` maps an
input batch to the model's output. Curves call it with the curve's forward at a sampled t,
plain training with the model itself, so adding SimCLR or CLIP-style training is one file.
"""

from __future__ import annotations

import importlib
import pkgutil

from tscray.methods.base import METHODS, Method

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base" and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")  # each module registers its method


def build(name: str, **kw: object) -> Method:
    """Construct the registered training method ``name``."""
    return METHODS.get(name)(**kw)


__all__ = ["METHODS", "Method", "build"]
