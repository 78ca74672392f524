"""The proof on real data: TSC removes a real BadNets backdoor from a small CNN; MCR does not.

Scaled to CPU as the issue allows: embedded Fashion-MNIST (10k train images), BadNets at 10% poison,
the paper's supervised recipe (lr 0.02 cosine, 5 fine-tune epochs at lr 1e-4 after every round, a
random 5% clean subset = 500 images) with t = 0.5, E_TSC = 2 and 100 curve epochs. Batch 64 keeps
~8 steps per curve epoch, close to the paper's ~10 (2,500 images at batch 256); at batch 128 (4 steps)
round 2 left ASR at 10-16%. Measured (1 thread): backdoored ACC 89.4 / ASR 99.9; TSC rounds 1-2:
ASR 23.8 → 7.3, ACC 86.7 → 86.1 (3.3 points below). On another machine of the same kind: 1 thread,
backdoored 89.8 / 99.8, ASR 23.6 → 8.0, ACC 87.0 → 86.1 (3.7 below); 2 threads, backdoored 89.7 / 99.8,
ASR 55.1 → 11.4, ACC 87.1 → 85.9 (3.8 below). So ACC is asserted within 6 points (5 left 1.2 of margin).
"""

import time

import pytest

from tscray import attacks, data, defenses, methods
from tscray.defenses import CleanData
from tscray.optim import OptimConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backdoored():
    ds = data.load("fashion-mnist-embedded")
    t0 = time.time()
    bd = attacks.train_backdoored(ds, "cnn", attacks.build("badnets"), rate=0.1, target=0, seed=0,
                                  recipe=attacks.TrainRecipe(12, 128, OptimConfig(lr=0.05)))
    m = bd.evaluate(bd.model)
    m["seconds"] = time.time() - t0
    clean = CleanData(ds.train.subset(data.clean_subset(len(ds.train), 0.05, seed=1)), ds.prep)
    return bd, m, clean


def test_badnets_implants_a_real_backdoor(backdoored, say):
    _, m, _ = backdoored
    say(f"\nbackdoored cnn: ACC {m['acc']:.2f}  ASR {m['asr']:.2f}  ({m['seconds']:.0f}s)")
    assert m["asr"] >= 90.0 and m["acc"] >= 85.0


def test_tsc_removes_the_backdoor_keeping_accuracy(backdoored, say):
    bd, before, clean = backdoored
    tsc = defenses.get("tsc")
    cfg = tsc.make_config("paper", rounds=2, t=0.5, curve_epochs=100, batch_size=64)
    t0 = time.time()
    res = tsc.run(bd.model, clean, methods.build("supervised"), cfg, bd.evaluate)
    rows = [r for r in res.records if r["stage"] == "output"]
    for r in rows:
        say(f"TSC round {r['round']}: ACC {r['acc']:.2f}  ASR {r['asr']:.2f}")
    say(f"TSC: {time.time() - t0:.0f}s for {cfg.rounds} rounds")
    final = bd.evaluate(res.model)
    assert final["asr"] < 15.0, final
    assert final["acc"] >= before["acc"] - 6.0, (final, before)
    assert rows[0]["asr"] > rows[-1]["asr"]  # removal progresses over rounds


def test_mcr_beside_it(backdoored, say):
    """MCR at the same scale (reported, not asserted: at this scale it leaves the backdoor in, as the paper
    and our calibration found); asserted only to produce a working model."""
    bd, before, clean = backdoored
    mcr = defenses.get("mcr")
    cfg = mcr.make_config("paper", t=0.4, curve_epochs=100, finetune_epochs=40, batch_size=128)
    res = mcr.run(bd.model, clean, methods.build("supervised"), cfg, bd.evaluate)
    m = bd.evaluate(res.model)
    say(f"MCR t=0.4: ACC {m['acc']:.2f}  ASR {m['asr']:.2f}")
    assert m["acc"] > 50.0
