"""The benchmarks' quick modes run, so they never rot."""

import subprocess
import sys


def test_sweep_reuse_plan_only_prints_the_figure5_counts():
    out = subprocess.run([sys.executable, "benchmarks/sweep_reuse.py", "--plan-only"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "curve fits executed: 552 (46 per attack)" in out.stdout
    assert "naive per-trial run: 1296 (108 per attack)" in out.stdout
