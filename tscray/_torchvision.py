"""The one place tscray imports torchvision.

Some torchvision wheels are CUDA builds whose import fails on a CPU build of torch with
``operator torchvision::nms does not exist``: registering the schemas of the compiled ops
first makes models, datasets and ``transforms.v2`` importable (the compiled ops themselves stay
unavailable; tscray needs none). On a matching install the import simply works.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_lib = None


def torchvision() -> ModuleType:
    """Import and return torchvision, defining missing op schemas first if needed."""
    global _lib
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "does not exist" not in str(err):
            raise
    import sys

    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    if _lib is None:
        _lib = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS.values():
            try:
                _lib.define(schema)
            except RuntimeError:
                pass  # already defined by a partial import
    return importlib.import_module("torchvision")
