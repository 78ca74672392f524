"""Time to derive a permutation spec from a model's graph and verify it exact, per architecture.

For each model: trace + shape propagation + group derivation, then the verification (float64 copy with
randomised BatchNorm statistics, one random permutation, outputs compared, inverse checked). The
hand-written spec of a registered architecture is verified in the same loop for comparison. Goal:
ResNet-50 derived and verified in under 5 s on 2 CPU cores.

    python benchmarks/derive_spec.py [--models resnet50 torchvision:densenet121 ...] [--size 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tscray import models
from tscray.models import external
from tscray.symmetry.derive import derivation, verify

DEFAULT = ["resnet50", "preactresnet18", "vgg19_bn", "torchvision:resnet50", "torchvision:wide_resnet50_2",
           "torchvision:densenet121", "torchvision:mobilenet_v2", "torchvision:efficientnet_b0",
           "torchvision:googlenet"]
KW = {"torchvision:googlenet": {"aux_logits": False, "init_weights": True}}
BUDGET_S = 5.0


def plain_model(name: str) -> torch.nn.Module:
    """The model without a derived spec attached (external builders are called directly)."""
    if external.is_external(name):
        fn = external.builder(name)
        extra = {"weights": None} if name.startswith(external.TORCHVISION) else {}
        return fn(num_classes=10, **extra, **KW.get(name, {}))
    return models.build(name, 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT)
    ap.add_argument("--size", type=int, default=32, help="example image size (default 32)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; example input 2x3x{args.size}x{args.size}")
    print(f"{'model':32} {'groups':>6} {'concat':>6} {'derive s':>9} {'verify s':>9} {'total s':>8} "
          f"{'hand verify s':>13}  budget {BUDGET_S:.0f} s")
    for name in args.models:
        model = plain_model(name)
        x = torch.randn(2, 3, args.size, args.size)
        d_times, v_times, h_times = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            d = derivation(model, x)
            t1 = time.perf_counter()
            verify(model, d.spec, x)
            t2 = time.perf_counter()
            d_times.append(t1 - t0)
            v_times.append(t2 - t1)
            hand = getattr(model, "permutation_spec", None)
            if hand is not None:
                t3 = time.perf_counter()
                verify(model, hand(), x)
                h_times.append(time.perf_counter() - t3)
        dm, vm = statistics.median(d_times), statistics.median(v_times)
        hv = f"{statistics.median(h_times):13.2f}" if h_times else f"{'-':>13}"
        ok = "ok" if dm + vm <= BUDGET_S else "OVER"
        print(f"{name:32} {len(d.spec.groups()):6d} {len(d.spec.concat):6d} {dm:9.2f} {vm:9.2f} {dm + vm:8.2f} "
              f"{hv}  {ok}")


if __name__ == "__main__":
    main()
