"""The reduced setting every attack's slow proof uses, with one clean reference model shared by all of them."""

import pytest

from tscray.optim import OptimConfig


def reduced_recipe(epochs: int = 8):
    from tscray.attacks import TrainRecipe
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
