"""Cost of a Bézier curve-fitting step relative to a plain training step, measured side by side.

For each architecture, plain SGD steps on a model and curve steps (sample t, build θ(t), forward,
backward into the bend, SGD) on a curve between two such models alternate in one loop on the same
batch, so machine noise hits both alike; the ratio of their medians is printed. Goal: <= 1.10.

    python benchmarks/curve_step.py [--archs cnn preactresnet18] [--batch 64] [--steps 12] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tscray.curves import BezierCurve
from tscray.methods import build as build_method
from tscray.models import build
from tscray.optim import OptimConfig

SHAPES = {"cnn": (1, 28), "mlp": (1, 28)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(arch: str, batch: int, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Median seconds of a plain step and of a curve step, interleaved."""
    ch, size = SHAPES.get(arch, (3, 32))
    torch.manual_seed(0)
    plain = build(arch, 10, in_channels=ch).to(device).train()
    curve = BezierCurve(build(arch, 10, in_channels=ch), build(arch, 10, in_channels=ch)).to(device).train()
    opt_cfg = OptimConfig(lr=0.01)
    opt_p, _ = opt_cfg.build(plain.parameters(), 1)
    opt_c, _ = opt_cfg.build(curve.bend.parameters(), 1)
    sup = build_method("supervised")
    x = torch.randn(batch, ch, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    gen = torch.Generator().manual_seed(0)

    def plain_step() -> None:
        loss = sup.loss(plain, (x, y))
        opt_p.zero_grad(set_to_none=True)
        loss.backward()
        opt_p.step()

    def curve_step() -> None:
        t = float(torch.rand((), generator=gen))
        loss = sup.loss(lambda inp: curve(inp, t), (x, y))
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_c.step()

    times: dict[str, list[float]] = {"plain": [], "curve": []}
    for i in range(warmup + steps):
        for name, fn in (("plain", plain_step), ("curve", curve_step)) if i % 2 == 0 else \
                (("curve", curve_step), ("plain", plain_step)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return statistics.median(times["plain"]), statistics.median(times["curve"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["cnn", "preactresnet18"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {a.batch}, "
          f"{a.steps} measured steps each (interleaved)")
    print(f"{'arch':<16}{'plain s/step':>14}{'curve s/step':>14}{'ratio':>8}")
    worst = 0.0
    for arch in a.archs:
        tp, tc = measure(arch, a.batch, a.steps, a.warmup, device)
        worst = max(worst, tc / tp)
        print(f"{arch:<16}{tp:14.4f}{tc:14.4f}{tc / tp:8.3f}", flush=True)
    print(f"worst ratio {worst:.3f} (goal <= 1.10): {'OK' if worst <= 1.10 else 'ABOVE GOAL'}")


if __name__ == "__main__":
    main()
