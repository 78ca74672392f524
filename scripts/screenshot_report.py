"""Render a ``tscray report`` and screenshot its index.html with headless Chromium, to look at it.

    python scripts/screenshot_report.py synthetic /tmp/rep-syn        # 13 attacks x 2 rates x 3 seeds, all defenses
    python scripts/screenshot_report.py synthetic-ssl /tmp/rep-ssl        # the same plus SimCLR rows for 3 attacks
    python scripts/screenshot_report.py docs/ablation_small/rows.csv /tmp/rep-abl   # real rows (CSV or Parquet)

Writes the report to OUT and ``OUT/screenshot.png`` (``--width``/``--height`` set the window; Chromium:
``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ATTACKS = ("badnets", "blended", "lf", "ssba", "sbl", "sbl-blended", "sapa", "lc", "narcissus", "sig", "wanet",
           "input-aware", "adaptive")
# per defense: (ACC drop, ASR multiplier on the attack's ASR, seconds)
DEFENSES = {"fp": (0.8, 0.35, 40), "nc": (1.5, 0.3, 300), "nad": (1.2, 0.25, 90), "mcr": (0.5, 0.9, 120),
            "anp": (4.0, 0.3, 60), "ft-sam": (0.9, 0.3, 110), "i-bau": (3.5, 0.2, 80), "sau": (4.5, 0.05, 200),
            "fst": (1.4, 0.15, 70), "finetune": (0.6, 0.7, 30), "zoo-new": (2.0, 0.5, 10)}


def synthetic(ssl: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    methods = ["supervised"] + (["simclr"] if ssl else [])
    for method in methods:
        for attack in (ATTACKS if method == "supervised" else ATTACKS[:3]):
            for rate in (0.05, 0.01):
                strength = float(rng.uniform(70, 100))
                for seed in range(3):
                    base = dict(sweep="syn", trial_id=f"{attack}{rate}{seed}", dataset="cifar10", method=method,
                                arch="resnet18", attack=attack, poison_rate=rate, seed=seed, stage="final",
                                round=1, defense_config="{}")
                    acc0 = 93.5 + rng.normal(0, 0.3)
                    rows.append({**base, "defense": "none", "acc": acc0, "asr": strength + rng.normal(0, 1)})
                    for d, (drop, mult, secs) in DEFENSES.items():
                        t = 0.4 if d == "mcr" else None
                        row = {**base, "defense": d, "t": t, "acc": acc0 - drop + rng.normal(0, 0.4),
                               "asr": float(np.clip(strength * mult * rng.uniform(0.3, 1.7), 0, 100)),
                               "defense_seconds": secs * rng.uniform(0.9, 1.1)}
                        if d == "nc":
                            flagged = [str(k) for k in range(10) if rng.uniform() < (0.5 if k == 0 else 0.05)]
                            row |= {"nc_flagged": ",".join(flagged), "nc_anomaly_index": rng.uniform(1, 4)}
                        if d == "fp":
                            row |= {"fp_pruned": int(rng.integers(100, 400)), "fp_units": 512}
                        rows.append(row)
                    for t in np.round(np.arange(0.1, 1.0, 0.1), 1):
                        rows.append({**base, "defense": "mcr", "t": t, "acc": acc0 - 0.5, "defense_seconds": 120.0,
                                     "asr": float(np.clip(strength * (0.95 - 0.3 * (0.5 - abs(t - 0.5))), 0, 100))})
                    for e in (1, 2, 3):
                        for t in np.round(np.arange(0.1, 1.0, 0.1), 1):
                            dip = max(0.0, 1 - abs(t - 0.45) / 0.35)
                            asr = strength * (1 - dip * (0.55 + 0.15 * e)) + rng.normal(0, 2)
                            rows.append({**base, "defense": "tsc", "e_tsc": e, "t": t, "round": e,
                                         "acc": acc0 - 1.2 * e * dip - rng.uniform(0, 0.5),
                                         "asr": float(np.clip(asr, 0, 100)), "defense_seconds": 180.0 * e,
                                         "defense_config": json.dumps({"rounds": e, "t": float(t)})})
    df = pd.DataFrame(rows)
    return df.drop_duplicates(subset=["method", "attack", "poison_rate", "seed", "defense", "e_tsc", "t"])


def load(src: str) -> pd.DataFrame:
    if src in ("synthetic", "synthetic-ssl"):
        return synthetic(ssl=src == "synthetic-ssl")
    p = Path(src)
    return pd.read_parquet(p) if p.suffix == ".parquet" or p.is_dir() else pd.read_csv(p)


def screenshot(index: Path, png: Path, width: int, height: int) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        sys.exit("no chromium on PATH: apt-get install chromium")
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={png}", f"--window-size={width},{height}", index.resolve().as_uri()],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", help="synthetic, synthetic-ssl, or a rows CSV / Parquet file or directory")
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=2000)
    ap.add_argument("--no-report", action="store_true", help="only screenshot OUT/index.html")
    args = ap.parse_args()
    if not args.no_report:
        from tscray.report import make_report

        rep = make_report(load(args.rows), args.out, "png", title=f"tscray report: {args.rows}")
        print("\n".join(str(p) for p in rep.tables + rep.figures))
    png = args.out / "screenshot.png"
    screenshot(args.out / "index.html", png, args.width, args.height)
    print(png)


if __name__ == "__main__":
    main()
