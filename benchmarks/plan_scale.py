"""Planning at scale: trials per second and peak memory of `--dry-run` (validate, then the streaming
:func:`tscray.plan.summarize`) at growing sizes, each in a fresh process so peak memory is its own; and,
side by side, the materialised plan a sweep run makes (`make_plan`, every trial kept; --no-full skips it).

The grid is the worst case for sharing: TSC over E_TSC 1-3 x ten t values x two attacks x N seeds, so
every seed has its own backdoored model and chain of rounds (about 2 distinct steps per trial).
Goal (issue 14): linear in trials; 1,000,000 trials in <= 30 s and <= 1 GB.

    python benchmarks/plan_scale.py [--sizes 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(n: int, full: bool, workers: int | None) -> dict[str, float]:
    from tscray.config import validate
    from tscray.plan import _workers, make_plan, summarize
    from tscray.sweep import describe_plan

    seeds = max(1, n // 60)
    raw = {"name": "scale", "grid": {"attack": ["badnets", "blended"], "defense": ["tsc"], "rounds": [1, 2, 3],
                                     "t": [round(0.05 + 0.09 * i, 2) for i in range(10)], "seed": list(range(seeds))}}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    spec = validate(raw, check_data=False)
    t1 = time.perf_counter()
    summary = summarize(spec, workers=workers)
    describe_plan(summary)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = {"trials": summary.trials, "steps": sum(summary.counts.values()), "validate_s": t1 - t0,
           "dry_s": t2 - t1, "peak_gb": peak / 1e6, "base_gb": base / 1e6, "full_s": float("nan"),
           "workers": workers if workers is not None else _workers(spec), "child_gb": child / 1e6}
    if full:
        t3 = time.perf_counter()
        plan = make_plan(spec)
        out["full_s"] = time.perf_counter() - t3
        assert len(plan.trials) == summary.trials and len(plan.steps) == out["steps"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--no-full", action="store_true", help="time only the dry run (not make_plan too)")
    ap.add_argument("--workers", type=int, help="dry-run processes (default: tscray's choice, 1 below 50k points)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, not args.no_full, args.workers)))
        return
    print(f"{'trials':>9} {'steps':>9} {'validate s':>10} {'workers':>7} {'dry run s':>9} {'trials/s':>9} {'us/trial':>9} "
          f"{'peak GB':>8} {'worker GB':>9} {'make_plan s':>11} {'ratio':>6}")
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), *(["--no-full"] if args.no_full or n > 100_000 else []),
               *(["--workers", str(args.workers)] if args.workers else [])]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{n:>9} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        total = r["validate_s"] + r["dry_s"]
        print(f"{r['trials']:>9} {r['steps']:>9} {r['validate_s']:>10.2f} {r['workers']:>7} {r['dry_s']:>9.2f} "
              f"{r['trials'] / total:>9.0f} {1e6 * r['dry_s'] / r['trials']:>9.1f} {r['peak_gb']:>8.2f} "
              f"{r['child_gb'] if r['workers'] > 1 else float('nan'):>9.2f} {r['full_s']:>11.2f} {r['full_s'] / r['dry_s']:>6.2f}")
    print("peak GB: the driver process, imports included; worker GB: the largest forked worker's peak RSS, which "
          "counts the pages it shares with the driver. make_plan (every trial kept, one process) is skipped above "
          "100k trials; ratio = make_plan s / dry run s.")


if __name__ == "__main__":
    main()
