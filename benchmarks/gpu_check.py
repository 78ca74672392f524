"""The one-command GPU check (issue 13): correctness on the device, then the speeds the paper-scale sweeps
depend on, then the GPU-hours they project to. Prints one Markdown table (and writes it to ``$OUT/gpu.md``
when ``$OUT`` is set). Needs neither Ray nor MLflow: it runs the library from the checkout.

    bash benchmarks/gpu_check.sh            # on a GPU machine, ~5 minutes (285 s on an H200; --budget caps it)
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
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
BF16_PEAK = {"H200": 790e12, "H100": 790e12, "A100": 312e12, "L4": 121e12}  # measured / datasheet dense bf16
ROWS: list[tuple[str, str]] = []
DEADLINE = 0.0  # perf_counter() past which the remaining sections are skipped (see --budget)


def row(name: str, value: Any) -> None:
    """Print one table row and rewrite ``$OUT/gpu.md`` with every row so far: a run cut off at its limit
    still brings back what it measured."""
    ROWS.append((name, str(value)))
    print(f"| {name} | {value} |", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        text = "| check | result |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in ROWS) + "\n"
        (Path(out) / "gpu.md").write_text(text)
        (Path(out) / "gpu.json").write_text(json.dumps(dict(ROWS), indent=1))


def left() -> float:
    """Seconds left before the deadline."""
    return DEADLINE - time.perf_counter()


def section(name: str, need: float, fn: Callable[[], Any]) -> Any:
    """Run one section if ``need`` seconds are left, else say it was skipped; a failure is a row, not a crash."""
    if left() < need:
        row(name, f"skipped: {left():.0f} s of the time budget left, ~{need:.0f} s needed")
        return None
    try:
        return fn()
    except Exception as err:  # the table is the product: report and go on
        row(name, f"failed: {type(err).__name__}: {str(err)[:160]}")
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def compiled_curve(curve: Any) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """``curve(x, t)`` through torch.compile. t enters as a 0-dim tensor so one graph serves every t (a Python
    float would be a guarded constant: a recompile per t); the Bernstein weights are curves.py's."""
    from torch.func import functional_call

    from tscray.curves import coefficients

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c0, c1, c2 = coefficients(t)  # type: ignore[arg-type]  # the same arithmetic on a tensor t
        w = {k: c0 * s + c1 * b + c2 * e for k, s, b, e in
             zip(curve.names, curve.endpoint("start"), curve.bend, curve.endpoint("end"))}
        return functional_call(curve.base, w, (x,))

    fn = torch.compile(forward)
    ts: dict[float, torch.Tensor] = {}
    return lambda x, t: fn(x, ts.setdefault(t, torch.tensor(t, device=x.device)))


def curve_setup(arch: str, batch: int, device: torch.device, channels_last: bool,
                compile_: bool = False) -> tuple[Any, Callable[[], Any]]:
    """A curve between two random models of ``arch`` and one training step on a fixed synthetic batch."""
    from tscray import models
    from tscray.curves import BezierCurve
    from tscray.methods import build as method
    from tscray.optim import OptimConfig

    torch.manual_seed(0)
    kw: dict[str, Any] = {"widths": (16, 32, 32, 64)} if arch == "cnn" else {}
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
    forward = compiled_curve(curve) if compile_ else curve
    if compile_:  # same function first: the compiled logits against eager ones, under the autocast the timing uses
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            got, ref = forward(x, 0.3).float(), curve(x, 0.3).float()
        err = float((got - ref).norm() / ref.norm())
        print(f"compiled vs eager logits: relative error {err:.1e}", file=sys.stderr)
        if not err < 5e-2:
            raise AssertionError(f"compiled curve forward differs from eager: relative error {err:.1e}")

    def step() -> None:
        t = ts[state["i"] % len(ts)]
        state["i"] += 1
        loss = sup.loss(lambda inp: forward(inp, t), (x, y))
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
    """Curve-step images/s per (batch, precision, layout); returns them keyed ``"{setting}-{batch}"``."""
    peak = peak_flops(device)
    best: dict[str, float] = {}
    for batch in batches:
        flops = step_flops(arch, batch, device) / batch
        settings = [("fp32", False, False), ("bf16", True, False), ("bf16+channels-last", True, True)]
        if device.type == "cuda":
            settings.append(("bf16+channels-last+cudnn.benchmark", True, True))
        if compile_ and batch == 256:  # once: a compile costs a minute or more of the check's budget
            settings.append(("bf16+channels-last+compile", True, True))
        for name, bf16, cl in settings:
            try:
                if name.endswith("compile"):  # its own process and timeout: compilation can take minutes
                    limit = min(180.0, left() - 60)
                    if limit < 30:
                        row(f"curve step {arch} b{batch} {name}", "skipped: time budget")
                        continue
                    rate = run_worker(arch, batch, device, seconds, compile_=True, timeout=limit)
                else:
                    curve, step = curve_setup(arch, batch, device, cl)
                    ctx = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else _null()
                    torch.backends.cudnn.benchmark = name.endswith("cudnn.benchmark")
                    try:
                        with ctx:
                            rate = images_per_s(step, batch, device, seconds)
                    finally:
                        torch.backends.cudnn.benchmark = False
            except Exception as err:  # report and go on: the table is the product
                row(f"curve step {arch} b{batch} {name}", f"failed: {type(err).__name__}: {str(err)[:120]}")
                continue
            mfu = f", MFU {100 * rate * flops / peak:.1f}%" if peak else ""
            row(f"curve step {arch} b{batch} {name}", f"{rate:,.0f} img/s ({flops / 1e9:.2f} GFLOP/img{mfu})")
            best[f"{name}-{batch}"] = rate
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


def packing(arch: str, batch: int, device: torch.device, seconds: float, counts: list[int]) -> float:
    """Total curve-step images/s of k concurrent processes sharing the device (fractional GPUs); returns the
    gain of the best count over one process. Every worker warms up and says so; once all have, each gets one
    common start time, so the timed windows overlap however long the start-ups took."""
    best, single = 0.0, 0.0
    for k in counts:
        if left() < 60 + 3 * k:
            row(f"packing: {k} concurrent step process(es)", "skipped: time budget")
            continue
        cmd = worker_cmd(arch, batch, device, seconds, compile_=False) + ["--barrier"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1" if device.type == "cpu" else "4"}
        procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(k)]
        ready = _wait_ready(procs, deadline=time.monotonic() + max(30.0, left() - 30))
        start_at = time.time() + 2.0 + 0.5 * k  # all warm and waiting: one common start, however slow the start-ups
        for p in ready:
            p.stdin.write(f"{start_at}\n")
            p.stdin.flush()  # communicate() closes stdin: one left out reads an empty line and exits
        rates, late = [], 0
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(30.0, left() - 30))
                last = out.strip().splitlines()[-1].split()
                rates.append(float(last[0]) if p in ready else math.nan)
                late += last[1:] == ["late"]
            except (ValueError, IndexError):
                rates.append(math.nan)
            except subprocess.TimeoutExpired:
                p.kill()
                rates.append(math.nan)
        total = sum(rates)
        if late == 0 and not math.isnan(total):
            best = max(best, total)
            single = total if k == 1 else single
        row(f"packing: {k} concurrent step process(es), {arch} b{batch} bf16",
            f"{total:,.0f} img/s total ({', '.join(f'{r:,.0f}' for r in rates)})"
            + (f"; {late} worker(s) missed the common start, so the windows did not overlap" if late else ""))
    return best / single if single and best > single else 1.0


def _wait_ready(procs: list[subprocess.Popen], deadline: float) -> set[subprocess.Popen]:
    """The workers that printed their ``ready`` line before ``deadline`` (one that died or hung is left out)."""
    waiting, ready = {p.stdout: p for p in procs}, set()
    while waiting and time.monotonic() < deadline:
        for f in select.select(list(waiting), [], [], max(0.0, deadline - time.monotonic()))[0]:
            p = waiting.pop(f)
            if f.readline().strip() == "ready":
                ready.add(p)
    return ready


def worker_cmd(arch: str, batch: int, device: torch.device, seconds: float, compile_: bool) -> list[str]:
    return [sys.executable, __file__, "--worker", arch, str(batch), str(device), str(seconds)] + (
        ["--compile"] if compile_ else [])


def run_worker(arch: str, batch: int, device: torch.device, seconds: float, compile_: bool, timeout: float) -> float:
    """One curve-step worker process's bf16 images/s; raises on failure or timeout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(worker_cmd(arch, batch, device, seconds, compile_), capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["(no output)"])[-1])
    for line in proc.stderr.splitlines():
        if line.startswith("compiled vs eager"):
            row(f"curve step {arch} b{batch} compiled = eager", line.split(": ", 1)[1])
    return float(proc.stdout.strip().splitlines()[-1])


def worker(arch: str, batch: int, device: str, seconds: float, compile_: bool = False,
           barrier: bool = False) -> None:
    dev = torch.device(device)
    _, step = curve_setup(arch, batch, dev, dev.type == "cuda", compile_)
    ctx = torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    with ctx:
        if not barrier:
            print(images_per_s(step, batch, dev, seconds, warmup=10 if compile_ else 3))
            return
        for _ in range(3):
            step()
        sync(dev)
        print("ready", flush=True)
        start_at = float(sys.stdin.readline())
        wait = start_at - time.time()
        time.sleep(max(0.0, wait))
        print(images_per_s(step, batch, dev, seconds, warmup=0), "late" if wait < 0 else "on-time")


def projection(rate: float, round_s: float, quick: bool, gain: float = 1.0) -> None:
    """GPU-hours of Figure 5 (sweeps/ablation.yaml) and Table 1 (sweeps/table1.yaml) from their plans' step
    counts: training images each step processes, over ``rate`` (the library's default setting at the sweeps'
    batch), TSC rounds at the measured round time; ``gain`` is what packing steps on one device bought."""
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
            f"fits, {rounds} TSC rounds)", f"{hours:,.2f} h on one device, one step at a time"
            + (f"; {hours / gain:,.2f} h with the best packing ({gain:.1f}x)" if gain > 1 else "")
            + (" (toy rates: meaningless)" if quick else ""))


def device_tests(device: torch.device, quick: bool) -> None:
    """tests/test_device.py on ``device``; its log goes to ``$OUT/device_tests.log`` (kept if it times out)."""
    log = Path(os.environ.get("OUT") or REPO / ".gpu_check") / "device_tests.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "device", "--device", str(device),
           "tests/test_device.py"] + (["-k", "cnn or matching or loader"] if quick else [])
    t0 = time.perf_counter()
    with log.open("w") as fh:
        try:
            rc: int | str = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, text=True,
                                           env={**os.environ, "PYTHONPATH": str(REPO)},
                                           timeout=min(900.0, max(60.0, left() * 0.45))).returncode
        except subprocess.TimeoutExpired:
            rc = "timed out"
    lines = log.read_text().strip().splitlines() or ["(no output)"]
    name = (f"CUDA test mode (pytest --device {device} -m device)" if device.type == "cuda" else
            "device test mode on CPU (pytest -m device)")
    row(name, f"{lines[-1]} in {time.perf_counter() - t0:.0f} s" + ("" if rc == 0 else f" **FAILED** ({rc})"))
    if rc != 0:
        print("\n".join(lines[-60:]), file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, toy sizes, < 5 minutes")
    ap.add_argument("--device", default=None)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds the whole check may take; sections that would not fit are skipped and say so "
                         "(default 540 on a GPU, 3600 on CPU)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--barrier", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        arch, batch, device, seconds = args.worker
        worker(arch, int(batch), device, float(seconds), args.compile, args.barrier)
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    quick = args.quick or device.type == "cpu"
    global DEADLINE
    budget = args.budget if args.budget is not None else (3600.0 if device.type == "cpu" else 540.0)
    start = time.perf_counter()
    DEADLINE = start + budget
    arch = "cnn" if quick else "preactresnet18"
    print("| check | result |\n|---|---|", flush=True)
    row("date", time.strftime("%Y-%m-%d %H:%M"))
    row("device", torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    row("torch / python", f"{torch.__version__} / {platform.python_version()}")
    section("device tests", 60, lambda: device_tests(device, quick))
    seconds = 1.0 if quick else 5.0
    best = section("curve step throughput", 60, lambda: throughput(
        arch, [16] if quick else [128, 256, 512], device, seconds, compile_=not quick)) or {}
    section("matching and BN refresh", 30, lambda: matching_and_bn(arch, 256 if quick else 2500, device))
    round_s = section("one TSC round", 60, lambda: tsc_round(arch, 256 if quick else 2500, 1 if quick else 20, 200, device))
    gain = section("packing", 60, lambda: packing(arch, 16 if quick else 256, device, seconds,
                                                  [1, 2] if quick else [1, 2, 4, 8])) or 1.0
    # the library's default on a GPU (bf16, channels-last; steps.py) at the sweeps' batch (256)
    rate = best.get(f"bf16+channels-last-{16 if quick else 256}", 0.0)
    if rate and round_s:
        section("projected GPU-hours", 5, lambda: projection(rate, round_s, quick, gain))
    else:
        row("projected GPU-hours", "skipped: needs the curve-step rate and the round time")
    row("check took", f"{time.perf_counter() - start:.0f} s of a {budget:.0f} s budget")


if __name__ == "__main__":
    main()
