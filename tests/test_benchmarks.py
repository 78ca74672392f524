"""The benchmarks' quick modes run, so they never rot."""

import os
import subprocess
import sys
import time

import pytest
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
    assert "missed the common start" not in table, table  # the packed workers' timed windows overlapped


def test_gpu_check_skips_what_its_budget_cannot_fit_and_still_writes_its_table(tmp_path):
    """On a lent GPU the check gets one shot inside a 10-minute command: sections that would not fit say so
    in the table instead of running past the limit and bringing nothing back."""
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--quick", "--budget", "1"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OUT": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "gpu.md").read_text()
    for check in ("device tests", "curve step throughput", "matching and BN refresh", "one TSC round", "packing"):
        assert f"| {check} | skipped:" in table, (check, table)
    assert "| projected GPU-hours | skipped:" in table and "| check took |" in table, table


@pytest.mark.slow
def test_gpu_check_packing_starts_its_workers_together_however_slow_their_start_up(monkeypatch):
    """The packed workers' timed windows must overlap. A fixed lead time (12 s + 2 s per worker on CPU) was
    missed under another job's load, and the row then said the workers missed the common start: the start
    is now given once every worker has warmed up."""
    sys.path.insert(0, "benchmarks")
    try:
        import gpu_check
    finally:
        sys.path.remove("benchmarks")
    slow = gpu_check.worker_cmd
    monkeypatch.setattr(gpu_check, "worker_cmd", lambda *a, **kw: ["bash", "-c", 'sleep 17; exec "$@"', "-", *slow(*a, **kw)])
    monkeypatch.setattr(gpu_check, "DEADLINE", time.perf_counter() + 300)
    monkeypatch.setattr(gpu_check, "ROWS", [])
    gpu_check.packing("cnn", 4, torch.device("cpu"), 0.3, [2])
    (name, value), = gpu_check.ROWS
    assert name.startswith("packing: 2 concurrent") and "missed" not in value and "nan" not in value, value


@pytest.mark.slow
def test_gpu_check_compiled_curve_step_runs_and_matches_eager():
    """The compile variant once failed in every run (torch.compile wrapped the curve's base module, whose
    parameter names functional_call then no longer found): it must give a rate, after the compiled logits
    matched eager ones."""
    sys.path.insert(0, "benchmarks")
    try:
        import gpu_check
    finally:
        sys.path.remove("benchmarks")
    gpu_check.DEADLINE = float("inf")
    gpu_check.ROWS.clear()
    rate = gpu_check.run_worker("cnn", 8, torch.device("cpu"), 0.5, compile_=True, timeout=280)
    assert rate > 0
    (name, value), = gpu_check.ROWS
    assert name == "curve step cnn b8 compiled = eager" and float(value.split()[-1]) < 5e-2, gpu_check.ROWS


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
