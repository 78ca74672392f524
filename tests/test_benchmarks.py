"""The benchmarks' quick modes run, so they never rot."""

import subprocess
import sys


def test_sweep_reuse_plan_only_prints_the_figure5_counts():
    out = subprocess.run([sys.executable, "benchmarks/sweep_reuse.py", "--plan-only"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "curve fits executed: 552 (46 per attack)" in out.stdout
    assert "naive per-trial run: 1296 (108 per attack)" in out.stdout


def test_derive_spec_benchmark_runs_and_meets_its_budget_on_small_models():
    out = subprocess.run([sys.executable, "benchmarks/derive_spec.py", "--models", "cnn", "torchvision:mobilenet_v2",
                          "--repeat", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("cnn", "torchvision:mobilenet_v2"))]
    assert len(rows) == 2 and all(r.endswith("ok") for r in rows), out.stdout
