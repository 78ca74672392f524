"""The tests marked ``kernels`` hold under another CPU kernel set and thread count, not only on the machine
that wrote them.

Exact invariances (permute-then-invert, curve endpoints) and thresholds on trained values depend on which
float kernels ran: a user's CPU may lack the vector extensions of ours, or run another thread count, and
per-channel reductions or a trained trigger then differ in the last bits (issue 14, row 12: two tests that
passed here failed elsewhere). This test reruns every ``kernels``-marked test in a fresh interpreter with
ATen's portable kernels (``ATEN_CPU_CAPABILITY=default``), oneDNN capped at AVX2 and another thread count
(one where this run uses two, two where xdist workers use one), so such a difference fails here first. Mark a test ``kernels`` when its assertion depends on float results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OTHER_MACHINE = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1",
                 "MKL_NUM_THREADS": "1"}
PROBE = "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"


def other_machine_env() -> dict[str, str]:
    """This environment with portable kernels, and the tests' thread count changed: 2 where this run's is 1
    (pytest-xdist workers), else 1. (The count conftest configured, not the live one: some tests lower it.)"""
    configured = os.environ.get("TSCRAY_TEST_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(OTHER_MACHINE)
    env["TSCRAY_TEST_THREADS"] = "2" if configured == "1" else "1"
    return env


def test_the_other_machine_really_runs_other_kernels():
    """The environment switch takes effect: portable kernels, one thread (else the rerun proves nothing)."""
    out = subprocess.run([sys.executable, "-c", PROBE], env=other_machine_env(), capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["DEFAULT", "1"], out


@pytest.mark.slow
def test_kernel_sensitive_tests_pass_under_another_kernel_set_and_thread_count(say):
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "kernels", "-p", "no:cacheprovider", "--no-header",
           "-o", "addopts=", str(ROOT / "tests")]
    proc = subprocess.run(cmd, cwd=ROOT, env=other_machine_env(), capture_output=True, text=True, timeout=3600)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    say("\n" + "\n".join(tail.strip().splitlines()[-3:]))
    assert proc.returncode == 0, f"kernel-sensitive tests failed with {OTHER_MACHINE}:\n{tail}"
    assert " passed" in proc.stdout and " deselected" in proc.stdout, tail
