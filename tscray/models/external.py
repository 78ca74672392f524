"""Architectures nobody registered: any ``torchvision.models`` builder or a user's importable builder.

``torchvision:resnet34`` builds ``torchvision.models.resnet34(num_classes=..., weights=None, **arch_kw)``
(nothing is downloaded); ``mypkg.models:build_net`` imports ``mypkg.models`` and calls
``build_net(num_classes=..., in_channels=..., **arch_kw)`` (``in_channels`` only if the builder takes it).
A torchvision model built for inputs with other than 3 channels gets its stem conv rebuilt for them.

Such a model has no hand-written permutation spec, so one is derived from its graph and verified exact
(:func:`tscray.symmetry.derive.derive`) on an example input of the data's shape, once per process and
configuration, and attached as the model's ``permutation_spec``.
"""

from __future__ import annotations

import importlib
import inspect
import json
from typing import Any, Callable

import torch
from torch import nn

from tscray.symmetry.spec import PermSpec

TORCHVISION = "torchvision:"
DEFAULT_HW = (32, 32)
_SPECS: dict[str, PermSpec] = {}


class ArchError(ValueError):
    """An architecture reference that cannot be built (bad form, unknown builder, failing import)."""


def is_external(name: str) -> bool:
    """Whether ``name`` refers to a builder outside the registry (``module:attr`` form)."""
    return isinstance(name, str) and ":" in name


class DerivedSpec:
    """A picklable ``permutation_spec`` method for a built model: returns the derived spec."""

    def __init__(self, spec: PermSpec) -> None:
        self.spec = spec

    def __call__(self) -> PermSpec:
        return self.spec


def builder(name: str) -> Callable[..., nn.Module]:
    """The callable an external reference names (torchvision model or ``module:attr``)."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ArchError(f"architecture {name!r}: write torchvision:NAME or package.module:builder")
    if name.startswith(TORCHVISION):
        from tscray._torchvision import torchvision

        tv_models = torchvision().models
        available = tv_models.list_models(module=tv_models)
        if attr not in available:
            raise ArchError(f"architecture {name!r}: torchvision has no classification model {attr!r} "
                            f"(e.g. {', '.join(sorted(available)[:8])}, ...)")
        return tv_models.get_model_builder(attr)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or an error inside the user's module
        raise ArchError(f"architecture {name!r}: cannot import {module_name!r}: {type(err).__name__}: {err}") \
            from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ArchError(f"architecture {name!r}: {module_name} has no callable {attr!r}")
    return fn


def _adapt_stem(model: nn.Module, in_channels: int) -> nn.Module:
    """Rebuild the first 3-channel conv of a torchvision model for ``in_channels`` inputs."""
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.in_channels == 3 and mod.groups == 1:
            conv: dict[str, Any] = dict(kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding,
                                        dilation=mod.dilation, bias=mod.bias is not None, padding_mode=mod.padding_mode)
            new = nn.Conv2d(in_channels, mod.out_channels, **conv)
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            return model
    raise ArchError(f"{type(model).__name__}: no 3-channel stem conv to rebuild for {in_channels} channels")


def build(name: str, num_classes: int, in_channels: int = 3, input_hw: tuple[int, int] | None = None,
          **kw: Any) -> nn.Module:
    """Build an external architecture and attach its derived, verified permutation spec."""
    fn = builder(name)
    try:
        if name.startswith(TORCHVISION):
            model = fn(num_classes=num_classes, weights=None, **kw)
            if in_channels != 3:
                model = _adapt_stem(model, in_channels)
        else:
            params = inspect.signature(fn).parameters
            takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
            extra = {"in_channels": in_channels} if "in_channels" in params or takes_any else {}
            model = fn(num_classes=num_classes, **extra, **kw)
    except ArchError:
        raise
    except (TypeError, ValueError) as err:
        raise ArchError(f"architecture {name!r} with {kw or 'no options'}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ArchError(f"architecture {name!r}: the builder returned {type(model).__name__}, not a torch Module")
    hw = tuple(input_hw) if input_hw is not None else DEFAULT_HW
    key = json.dumps([name, num_classes, in_channels, list(hw), sorted(kw.items(), key=str)], default=str)
    if key not in _SPECS:
        from tscray.symmetry.derive import derive

        example = torch.randn(2, in_channels, *hw, generator=torch.Generator().manual_seed(0))
        _SPECS[key] = derive(model, example)
    model.permutation_spec = DerivedSpec(_SPECS[key])  # type: ignore[assignment]
    return model
