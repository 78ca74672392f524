"""Planning at scale: trials per second and peak memory of a sweep's plan (what `--dry-run` does) at growing
sizes, each size in a fresh process so peak memory is its own.

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


def one(n: int) -> dict[str, float]:
    from tscray.config import validate
    from tscray.plan import make_plan
    from tscray.sweep import describe_plan

    seeds = max(1, n // 60)
    raw = {"name": "scale", "grid": {"attack": ["badnets", "blended"], "defense": ["tsc"], "rounds": [1, 2, 3],
                                     "t": [round(0.05 + 0.09 * i, 2) for i in range(10)], "seed": list(range(seeds))}}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    spec = validate(raw, check_data=False)
    t1 = time.perf_counter()
    plan = make_plan(spec)
    t2 = time.perf_counter()
    describe_plan(plan)
    t3 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"trials": len(plan.trials), "steps": len(plan.steps), "validate_s": t1 - t0, "plan_s": t2 - t1,
            "describe_s": t3 - t2, "peak_gb": peak / 1e6, "plan_gb": (peak - base) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    print(f"{'trials':>9} {'steps':>9} {'validate s':>10} {'plan s':>8} {'describe s':>10} {'trials/s':>9} "
          f"{'peak GB':>8} {'us/trial':>9}")
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True)
        if out.returncode:
            print(f"{n:>9} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        total = r["validate_s"] + r["plan_s"] + r["describe_s"]
        print(f"{r['trials']:>9} {r['steps']:>9} {r['validate_s']:>10.2f} {r['plan_s']:>8.2f} {r['describe_s']:>10.2f} "
              f"{r['trials'] / total:>9.0f} {r['peak_gb']:>8.2f} {1e6 * r['plan_s'] / r['trials']:>9.1f}")


if __name__ == "__main__":
    main()
