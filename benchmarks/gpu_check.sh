#!/usr/bin/env bash
# The one-command GPU check: correctness on the device, curve-step speed (fp32 / bf16 / channels-last /
# compile, MFU), matching and BN refresh, packing several steps per GPU, one paper-size TSC round, and the
# projected GPU-hours of Figure 5 and Table 1. Prints one table; copies it to $OUT/gpu.md when $OUT is set.
#   bash benchmarks/gpu_check.sh            # on a GPU machine (no Ray, no MLflow needed), ~5 minutes (285 s on an H200)
#   bash benchmarks/gpu_check.sh --quick    # on CPU at toy sizes, < 5 minutes (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python3 benchmarks/gpu_check.py "$@"
