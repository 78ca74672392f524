"""Permutation specs: which axis of which state-dict entry carries which group of units.

A spec is data. Every state-dict entry maps to a tuple with one item per tensor axis:
``None`` (axis not permuted), a group name, or ``Expand(group, repeat)`` for an axis made
of ``size(group) * repeat`` entries laid out unit-major (a flattened conv map feeding a
linear layer). A *concatenated* group (Inception-style channel concatenation) is declared in
``concat`` as the ordered list of its parts; its permutation is the block-diagonal union of
the parts' permutations and it is never matched on its own.

Probes say where matching reads activations for a group: a list of ``Probe(module, post)``,
the output of module ``module`` (``post="raw"``) or its ReLU (``post="relu"``). A group with
several probes is matched on the sum of their correlation matrices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence, Union

import torch


@dataclass(frozen=True)
class Expand:
    """An axis of ``size(group) * repeat`` entries, unit-major (unit u owns [u*repeat, (u+1)*repeat))."""

    group: str
    repeat: int


AxisGroup = Union[None, str, Expand]


@dataclass(frozen=True)
class Probe:
    """Where to read activations for matching: module output, raw or after ReLU."""

    module: str
    post: Literal["raw", "relu"] = "raw"


@dataclass(frozen=True)
class PermSpec:
    """Permutation symmetry of one architecture (see module docstring)."""

    axes: Mapping[str, tuple[AxisGroup, ...]]
    probes: Mapping[str, Sequence[Probe]] = field(default_factory=dict)
    concat: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def groups(self) -> list[str]:
        """Base (matchable) groups, in first-use order; concatenated groups excluded."""
        seen: dict[str, None] = {}
        for axes in self.axes.values():
            for ax in axes:
                name = ax.group if isinstance(ax, Expand) else ax
                if name is None:
                    continue
                for base in self.concat.get(name, [name]):
                    seen.setdefault(base, None)
        return list(seen)

    def group_sizes(self, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Size of every group (base and concatenated), read from the tensors; checks consistency."""
        sizes: dict[str, int] = {}
        for key, axes in self.axes.items():
            if key not in state:
                raise KeyError(f"permutation spec names {key!r}, which the model's state dict lacks")
            shape = state[key].shape
            if len(axes) != len(shape):
                raise ValueError(f"spec for {key!r} has {len(axes)} axes, tensor has shape {tuple(shape)}")
            for dim, ax in enumerate(axes):
                if ax is None:
                    continue
                name, n = (ax.group, shape[dim] // ax.repeat) if isinstance(ax, Expand) else (ax, shape[dim])
                if isinstance(ax, Expand) and shape[dim] % ax.repeat:
                    raise ValueError(f"{key!r} axis {dim}: {shape[dim]} not divisible by repeat {ax.repeat}")
                if sizes.setdefault(name, n) != n:
                    raise ValueError(f"group {name!r}: size {n} at {key!r} axis {dim}, {sizes[name]} elsewhere")
        for cat, parts in self.concat.items():
            if cat in sizes and all(p in sizes for p in parts) and sum(sizes[p] for p in parts) != sizes[cat]:
                raise ValueError(f"concatenated group {cat!r} is not the sum of its parts {list(parts)}")
        return sizes

    def check(self, model: torch.nn.Module) -> None:
        """Raise if the spec leaves a state-dict entry out, mis-sizes a group or names unknown modules."""
        state = model.state_dict()
        uncovered = sorted(set(state) - set(self.axes))
        if uncovered:
            raise ValueError(f"permutation spec does not cover {uncovered}")
        self.group_sizes(state)
        modules = dict(model.named_modules())
        for group, probes in self.probes.items():
            for probe in probes:
                if probe.module not in modules:
                    raise KeyError(f"probe for group {group!r} names unknown module {probe.module!r}")
        missing = [g for g in self.groups() if g not in self.probes]
        if missing:
            raise ValueError(f"groups without probes (cannot be matched): {missing}")


def conv_bn(conv: str, bn: str | None, out_group: str | None, in_group: AxisGroup,
            conv_bias: bool = False) -> dict[str, tuple[AxisGroup, ...]]:
    """Spec entries for a conv (out, in, kh, kw) optionally followed by a BatchNorm on its output."""
    axes: dict[str, tuple[AxisGroup, ...]] = {f"{conv}.weight": (out_group, in_group, None, None)}
    if conv_bias:
        axes[f"{conv}.bias"] = (out_group,)
    if bn is not None:
        axes.update(bn_entries(bn, out_group))
    return axes


def bn_entries(bn: str, group: str | None) -> dict[str, tuple[AxisGroup, ...]]:
    """BatchNorm weight, bias and running statistics all carry the channel group."""
    return {f"{bn}.{k}": (group,) for k in ("weight", "bias", "running_mean", "running_var")} | {
        f"{bn}.num_batches_tracked": ()
    }


def linear(name: str, out_group: str | None, in_group: AxisGroup, bias: bool = True) -> dict[str, tuple[AxisGroup, ...]]:
    """Spec entries for a Linear layer (out, in)."""
    axes: dict[str, tuple[AxisGroup, ...]] = {f"{name}.weight": (out_group, in_group)}
    if bias:
        axes[f"{name}.bias"] = (out_group,)
    return axes
