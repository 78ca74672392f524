"""Shared test helpers: small models with randomised BatchNorm statistics and a clean loader."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: with two tests at once (xdist), a spinning thread steals the
# other test's core (a 2 s spec verification took 170 s). Set before torch loads; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# Two threads on CI's two cores; one each when pytest-xdist runs two tests at once (the README's `-n 2`).
torch.set_num_threads(int(os.environ.get("TSCRAY_TEST_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that lowers torch's thread count (to pin a result) gives the next test the configured count back."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu",
                     help="torch device for the device-sensitive tests (marked `device`): cpu (default) or cuda[:N]; "
                          "`pytest --device cuda -m device` is the CUDA test mode")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device the `device`-marked tests run on; they skip cleanly when it is CUDA and none is present."""
    name = request.config.getoption("--device")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda, but CUDA is not available")
    if dev.type == "cuda":  # exact-comparison tests must not run in TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return dev


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN running stats, affine parameters and biases, so tests can't pass on defaults 0/1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith(("running_mean", "bias")) or (name.endswith("weight") and t.dim() == 1):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model


@pytest.fixture
def embedded():
    from tscray.data import load
    return load("fashion-mnist-embedded", train_per_class=60, test_per_class=20)


# --- a test attack with a resource ----------------------------------------------------------------------

class PatternAttack:
    """A test attack whose trigger is a seeded random patch computed as a resource (counts computations)."""

    made = 0

    @staticmethod
    def make():
        from tscray.attacks.base import Attack

        class Pattern(Attack):
            name = "test-pattern"

            def __init__(self, size: int = 4) -> None:
                self.size, self.patch = size, None

            def resource_params(self, rate):
                return {"size": self.size}

            def make_resource(self, dataset, rate, target, seed, device="cpu", progress=None):
                PatternAttack.made += 1
                gen = torch.Generator().manual_seed(seed)
                c = dataset.in_channels
                return {"patch": torch.randint(0, 256, (c, self.size, self.size), generator=gen, dtype=torch.uint8)}

            def load_resource(self, tensors):
                self.patch = tensors["patch"]

            @property
            def ready(self):
                return self.patch is not None

            def apply(self, x):
                x = x.clone()
                x[..., :self.size, :self.size] = self.patch
                return x
        return Pattern


@pytest.fixture
def pattern_attack():
    from tscray.attacks import ATTACKS
    ATTACKS.register("test-pattern")(PatternAttack.make())
    PatternAttack.made = 0
    yield PatternAttack
    del ATTACKS._items["test-pattern"]


# --- the reduced setting of the attacks' slow proofs, with one clean reference model shared by all ----


def reduced_recipe(epochs: int = 8):
    from tscray.attacks import TrainRecipe
    from tscray.optim import OptimConfig
    return TrainRecipe(epochs, 128, OptimConfig(lr=0.05))


@pytest.fixture(scope="session")
def reduced():
    """3,000 training and 500 test images of the embedded data."""
    from tscray.data import load
    return load("fashion-mnist-embedded", train_per_class=300, test_per_class=50)


@pytest.fixture(scope="session")
def reduced_clean(reduced):
    """A clean cnn trained with the reduced recipe (8 epochs): the ACC reference and the model a trigger
    must not fool on its own."""
    from tscray.attacks import build, train_backdoored
    return train_backdoored(reduced, "cnn", build("badnets"), 0.0, target=0, seed=0, recipe=reduced_recipe()).model


# --- the defenses' end-to-end proofs: one BadNets model at the reduced setting, shared by every defense ---


@pytest.fixture(scope="session")
def badnets_reduced(reduced):
    """A BadNets (10%, target 0) cnn trained with the reduced recipe on 3,000 images, the defender's clean
    set (a seeded random 5% of the full embedded training set = 500 images, disjoint from nothing: the
    defender's data is clean by definition) and the model's ACC/ASR before any defense.

    Returns ``(backdoored, clean, before)`` where ``backdoored.evaluate`` measures ACC/ASR."""
    from tscray import attacks, data
    from tscray.defenses import CleanData

    bd = attacks.train_backdoored(reduced, "cnn", attacks.build("badnets"), 0.1, target=0, seed=0,
                                  recipe=reduced_recipe(10))
    full = data.load("fashion-mnist-embedded")
    clean = CleanData(full.train.subset(data.clean_subset(len(full.train), 0.05, seed=1)), full.prep)
    return bd, clean, bd.evaluate(bd.model)


@pytest.fixture
def say(capsys, request):
    """Show a measured number in the CI log: printed past pytest's capture in a serial run, and listed at
    the end of the run in every run (an xdist worker's output does not reach the log)."""
    def emit(msg: str) -> None:
        request.node.user_properties.append(("measured", msg))
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            with capsys.disabled():
                print(msg, flush=True)
    return emit


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [f"{r.nodeid}: {msg.strip()}" for key in ("passed", "failed") for r in terminalreporter.stats.get(key, [])
             if getattr(r, "when", "") == "call" for name, msg in getattr(r, "user_properties", ()) if name == "measured"]
    if lines:
        terminalreporter.section("measured")
        for line in lines:
            terminalreporter.write_line(line)


# --- shared by the defenses' tests ------------------------------------------------------------------------

# the smallest shape of each supervised architecture a defense test builds (any other at its defaults)
TINY_ARCH = {"mlp": dict(image_size=28, hidden=(16,)), "cnn": dict(widths=(8, 8, 16, 16)),
             "preactresnet18": dict(num_blocks=(1, 1, 1, 1)), "vgg19_bn": dict(cfg=(8, "M", 16, "M"), hidden=16)}


def supervised_archs() -> list[str]:
    from tscray import models
    return [n for n in models.names() if not n.startswith("simclr-")]


def assert_same_state(a, b) -> None:
    """Two models' state dicts are bitwise equal, key by key."""
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def assert_runs_on(arch: str, name: str, embedded, **cfg) -> None:
    """Defense ``name`` (paper preset with ``cfg``) runs on a tiny ``arch`` and returns a finite classifier."""
    from tscray import defenses, models
    from tscray.defenses import CleanData
    from tscray.methods import build as method

    torch.manual_seed(0)
    model = models.build(arch, 10, in_channels=1, **TINY_ARCH.get(arch, {}))
    d = defenses.get(name)
    if d.check_model:
        d.check_model(model)
    tiny = CleanData(embedded.train.subset(torch.arange(4)), embedded.prep)
    res = d.run(model, tiny, method("supervised"), d.make_config("paper", **cfg))
    out = res.model.eval()(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
