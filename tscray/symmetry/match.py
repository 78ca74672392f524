"""Activation matching: the permutation that aligns (or un-aligns) a model's units with a reference.

One hooked forward pass over both models gathers, per group, the cross-correlation between the
reference's units (rows) and the model's units (columns). Permuting earlier layers of the model
never changes its function, so every group is solved independently with the Hungarian algorithm:
``align`` maximises the summed matched correlation, ``unalign`` minimises it. Stage 1 of TSC is
``match(m, m, loader, "unalign")``; stage 2 is ``match(reference, point, loader, "align")``.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from tscray.nnutil import batch_inputs, eval_mode
from tscray.symmetry.permute import Permutation, spec_of
from tscray.symmetry.spec import Probe
from tscray.symmetry.stats import CrossCorrelation

Objective = Literal["align", "unalign"]


@contextmanager
def _capture(model: nn.Module, probes: Mapping[str, Sequence[Probe]]) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
    modules = dict(model.named_modules())
    store: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for group, plist in probes.items():
        for i, probe in enumerate(plist):
            def hook(_m, _inp, out, key=(group, i), relu=probe.post == "relu"):
                # clone: a later in-place op (out += shortcut) must not corrupt the capture
                store[key] = torch.relu(out) if relu else out.clone()
            handles.append(modules[probe.module].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def correlations(reference: nn.Module, model: nn.Module, loader: Iterable,
                 probes: Mapping[str, Sequence[Probe]] | str | None = None,
                 max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Per group, the summed probe correlation matrix (reference units × model units). ``probes``: where to
    read activations per group; None: the spec's own; a rule (``auto``/``raw``/``relu``): placed by
    :func:`tscray.symmetry.derive.probes_by_rule` on the loader's first batch."""
    if isinstance(probes, str):
        from tscray.symmetry.derive import PROBE_RULES, probes_by_rule

        if probes not in PROBE_RULES:
            raise ValueError(f"probes must be a mapping or one of {', '.join(PROBE_RULES)}, got {probes!r}")

        batches = iter(loader)
        first = next(batches, None)
        if first is None:
            raise ValueError("matching needs at least one batch")
        loader = itertools.chain([first], batches)
        device = next(model.parameters()).device
        probes = probes_by_rule(model, batch_inputs(first)[:2].to(device), probes)  # type: ignore[arg-type]
    probes = dict(probes if probes is not None else spec_of(model).probes)
    stats = {(g, i): CrossCorrelation() for g, pl in probes.items() for i in range(len(pl))}
    device = next(model.parameters()).device
    same = reference is model
    with eval_mode(reference, model), _capture(reference, probes) as acts_a, \
            (_capture(model, probes) if not same else _null()) as acts_b:
        acts_b = acts_a if same else acts_b
        for n, batch in enumerate(loader):
            if max_batches is not None and n >= max_batches:
                break
            x = batch_inputs(batch).to(device)
            reference(x)
            if not same:
                model(x)
            for key, st in stats.items():
                st.update(acts_a[key], acts_b[key])
    out: dict[str, torch.Tensor] = {}
    for (g, _), st in stats.items():
        c = st.correlation()
        out[g] = out[g] + c if g in out else c
    return out


@contextmanager
def _null() -> Iterator[dict]:
    yield {}


def solve(corr: torch.Tensor, objective: Objective) -> torch.Tensor:
    """Hungarian assignment on a correlation matrix; returns p with new unit i = old unit p[i]."""
    if objective not in ("align", "unalign"):
        raise ValueError(f"objective must be 'align' or 'unalign', got {objective!r}")
    c = corr.detach().cpu().numpy()
    if not np.isfinite(c).all():
        raise ValueError("correlation matrix has non-finite entries")
    rows, cols = linear_sum_assignment(c, maximize=objective == "align")
    p = np.empty(c.shape[0], dtype=np.int64)
    p[rows] = cols
    return torch.from_numpy(p)


def match(reference: nn.Module, model: nn.Module, loader: Iterable, objective: Objective = "align",
          probes: Mapping[str, Sequence[Probe]] | str | None = None,
          max_batches: int | None = None) -> Permutation:
    """The permutation of ``model`` that aligns/un-aligns it with ``reference`` on ``loader``."""
    if objective not in ("align", "unalign"):
        raise ValueError(f"objective must be 'align' or 'unalign', got {objective!r}")
    corr = correlations(reference, model, loader, probes, max_batches)
    groups = spec_of(model).groups()
    missing = [g for g in groups if g not in corr]
    if missing:
        raise ValueError(f"no probes for groups {missing}")
    return {g: solve(corr[g], objective) for g in groups}


def matched_correlation(corr: Mapping[str, torch.Tensor], perm: Mapping[str, torch.Tensor]) -> float:
    """Mean over groups of the mean correlation of matched pairs under ``perm``."""
    vals = [float(c[torch.arange(c.shape[0]), perm[g]].mean()) for g, c in corr.items()]
    return float(np.mean(vals))
