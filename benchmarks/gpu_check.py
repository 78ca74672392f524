"""The one-command GPU check (issue 13): correctness on the device, then the speeds the paper-scale sweeps
depend on, then the GPU-hours they project to. Prints one Markdown table (and writes it to ``$OUT/gpu.md``
when ``$OUT`` is set). Needs neither Ray nor MLflow: it runs the library from the checkout.

    bash benchmarks/gpu_check.sh            # on a GPU machine, ~8 minutes
    bash benchmarks/gpu_check.sh --quick    # the same script on CPU at toy sizes (CI runs it)

Data: CIFAR-shaped synthetic images (32x32x3, seeded); speeds only, never accuracy. MFU is measured
FLOPs (torch's FlopCounterMode on one fp32 curve step) per second over the device's bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
BF16_PEAK = {"H200": 790e12, "H100": 790e12, "A100": 312e12, "L4": 121e12}  # measured / datasheet dense bf16
ROWS: list[tuple[str, str]] = []


def row(name: str, value: Any) -> None:
    ROWS.append((name, str(value)))
    print(f"| {name} | {value} |", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def curve_setup(arch: str, batch: int, device: torch.device, channels_last: bool) -> tuple[Any, Callable[[], Any]]:
    """A curve between two random models of ``arch`` and one training step on a fixed synthetic batch."""
    from tscray import models
    from tscray.curves import BezierCurve
    from tscray.methods import build as method
    from tscray.optim import OptimConfig

    torch.manual_seed(0)
    kw = {"widths": (16, 32, 32, 64)} if arch == "cnn" else {}
    curve = BezierCurve(models.build(arch, 10, 3, **kw), models.build(arch, 10, 3, **kw)).to(device).train()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        curve = curve.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    opt, _ = OptimConfig(lr=0.01).build(curve.trainable(), 1)
    sup = method("supervised")
    ts = torch.rand(10_000, generator=torch.Generator().manual_seed(0)).tolist()
    state = {"i": 0}

    def step() -> None:
        t = ts[state["i"] % len(ts)]
        state["i"] += 1
        loss = sup.loss(lambda inp: curve(inp, t), (x, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return curve, step


def step_flops(arch: str, batch: int, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    _, step = curve_setup(arch, batch, device, False)
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def images_per_s(step: Callable[[], Any], batch: int, device: torch.device, seconds: float, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += 1
        if n % 5 == 0:
            sync(device)
            if time.perf_counter() - t0 >= seconds:
                break
    sync(device)
    return n * batch / (time.perf_counter() - t0)


def throughput(arch: str, batches: list[int], device: torch.device, seconds: float, compile_: bool) -> dict[str, float]:
    """Curve-step images/s per (batch, precision, layout); returns the best bf16 rate per batch."""
    peak = peak_flops(device)
    best: dict[str, float] = {}
    for batch in batches:
        flops = step_flops(arch, batch, device) / batch
        settings = [("fp32", False, False), ("bf16", True, False), ("bf16+channels-last", True, True)]
        if compile_:
            settings.append(("bf16+channels-last+compile", True, True))
        for name, bf16, cl in settings:
            try:
                curve, step = curve_setup(arch, batch, device, cl)
                if name.endswith("compile"):
                    curve.base = torch.compile(curve.base)  # functional_call goes through the compiled module
                ctx = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else _null()
                with ctx:
                    rate = images_per_s(step, batch, device, seconds)
            except Exception as err:  # report and go on: the table is the product
                row(f"curve step {arch} b{batch} {name}", f"failed: {type(err).__name__}: {str(err)[:80]}")
                continue
            mfu = f", MFU {100 * rate * flops / peak:.1f}%" if peak else ""
            row(f"curve step {arch} b{batch} {name}", f"{rate:,.0f} img/s ({flops / 1e9:.2f} GFLOP/img{mfu})")
            if bf16:
                best[str(batch)] = max(best.get(str(batch), 0.0), rate)
            else:
                best.setdefault(f"fp32-{batch}", rate)
    return best


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def synthetic_clean(n: int, device: torch.device) -> Any:
    from tscray.data.tensors import ImageData, Preprocess
    from tscray.defenses import CleanData

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    prep = Preprocess(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), crop_padding=4, hflip=True)
    return CleanData(ImageData(x, y), prep, device)


def matching_and_bn(arch: str, n: int, device: torch.device) -> None:
    from tscray import models
    from tscray.curves import BezierCurve
    from tscray.symmetry import match

    clean = synthetic_clean(n, device)
    torch.manual_seed(0)
    a, b = models.build(arch, 10, 3).to(device), models.build(arch, 10, 3).to(device)
    sync(device)
    t0 = time.perf_counter()
    match(a, a, clean.loader(256, 0, shuffle=False), "unalign")
    sync(device)
    row(f"matching (un-align) {arch}, {n} images", f"{time.perf_counter() - t0:.2f} s")
    curve = BezierCurve(a, b).to(device)
    t0 = time.perf_counter()
    curve.point(0.5, clean.loader(256, 1, shuffle=False))
    sync(device)
    row(f"BN refresh at a curve point {arch}, {n} images", f"{time.perf_counter() - t0:.2f} s")


def tsc_round(arch: str, n: int, epochs: int, paper_epochs: int, device: torch.device) -> float:
    """One whole TSC round (both curves, matching, BN refreshes, fine-tune) at ``epochs`` curve epochs;
    returns the seconds projected to ``paper_epochs``."""
    from tscray import defenses, models
    from tscray.methods import build as method

    clean = synthetic_clean(n, device)
    torch.manual_seed(0)
    model = models.build(arch, 10, 3).to(device)
    tsc = defenses.get("tsc")
    cfg = tsc.make_config("paper", rounds=1, t=0.4, curve_epochs=epochs)
    ctx = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if device.type == "cuda" else _null()
    sync(device)
    t0 = time.perf_counter()
    with ctx:
        tsc.run(model, clean, method("supervised"), cfg)
    sync(device)
    secs = time.perf_counter() - t0
    scaled = secs * paper_epochs / epochs
    row(f"one TSC round {arch}, {n} clean images, {epochs} curve epochs (bf16)" if device.type == "cuda" else
        f"one TSC round {arch}, {n} clean images, {epochs} curve epochs (fp32)",
        f"{secs:.1f} s; x{paper_epochs / epochs:g} → {scaled:.0f} s at the paper's {paper_epochs} epochs")
    return scaled


def packing(arch: str, batch: int, device: torch.device, seconds: float, counts: list[int]) -> None:
    """Total curve-step images/s of 1, 2, 4 concurrent processes sharing the device (fractional GPUs)."""
    for k in counts:
        cmd = [sys.executable, __file__, "--worker", arch, str(batch), str(device), str(seconds)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1" if device.type == "cpu" else "4"}
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(k)]
        rates = []
        for p in procs:
            out, _ = p.communicate(timeout=600)
            try:
                rates.append(float(out.strip().splitlines()[-1]))
            except (ValueError, IndexError):
                rates.append(math.nan)
        row(f"packing: {k} concurrent step process(es), {arch} b{batch} bf16",
            f"{sum(rates):,.0f} img/s total ({', '.join(f'{r:,.0f}' for r in rates)})")


def worker(arch: str, batch: int, device: str, seconds: float) -> None:
    dev = torch.device(device)
    _, step = curve_setup(arch, batch, dev, dev.type == "cuda")
    ctx = torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    with ctx:
        print(images_per_s(step, batch, dev, seconds))


def projection(rate: float, round_s: float, quick: bool) -> None:
    """GPU-hours of Figure 5 (sweeps/ablation.yaml) and Table 1 (sweeps/table1.yaml) from their plans' step
    counts: training images each step processes, over the measured bf16 rate (TSC rounds at the measured
    round time)."""
    from tscray.config import load_spec
    from tscray.plan import make_plan

    for name in ("ablation", "table1"):
        spec = load_spec(REPO / "sweeps" / f"{name}.yaml", check_data=False)
        plan = make_plan(spec)
        train_n = 50_000  # CIFAR-10
        clean_n = int(train_n * spec.defense.clean_ratio)
        images, rounds = 0.0, 0
        for step in plan.steps.values():
            p = step.params
            if step.kind == "backdoor":
                images += p["epochs"] * train_n
            elif step.kind == "attack_resource":
                images += 20 * train_n  # surrogate training, roughly; the attacks' own budgets vary
            elif step.kind == "tsc_round":
                rounds += 1
            elif step.kind in ("tsc_stage1",):
                pass  # counted in the measured round time
            else:  # one whole defense or MCR step: its epoch-like budgets over the clean set
                cfg = p.get("config", {})
                epochs = sum(v for k, v in cfg.items() if k.endswith("epochs") and isinstance(v, (int, float)))
                epochs += cfg.get("iterations", 0) * cfg.get("batch_size", 0) / max(1, clean_n)
                images += max(1, epochs) * clean_n
        hours = images / rate / 3600 + rounds * round_s / 3600
        row(f"projected GPU-hours: {name} ({len(plan.trials)} trials, {plan.curve_fits(plan.count_by_kind())} curve "
            f"fits, {rounds} TSC rounds)", f"{hours:,.2f} h on one device" + (" (toy rates: meaningless)" if quick else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, toy sizes, < 5 minutes")
    ap.add_argument("--device", default=None)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        arch, batch, device, seconds = args.worker
        worker(arch, int(batch), device, float(seconds))
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    quick = args.quick or device.type == "cpu"
    arch = "cnn" if quick else "preactresnet18"
    print("| check | result |\n|---|---|", flush=True)
    row("date", time.strftime("%Y-%m-%d %H:%M"))
    row("device", torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    row("torch / python", f"{torch.__version__} / {platform.python_version()}")
    t0 = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "device",
                            "--device", str(device), "tests/test_device.py"] + (["-k", "cnn or matching or loader"] if quick else []),
                           cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                           timeout=900)
    summary = (tests.stdout.strip().splitlines() or ["(no output)"])[-1]
    row(f"CUDA test mode (pytest --device {device} -m device)" if device.type == "cuda" else
        "device test mode on CPU (pytest -m device)", f"{summary} in {time.perf_counter() - t0:.0f} s"
        + ("" if tests.returncode == 0 else " **FAILED**"))
    if tests.returncode:
        print(tests.stdout[-3000:], file=sys.stderr)
    seconds = 1.0 if quick else 6.0
    best = throughput(arch, [16] if quick else [128, 256], device, seconds, compile_=not quick)
    matching_and_bn(arch, 256 if quick else 2500, device)
    packing(arch, 16 if quick else 256, device, seconds, [1, 2] if quick else [1, 2, 4])
    round_s = tsc_round(arch, 256 if quick else 2500, 1 if quick else 20, 200, device)
    rate = max((v for k, v in best.items() if not k.startswith("fp32")), default=0.0) or next(iter(best.values()), 1.0)
    projection(rate, round_s, quick)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        text = "| check | result |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in ROWS) + "\n"
        (Path(out) / "gpu.md").write_text(text)
        (Path(out) / "gpu.json").write_text(json.dumps(dict(ROWS), indent=1))


if __name__ == "__main__":
    main()
