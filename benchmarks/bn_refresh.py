"""BatchNorm refresh at a curve point: tscray's ``update_bn`` against the released TSC code's way, side by side.

The released code (Garipov et al.'s ``bn_update``, which TSC's repository reuses) resets each BatchNorm and
runs a train-mode forward over the clean set with the momentum set to ``b / (n + b)`` per batch: a
cumulative average of per-batch means and of per-batch unbiased variances. Ours leaves each batch's
moments in the buffers (momentum 1) and merges them in float64, so the variance is that of the whole
set. Both do one train-mode forward per batch; the rows alternate in one loop so machine noise hits both
alike, and the ratio of medians is printed (goal: >= 1.00). The error column is each method's largest
relative deviation from float64 moments of every BatchNorm's inputs, gathered in a separate pass.

    python benchmarks/bn_refresh.py [--archs cnn preactresnet18] [--images 2500] [--batch 256] [--repeats 5]
    python benchmarks/bn_refresh.py --quick     # toy sizes, a few seconds (CI runs this)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Iterable

import torch
from torch import nn

from tscray.curves import update_bn
from tscray.models import build

SHAPES = {"cnn": (1, 28), "mlp": (1, 28)}


def _bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def released_bn_update(model: nn.Module, loader: Iterable[torch.Tensor]) -> nn.Module:
    """The released code's refresh: cumulative momentum ``b / (n + b)`` over a train-mode forward."""
    bns = _bns(model)
    momenta = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
    model.train()
    seen = 0
    for x in loader:
        b = x.shape[0]
        for m in bns:
            m.momentum = b / (seen + b)
        model(x)
        seen += b
    for m, mom in momenta.items():
        m.momentum = mom
    return model


@torch.no_grad()
def exact_moments(model: nn.Module, loader: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Float64 mean and unbiased variance of every BatchNorm's inputs over the loader (train-mode forward)."""
    bns = _bns(model)
    sums = {m: [0, 0.0, 0.0] for m in bns}

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        x = inp[0].double().transpose(0, 1).reshape(inp[0].shape[1], -1)
        s = sums[m]
        s[0] += x.shape[1]
        s[1] = s[1] + x.sum(1)
        s[2] = s[2] + (x * x).sum(1)

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    model.train()
    for x in loader:
        model(x)
    for h in handles:
        h.remove()
    out = []
    for m in bns:
        n, s1, s2 = sums[m]
        mean = s1 / n
        out.append((mean, (s2 - n * mean * mean) / (n - 1)))
    return out


def _error(model: nn.Module, exact: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Largest relative deviation of the model's BatchNorm buffers from the exact moments."""
    worst = 0.0
    for m, (mean, var) in zip(_bns(model), exact):
        assert m.running_mean is not None and m.running_var is not None
        worst = max(worst, float((m.running_mean.double() - mean).abs().max() / mean.abs().max().clamp_min(1e-12)),
                    float((m.running_var.double() - var).abs().max() / var.abs().max().clamp_min(1e-12)))
    return worst


def measure(arch: str, images: int, batch: int, repeats: int, channels_last: bool) -> dict[str, tuple[float, float]]:
    """Median seconds and error of each method for ``arch`` at a point halfway between two random models."""
    ch, size = SHAPES.get(arch, (3, 32))
    torch.manual_seed(0)
    a, b = build(arch, 10, in_channels=ch), build(arch, 10, in_channels=ch)
    model = copy.deepcopy(a)
    with torch.no_grad():  # an interior point: weights between two unrelated models, stale statistics
        for p, pa, pb in zip(model.parameters(), a.parameters(), b.parameters()):
            p.copy_(0.5 * pa + 0.5 * pb)
    x = torch.randn(images, ch, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    loader = [x[i:i + batch] for i in range(0, images, batch)]
    exact = exact_moments(copy.deepcopy(model), loader)
    methods: dict[str, Callable[[nn.Module, list[torch.Tensor]], nn.Module]] = {
        "released": released_bn_update, "tscray": update_bn}
    times: dict[str, list[float]] = {k: [] for k in methods}
    errors: dict[str, float] = {}
    for i in range(repeats + 1):  # the first round warms up
        for name in (list(methods) if i % 2 == 0 else list(methods)[::-1]):
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            methods[name](m, loader)
            if i:
                times[name].append(time.perf_counter() - t0)
            errors[name] = _error(m, exact)
    return {k: (statistics.median(v), errors[k]) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["cnn", "preactresnet18"])
    ap.add_argument("--images", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--quick", action="store_true", help="toy sizes: the cnn, 256 images, batch 64, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.archs, args.images, args.batch, args.repeats = ["cnn"], 256, 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"BN refresh, {args.images} images, batch {args.batch}, {torch.get_num_threads()} thread(s)"
          f"{', channels-last' if args.channels_last else ''}, median of {args.repeats}")
    print(f"{'arch':16s} {'released s':>11s} {'tscray s':>9s} {'speed':>6s} {'released err':>13s} {'tscray err':>11s}")
    for arch in args.archs:
        r = measure(arch, args.images, args.batch, args.repeats, args.channels_last)
        (tr, er), (tt, et) = r["released"], r["tscray"]
        print(f"{arch:16s} {tr:11.3f} {tt:9.3f} {tr / tt:5.2f}x {er:13.1e} {et:11.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
