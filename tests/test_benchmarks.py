"""The benchmarks' quick modes run, so they never rot."""

import os
import subprocess
import sys

import torch


def test_sweep_reuse_plan_only_prints_the_figure5_counts():
    out = subprocess.run([sys.executable, "benchmarks/sweep_reuse.py", "--plan-only"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "curve fits executed: 552 (46 per attack)" in out.stdout
    assert "naive per-trial run: 1296 (108 per attack)" in out.stdout


def test_derive_spec_benchmark_runs_on_small_models():
    """The benchmark runs and prints a timed row per model. Whether a row is within its budget is the
    benchmark's reading on a quiet machine, not a unit test's: under another test's load it was not."""
    out = subprocess.run([sys.executable, "benchmarks/derive_spec.py", "--models", "cnn", "torchvision:mobilenet_v2",
                          "--repeat", "1"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("cnn", "torchvision:mobilenet_v2"))]
    assert len(rows) == 2 and all(r[-1] in ("ok", "OVER") and float(r[5]) > 0 for r in rows), out.stdout


def test_gpu_check_quick_runs_on_cpu_and_writes_its_table(tmp_path):
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--quick"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OUT": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "gpu.md").read_text()
    for check in ("device test mode", "curve step cnn b16 bf16", "matching (un-align)", "BN refresh",
                  "packing: 2 concurrent", "one TSC round", "projected GPU-hours: ablation", "projected GPU-hours: table1"):
        assert check in table, check
    assert "FAILED" not in table and "failed:" not in table, table


def test_plan_scale_prints_the_dry_run_beside_make_plan():
    out = subprocess.run([sys.executable, "benchmarks/plan_scale.py", "--sizes", "600", "60000"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["600", "60000"], out.stdout
    assert [r[3] for r in rows] == ["1", str(min(8, len(os.sched_getaffinity(0))))], out.stdout  # workers
    assert "failed" not in out.stdout


def test_bn_refresh_benchmark_prints_both_methods_and_ours_is_exact():
    out = subprocess.run([sys.executable, "benchmarks/bn_refresh.py", "--quick"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = [line.split() for line in out.stdout.splitlines() if line.startswith("cnn")]
    released_s, ours_s, _, released_err, ours_err = (float(v.rstrip("x")) for v in row[1:])
    assert released_s > 0 and ours_s > 0
    assert ours_err < 1e-4, out.stdout  # float64 moments, up to float32 per-batch rounding
