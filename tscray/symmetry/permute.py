"""Applying, composing and inverting permutations of a model's hidden units.

A permutation is ``{group: LongTensor p}`` with the convention *new unit i = old unit p[i]*:
every axis carrying the group is re-indexed with ``index_select(axis, p)``. Parameters and
BatchNorm buffers are permuted alike, so the permuted model computes exactly the same function.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from tscray.symmetry.spec import Expand, PermSpec

Permutation = dict[str, torch.Tensor]


def spec_of(model: nn.Module) -> PermSpec:
    """The permutation spec that sits beside the model's definition."""
    get = getattr(model, "permutation_spec", None)
    if get is None:
        raise TypeError(f"{type(model).__name__} has no permutation_spec(); register it in tscray.models")
    return get()


def expand_concat(spec: PermSpec, perm: Mapping[str, torch.Tensor],
                  sizes: Mapping[str, int]) -> Permutation:
    """Add the block-diagonal permutation of every concatenated group to ``perm``."""
    full = dict(perm)
    for cat, parts in spec.concat.items():
        offset, pieces = 0, []
        for part in parts:
            pieces.append(full[part] + offset)
            offset += sizes[part]
        full[cat] = torch.cat(pieces)
    return full


def permute_state(spec: PermSpec, state: Mapping[str, torch.Tensor],
                  perm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a new state dict with every grouped axis re-indexed by ``perm``."""
    sizes = spec.group_sizes(state)
    full = expand_concat(spec, perm, sizes)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        axes = spec.axes.get(key, ())
        for dim, ax in enumerate(axes):
            if ax is None:
                continue
            if isinstance(ax, Expand):
                # move whole runs of ``repeat`` entries: (…, n·r, …) viewed as (…, n, r, …), gathered on n
                p = full[ax.group].to(tensor.device)
                shape = tensor.shape
                runs = tensor.reshape(*shape[:dim], shape[dim] // ax.repeat, ax.repeat, *shape[dim + 1:])
                tensor = runs.index_select(dim, p).reshape(shape)
            else:
                tensor = tensor.index_select(dim, full[ax].to(tensor.device))
        out[key] = tensor.clone() if tensor is state[key] else tensor
    return out


def permute(model: nn.Module, perm: Mapping[str, torch.Tensor]) -> nn.Module:
    """A new model equal to ``model`` with its hidden units permuted (same function)."""
    spec = spec_of(model)
    new = copy.deepcopy(model)
    new.load_state_dict(permute_state(spec, model.state_dict(), perm))
    return new


def identity(model: nn.Module) -> Permutation:
    """The identity permutation of every base group."""
    spec = spec_of(model)
    sizes = spec.group_sizes(model.state_dict())
    return {g: torch.arange(sizes[g]) for g in spec.groups()}


def random_permutation(model: nn.Module, generator: torch.Generator | None = None) -> Permutation:
    """A uniformly random permutation of every base group."""
    spec = spec_of(model)
    sizes = spec.group_sizes(model.state_dict())
    return {g: torch.randperm(sizes[g], generator=generator) for g in spec.groups()}


def invert(perm: Mapping[str, torch.Tensor]) -> Permutation:
    """The inverse permutation: ``permute(permute(m, p), invert(p))`` restores ``m`` exactly."""
    return {g: torch.argsort(p) for g, p in perm.items()}


def compose(first: Mapping[str, torch.Tensor], then: Mapping[str, torch.Tensor]) -> Permutation:
    """The single permutation equal to applying ``first`` and then ``then``."""
    return {g: first[g][then[g]] for g in first}
