"""How much work tscray's step sharing saves, counted and timed.

1. Counts, for the Figure 5 grid shape (12 attacks × 9 t × 3 E_TSC, one dataset/arch/seed): curve fits
   the plan executes vs a naive per-trial run (every trial fits all its own curves).
2. Times, side by side in one run on a small CPU grid: ``tscray sweep`` (Ray, shared steps) vs the same
   trials run independently one after another (no sharing, no Ray), and prints the wall-time ratio.

    python benchmarks/sweep_reuse.py [--plan-only] [--curve-epochs 20]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tscray.config import Grid, SweepSpec, validate
from tscray.plan import Plan, Trial, make_plan
from tscray.steps import Context, run_local
from tscray.store import Store

ATTACKS = ["badnets", "blended", "sig", "lc", "wanet", "input-aware", "ssba", "lf", "sbl", "sbl-blended",
           "narcissus", "sapa"]
TS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def count_figure5() -> None:
    spec = SweepSpec(name="fig5", grid=Grid(dataset=("cifar10",), arch=("preactresnet18",), attack=tuple(ATTACKS),
                                             poison_rate=(0.05,), t=tuple(TS), rounds=(1, 2, 3)))
    plan = make_plan(spec)
    fits, naive = Plan.curve_fits(plan.count_by_kind()), Plan.curve_fits(plan.naive_count_by_kind())
    n = len(ATTACKS)
    print(f"Figure 5 grid: {len(plan.trials)} trials ({n} attacks x {len(TS)} t x 3 E_TSC)")
    print(f"  curve fits executed: {fits} ({fits // n} per attack)")
    print(f"  naive per-trial run: {naive} ({naive // n} per attack)")
    print(f"  ratio naive/tscray : {naive / fits:.2f}")


def small_spec(storage: str, curve_epochs: int) -> SweepSpec:
    return validate({
        "name": "bench", "storage": storage,
        "grid": {"defense": ["tsc"], "t": [0.3, 0.4, 0.5], "rounds": [1, 2]},
        "train": {"epochs": 2, "batch_size": 128, "lr": 0.05, "arch_kw": {"widths": [16, 32, 32, 64]}},
        "defense": {"clean_ratio": 0.05, "tsc": {"curve_epochs": curve_epochs, "finetune_epochs": 1,
                                                  "batch_size": 128}},
        "resources": {"workers": 2, "threads": 1}})


def _independent(args: tuple[dict, str]) -> None:
    import torch

    torch.set_num_threads(1)
    trial, storage = Trial.from_dict(args[0]), args[1]
    run_local(trial.steps, Context(Store(storage)))


def time_side_by_side(curve_epochs: int) -> None:
    from tscray.sweep import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        spec = small_spec(str(Path(tmp) / "sweep"), curve_epochs)
        plan = make_plan(spec)
        t0 = time.perf_counter()
        run_sweep(spec, out=io.StringIO())
        t_sweep = time.perf_counter() - t0

        t0 = time.perf_counter()
        # each trial alone in its own empty store (nothing shared), 2 processes x 1 thread like the sweep
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(_independent, [(t.to_dict(), str(Path(tmp) / f"naive-{i}")) for i, t in enumerate(plan.trials)]))
        t_naive = time.perf_counter() - t0
    steps = sum(len(t.steps) for t in plan.trials)
    print(f"small CPU grid: {len(plan.trials)} trials, {len(plan.steps)} distinct steps vs {steps} naive")
    print(f"  tscray sweep (Ray, 2 workers x 1 thread, shared steps): {t_sweep:7.1f} s")
    print(f"  independent trials (2 processes x 1 thread, no sharing): {t_naive:7.1f} s")
    print(f"  ratio independent/tscray: {t_naive / t_sweep:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan-only", "--skip-timing", dest="plan_only", action="store_true",
                   help="print the Figure 5 counts only (seconds; what CI runs)")
    p.add_argument("--curve-epochs", type=int, default=20)
    a = p.parse_args()
    count_figure5()
    if not a.plan_only:
        time_side_by_side(a.curve_epochs)


if __name__ == "__main__":
    main()
