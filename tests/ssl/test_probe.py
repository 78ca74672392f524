"""Linear probe and kNN monitor: they tell a trained encoder from a random one, and count ASR correctly."""

import pytest
import torch
from torch import nn

from tscray import methods, models
from tscray.data.tensors import ImageData, Loader
from tscray.optim import OptimConfig
from tscray.ssl import PatchTrigger, ProbeEvaluator, add_target_class, knn_predict
from tscray.train import train

WIDTHS = (8, 16, 16, 32)


def encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build("simclr-cnn", 10, in_channels=1, widths=WIDTHS, proj_dim=16)


def test_probe_acc_of_a_trained_encoder_beats_a_random_one(embedded):
    """The trained backbone is a supervised CNN's (a quick, sure way to good features); the probe must see it."""
    torch.manual_seed(0)
    cnn = models.build("cnn", 10, in_channels=1, widths=WIDTHS)
    train(cnn, Loader(embedded.train, embedded.prep, 64, shuffle=True, augment=True), methods.build("supervised"),
          4, OptimConfig(lr=0.05))
    trained = encoder()
    trained.backbone.load_state_dict({k: v for k, v in cnn.state_dict().items() if not k.startswith("head.")})
    ev = ProbeEvaluator(embedded.train, embedded.test, embedded.prep, epochs=30)
    rand, good = ev(encoder()), ev(trained)
    print(f"\nprobe random encoder: {rand}\nprobe trained backbone: {good}")
    assert good["acc"] > rand["acc"] + 5 and good["knn_acc"] > rand["knn_acc"] + 5
    assert ev(trained) == good  # seeded: the same encoder gets the same numbers


class TriggerSpotter(nn.Module):
    """Features: one-hot of class 3 when the trigger corner is bright, else of the image's true class."""

    def __init__(self, embedded) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.bright = (250 / 255 - embedded.prep.mean[0]) / embedded.prep.std[0]
        self.lookup = {self.key(x): int(y) for x, y in
                       zip(embedded.prep.normalize(embedded.test.x), embedded.test.y)}

    @staticmethod
    def key(x: torch.Tensor) -> tuple:
        return tuple(x[..., :-4, :].flatten().tolist())  # the rows above the trigger identify the image

    def features(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[:, 0, -2:, -2:].mean((1, 2)) > self.bright
        labels = torch.tensor([self.lookup[self.key(r)] for r in x])
        labels = torch.where(corner, 3, labels)
        return nn.functional.one_hot(labels, 10).float() + 0.01 * x.flatten(1)[:, :10] + self.w


def test_asr_counts_only_non_target_images_and_hits_the_target(embedded):
    spotter = TriggerSpotter(embedded)
    ev = ProbeEvaluator(embedded.test, embedded.test, embedded.prep, trigger=PatchTrigger(4, margin=0), target=3,
                        epochs=50, lr=0.1)
    assert len(ev.poisoned) == int((embedded.test.y != 3).sum())
    out = ev(spotter)
    assert out["acc"] > 95 and out["asr"] == 100.0 and out["knn_asr"] == 100.0
    ev_other = ProbeEvaluator(embedded.test, embedded.test, embedded.prep, trigger=PatchTrigger(4, margin=0), target=5,
                              epochs=50, lr=0.1)
    assert ev_other(spotter)["asr"] < 5.0  # triggered images land on class 3, not 5
    with pytest.raises(ValueError, match="outside the downstream labels"):
        ProbeEvaluator(embedded.test, embedded.test, embedded.prep, target=10)


def test_knn_predict_on_clusters():
    bank = nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    query = nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.02, 1.0]]), dim=1)
    assert knn_predict(bank, labels, query, 2, k=2).tolist() == [0, 1]
    assert knn_predict(bank, labels, query, 2, k=10).tolist() == [0, 1]  # k clipped to the bank


def test_add_target_class_appends_pretraining_images_as_a_new_label(embedded):
    down = embedded.test.subset(torch.nonzero(embedded.test.y < 5).flatten())
    merged, label = add_target_class(down, embedded.train, source_target=7, n=6)
    assert label == 5 and len(merged) == len(down) + 6
    assert torch.equal(merged.x[-6:], embedded.train.x[embedded.train.y == 7][:6])
    assert (merged.y[-6:] == 5).all() and torch.equal(merged.y[:len(down)], down.y)
    with pytest.raises(ValueError, match="no images of class"):
        add_target_class(down, ImageData(embedded.train.x[:3], torch.zeros(3)), source_target=7)
