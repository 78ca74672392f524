"""The quickstart demo: backdoor a small CNN on the embedded data, purify it with TSC, MCR beside it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from tscray import attacks, checkpoint, data, defenses, methods
from tscray.defenses import CleanData
from tscray.optim import OptimConfig

# Scaled to the embedded data on a laptop CPU; the paper's recipe otherwise (t 0.4, lr 0.02 cosine,
# 5 fine-tune epochs at lr 1e-4 after every round, 5% clean data, random not class-balanced).
FULL = {"train_epochs": 12, "rounds": 4, "curve_epochs": 120, "mcr_finetune_epochs": 40, "batch_size": 128}
QUICK = {"train_epochs": 4, "rounds": 2, "curve_epochs": 20, "mcr_finetune_epochs": 5, "batch_size": 128}


def run_demo(out: Path, quick: bool = False, device: str = "cpu", log: Callable[[str], None] = print) -> int:
    """Run the demo, write models and a results table under ``out``; returns an exit code."""
    s = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    ds = data.load("fashion-mnist-embedded")
    attack = attacks.build("badnets")
    t0 = time.time()
    log(f"1/3 backdoor: cnn on {ds.name} ({len(ds.train)} images), BadNets 10% poison, target 0, "
        f"{s['train_epochs']} epochs")
    bd = attacks.train_backdoored(ds, "cnn", attack, 0.1, 0, seed=0, device=device,
                                  recipe=attacks.TrainRecipe(s["train_epochs"], 128, OptimConfig(lr=0.05)))
    checkpoint.save_model(bd.model, out / "backdoored.safetensors", arch="cnn", attack="badnets", rate=0.1)
    rows = [{"model": "backdoored", **bd.evaluate(bd.model)}]
    log(f"    backdoored: ACC {rows[0]['acc']:.2f}%  ASR {rows[0]['asr']:.2f}%  ({time.time() - t0:.0f}s)")

    idx = data.clean_subset(len(ds.train), 0.05, seed=0)
    clean = CleanData(ds.train.subset(idx), ds.prep, device)
    sup = methods.build("supervised")
    tsc = defenses.get("tsc")
    cfg = tsc.make_config("paper", rounds=s["rounds"], curve_epochs=s["curve_epochs"], batch_size=s["batch_size"])
    log(f"2/3 TSC: {len(idx)} clean images, E_TSC {cfg.rounds}, t {cfg.t}, {cfg.curve_epochs} curve epochs")
    res = tsc.run(bd.model, clean, sup, cfg, bd.evaluate, lambda m: log("    " + m))
    for r, model in enumerate(res.outputs, 1):
        rows.append({"model": f"tsc E_TSC={r}", **bd.evaluate(model)})
    checkpoint.save_model(res.model, out / "tsc.safetensors", arch="cnn", defense="tsc", config=repr(cfg))

    mcr = defenses.get("mcr")
    mcfg = mcr.make_config("paper", curve_epochs=s["curve_epochs"], finetune_epochs=s["mcr_finetune_epochs"],
                           batch_size=s["batch_size"])
    log(f"3/3 MCR (for comparison): t {mcfg.t}, {mcfg.finetune_epochs} fine-tune epochs, "
        f"{mcfg.curve_epochs} curve epochs")
    mres = mcr.run(bd.model, clean, sup, mcfg, bd.evaluate)
    rows.append({"model": "mcr", **bd.evaluate(mres.model)})

    (out / "results.json").write_text(json.dumps({"rows": rows, "records": res.records + mres.records,
                                                  "settings": s}, indent=1, default=str))
    print(f"\n{'model':<16}{'ACC':>9}{'ASR':>9}")
    for row in rows:
        print(f"{row['model']:<16}{row['acc']:8.2f}%{row['asr']:8.2f}%")
    print(f"\nTSC is a success when ASR < 15% with little ACC lost. {time.time() - t0:.0f}s in all.")
    print(f"Models (safetensors) and results.json are in {out.resolve()}")
    return 0
