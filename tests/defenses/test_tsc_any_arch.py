"""TSC on an architecture nobody wrote a spec for: a user's CNN, named as ``module:builder`` like a user
would, gets a derived spec, and TSC removes a real BadNets backdoor from it (the reduced setting shared
with the other defenses' proofs: 3,000 training images, 10 epochs, the defender's 500 clean images).

The net mixes what hand-written specs get wrong: a residual sum, a channel concatenation feeding a
depthwise conv, and a flattened head. Measured (1 thread, under load): the derived spec has 3 groups (the
residual sum makes stem and block one), 1 concatenated; backdoored ACC 80.2 / ASR 97.8 (18 s); TSC at
E 2, t 0.5, 60 curve epochs: ACC 82.8 / ASR 4.7 (85 s). One measurement so far: the bounds keep a wide
margin (ASR < 25, ACC within 6 points).
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from conftest import reduced_recipe

from tscray import attacks, defenses, methods
from tscray.symmetry import permute, random_permutation

pytestmark = pytest.mark.slow

USER_NETS = textwrap.dedent('''
    import torch
    from torch import nn

    class UserNet(nn.Module):
        def __init__(self, num_classes=10, in_channels=1):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                      nn.ReLU(), nn.MaxPool2d(2))
            self.res = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
            self.side = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32),
                                    nn.ReLU(), nn.MaxPool2d(2))
            self.mix = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(2))
            self.head = nn.Linear(32 * 2 * 2, num_classes)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.res(x))
            x = torch.cat([x, self.side(x)], 1)
            return self.head(torch.flatten(self.mix(self.dw(x)), 1))

    def build(num_classes, in_channels=3):
        return UserNet(num_classes, in_channels)
''')


@pytest.fixture(scope="module")
def user_arch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import sys

    folder: Path = tmp_path_factory.mktemp("user_nets")
    (folder / "tscray_user_cnn.py").write_text(USER_NETS)
    sys.path.insert(0, str(folder))
    yield "tscray_user_cnn:build"
    sys.path.remove(str(folder))


def test_tsc_removes_badnets_from_a_user_cnn(user_arch: str, reduced, badnets_reduced, say) -> None:
    _, clean, _ = badnets_reduced
    t0 = time.time()
    bd = attacks.train_backdoored(reduced, user_arch, attacks.build("badnets"), 0.1, target=0, seed=0,
                                  recipe=reduced_recipe(10))
    before = bd.evaluate(bd.model)
    spec = bd.model.permutation_spec()
    say(f"\n{user_arch}: {len(spec.groups())} groups, {len(spec.concat)} concatenated; backdoored ACC "
        f"{before['acc']:.1f} ASR {before['asr']:.1f} ({time.time() - t0:.0f}s)")
    assert spec.concat and before["asr"] >= 90.0

    model = bd.model.eval()
    moved = permute(model, random_permutation(model, torch.Generator().manual_seed(0))).eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(moved(x), model(x), rtol=1e-5, atol=1e-5)

    tsc = defenses.get("tsc")
    cfg = tsc.make_config("paper", rounds=2, t=0.5, curve_epochs=60, batch_size=64)
    t0 = time.time()
    res = tsc.run(bd.model, clean, methods.build("supervised"), cfg, bd.evaluate)
    after = bd.evaluate(res.model)
    say(f"TSC (E 2, t 0.5, 60 curve epochs): ACC {after['acc']:.1f} ASR {after['asr']:.1f} "
        f"({time.time() - t0:.0f}s)")
    assert after["asr"] < 25.0, (before, after)
    assert after["acc"] >= before["acc"] - 6.0, (before, after)
