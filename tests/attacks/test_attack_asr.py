"""Each trigger-only attack really backdoors a model (reduced setting: 3,000 embedded images, small CNN).

Thresholds were measured at this setting (1-2 threads) and leave margin; the full-scale numbers are in
``docs/attacks_small/``. The clean model (same recipe, no poison) is the reference for ACC and for the
trigger's ASR on a model that never saw it. Attacks with a resource or their own training prove themselves
in their own test modules.
"""

import pytest
import torch

from tscray import attacks
from tscray.optim import OptimConfig

pytestmark = pytest.mark.slow

RECIPE = dict(batch_size=128, optim=OptimConfig(lr=0.05))

# attack: (epochs, min ASR, max ACC drop vs the clean model). ACC is measured on 500 test images, so the drop
# of one trained pair moves by a point or two with the seed, the thread count and the CPU's kernels. Measured
# ASR / ACC drop over seeds 0-3 at 1 thread, then the test's own pair at 2 threads here and on CI's machine:
#   badnets 97.6-99.3 / 1.0 0.8 1.4 0.0, -0.2        blended 100 / 3.0 1.0 2.4 2.6, 1.8, CI 3.6
#   wanet   83.3-88.7 / 1.6 -0.4 0.4 1.0, 0.4
# The max drop is about mean + 4 std of those (blended's 3.5 failed on CI at 3.6).
CASES = {
    "badnets": (8, 90.0, 3.0),
    "blended": (8, 90.0, 6.0),
    # SIG is clean-label: at 10% every target-class image carries the signal, so clean target-class test
    # images (which lack it) are under-recognised; the full-scale drop is 6.5 points (docs/attacks_small).
    "sig": (8, 70.0, 12.0),      # (84.9 / 7.8)
    # WaNet's sub-pixel warp takes longer to learn at this scale (62% ASR after 8 epochs)
    "wanet": (14, 70.0, 3.5),
}
# rerun by tests/test_kernels.py under another CPU kernel set and thread count
KERNELS = {"badnets", "blended"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.kernels] if n in KERNELS else [])
                                  for n in CASES])
def test_attack_backdoors_the_model_and_keeps_clean_accuracy(name, reduced, reduced_clean):
    epochs, min_asr, max_drop = CASES[name]
    torch.manual_seed(0)
    atk = attacks.build(name)
    bd = attacks.train_backdoored(reduced, "cnn", atk, 0.1, 0, 0, attacks.TrainRecipe(epochs, **RECIPE))
    got, ref = bd.evaluate(bd.model), bd.evaluate(reduced_clean)
    print(f"\n{name}: backdoored ACC {got['acc']:.2f} ASR {got['asr']:.2f} | clean model ACC {ref['acc']:.2f} "
          f"ASR {ref['asr']:.2f}")
    assert got["asr"] >= min_asr
    assert ref["asr"] < 30.0  # the trigger alone does not fool a clean model
    assert got["acc"] >= ref["acc"] - max_drop
    if atk.clean_label:
        assert torch.equal(bd.poisoned.data.y[:len(reduced.train)], reduced.train.y)
