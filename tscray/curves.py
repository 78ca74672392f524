"""Quadratic Bézier curves between two models of one architecture (mode connectivity).

θ(t) = (1−t)²·θA + 2t(1−t)·θM + t²·θB with fixed endpoints and a trainable bend θM,
initialised to the midpoint. The curve wraps an ordinary module and evaluates it with
``torch.func.functional_call``: no per-architecture "curve twin" layers. While fitting, one
t ~ U(0, 1) is drawn per batch and BatchNorm runs in train mode; a retrieved point gets its
BatchNorm statistics recomputed exactly over a clean loader (:func:`update_bn`).
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call

from tscray.methods.base import Method
from tscray.optim import OptimConfig
from tscray.train import Progress
from tscray.nnutil import batch_inputs



def _key(name: str) -> str:
    return name.replace(".", "__")


def coefficients(t: float) -> tuple[float, float, float]:
    """Bernstein weights (start, bend, end) of the quadratic Bézier curve at t."""
    return (1.0 - t) ** 2, 2.0 * t * (1.0 - t), t * t


class BezierCurve(nn.Module):
    """A quadratic Bézier curve between ``start`` and ``end``; only the bend is trainable."""

    def __init__(self, start: nn.Module, end: nn.Module) -> None:
        super().__init__()
        sa, sb = dict(start.named_parameters()), dict(end.named_parameters())
        if list(sa) != list(sb) or any(sa[k].shape != sb[k].shape for k in sa):
            raise ValueError("curve endpoints must share one architecture (same parameter names and shapes)")
        self.base = copy.deepcopy(start)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.names = list(sa)
        # (the bend keeps the start's exact strides, see strided_like)
        self.bend = nn.ParameterList(nn.Parameter(torch.empty_like(sa[k]).copy_((sa[k].detach() + sb[k].detach()) / 2))
                                     for k in self.names)
        for k in self.names:
            self.register_buffer(f"start__{_key(k)}", sa[k].detach().clone())
            self.register_buffer(f"end__{_key(k)}", sb[k].detach().clone())
        self._start_buffers: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in start.named_buffers()}
        self._end_buffers: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in end.named_buffers()}

    def endpoint(self, which: str) -> list[torch.Tensor]:
        """The parameters of endpoint ``which`` ("start" or "end"), in ``self.names`` order."""
        return [getattr(self, f"{which}__{_key(k)}") for k in self.names]

    def endpoint_state(self, which: str) -> dict[str, torch.Tensor]:
        """The full state dict (parameters and buffers) of endpoint ``which``: a model loads it as is."""
        bufs = self._start_buffers if which == "start" else self._end_buffers
        return {**bufs, **dict(zip(self.names, self.endpoint(which)))}

    def bend_state(self) -> dict[str, torch.Tensor]:
        """The trained bend as tensors keyed by position ("0", "1", ...), what :meth:`load_bend` reads."""
        return {str(i): b.detach() for i, b in enumerate(self.bend)}

    @torch.no_grad()
    def load_bend(self, state: dict[str, torch.Tensor]) -> "BezierCurve":
        """Set the bend from :meth:`bend_state`'s tensors (a curve fitted elsewhere)."""
        if set(state) != {str(i) for i in range(len(self.bend))}:
            raise ValueError(f"bend state has {len(state)} tensors, the curve {len(self.bend)}")
        for i, b in enumerate(self.bend):
            b.copy_(state[str(i)])
        return self

    def weights(self, t: float) -> dict[str, torch.Tensor]:
        """Parameters of the point at t; differentiable with respect to the bend only."""
        c0, c1, c2 = coefficients(float(t))
        with torch.no_grad():
            fixed = torch._foreach_mul(self.endpoint("start"), c0)
            torch._foreach_add_(fixed, self.endpoint("end"), alpha=c2)
        base = dict(self.base.named_parameters())
        return {k: strided_like(torch.add(f, m, alpha=c1), base[k]) for k, f, m in zip(self.names, fixed, self.bend)}

    def trainable(self) -> list[nn.Parameter]:
        """What :func:`fit` trains: the bend (the endpoints are the models, fixed)."""
        return list(self.bend)

    def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return functional_call(self.base, self.weights(t), (x,))

    @torch.no_grad()
    def point(self, t: float, bn_loader: Iterable | None = None) -> nn.Module:
        """A plain model at t. BatchNorm statistics are recomputed over ``bn_loader`` when given;
        without one, the endpoints keep their own buffers and interior points must have no BatchNorm."""
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must be in [0, 1], got {t}")
        model = copy.deepcopy(self.base)
        for k, w in self.weights(t).items():
            model.get_parameter(k).copy_(w.detach())
        for p in model.parameters():
            p.requires_grad_(True)
        bufs = self._start_buffers if t == 0.0 else self._end_buffers if t == 1.0 else None
        if bufs is not None:
            for k, v in bufs.items():
                model.get_buffer(k).copy_(v)
        if bn_loader is not None:
            update_bn(model, bn_loader)
        elif bufs is None and has_batchnorm(model):
            raise ValueError("an interior point of a BatchNorm model needs bn_loader to recompute its statistics")
        return model


def strided_like(w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``w`` with ``ref``'s exact strides. A binary op on two channels-last tensors comes out NCHW-strided
    where a size-1 axis makes the layout ambiguous (a 1-channel or 1×1 conv); a conv given such a weight
    returns NCHW, and every layer after it pays for copies back (the cnn's curve step: 1.3× slower)."""
    if w.stride() == ref.stride():
        return w
    return torch.empty_strided(ref.shape, ref.stride(), dtype=w.dtype, device=w.device).copy_(w)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def update_bn(model: nn.Module, loader: Iterable) -> nn.Module:
    """Reset and recompute every BatchNorm's running mean/variance as the exact statistics of its
    inputs over the whole loader (train-mode forward, unbiased variance).

    Each BatchNorm runs at momentum 1, so its own kernel leaves the batch's mean and unbiased variance in
    its buffers at no extra pass over the activations; a forward hook merges them across batches in
    float64 (Chan et al.'s pairwise update), which keeps the whole-loader moments exact where an average of
    per-batch variances (the released code's cumulative momentum) drops the spread between batch means."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    moments: dict[nn.Module, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def merge(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        k = inp[0].numel() // inp[0].shape[1]
        if k == 0:  # an empty batch: BatchNorm leaves its buffers as they were
            return
        batch_mean, batch_var = m.running_mean, m.running_var
        assert isinstance(batch_mean, torch.Tensor) and isinstance(batch_var, torch.Tensor)
        mean, m2 = batch_mean.double(), batch_var.double() * (k - 1)
        if m not in moments:
            moments[m] = (k, mean, m2)
            return
        n, mu, acc = moments[m]
        total = n + k
        delta = mean - mu
        moments[m] = (total, mu + delta * (k / total), acc + m2 + delta * delta * (n * k / total))

    momenta = {m: m.momentum for m in bns}
    saved = [(b, b.detach().clone()) for m in bns for b in m.buffers(recurse=False)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = 1.0
    handles = [m.register_forward_hook(merge) for m in bns]
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    try:
        for batch in loader:
            model(batch_inputs(batch).to(device))
        if any(moments.get(m, (0,))[0] < 2 for m in bns):
            raise ValueError("update_bn needs at least two values per channel")
    except BaseException:
        for b, v in saved:  # a failed refresh leaves the statistics as they were
            b.copy_(v)
        raise
    finally:
        for h in handles:
            h.remove()
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    for m in bns:
        n, mean, m2 = moments[m]
        # (the buffers exist: only BatchNorms with track_running_stats are in bns)
        assert m.running_mean is not None and m.running_var is not None and m.num_batches_tracked is not None
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_((m2 / (n - 1)).to(m.running_var.dtype))
        m.num_batches_tracked.zero_()
    return model


def fit(curve: BezierCurve, loader: Iterable, method: Method, epochs: int, optim: OptimConfig,
        seed: int = 0, progress: Progress | None = None) -> BezierCurve:
    """Train the bend with method F, one t ~ U(0, 1) per batch (Algorithm 3); returns the curve."""
    fit_epochs(curve, loader, method, epochs, optim, seed, progress)
    return curve


def fit_epochs(curve: BezierCurve, loader: Iterable, method: Method, epochs: int, optim: OptimConfig,
               seed: int = 0, progress: Progress | None = None) -> list[float]:
    """:func:`fit`'s loop over ``curve.trainable()`` (the bend; more for curves that train more, such as
    the adaptive attack's subspace); returns each epoch's mean loss."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    gen = torch.Generator().manual_seed(seed)
    opt, sched = optim.build(curve.trainable(), epochs)
    curve.train()
    losses: list[float] = []
    for epoch in range(epochs):
        total, steps = torch.zeros((), dtype=torch.float64), 0  # summed on the device: no host sync per step
        for batch in loader:
            t = float(torch.rand((), generator=gen))
            weights = curve.weights(t)

            def forward(x: torch.Tensor, w: dict[str, torch.Tensor] = weights) -> torch.Tensor:
                return functional_call(curve.base, w, (x,))

            loss = method.loss(forward, batch)
            if optim.l2:
                loss = loss + 0.5 * optim.l2 * sum((w * w).sum() for w in weights.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total.to(loss.device) + loss.detach().double(), steps + 1
        sched.step()
        losses.append(float(total) / max(1, steps))
        if progress is not None:
            progress(epoch + 1, epochs, losses[-1])
    return losses
