import numpy as np
import pytest
import torch

from tscray.data import DATASETS, Loader, clean_subset, load
from tscray.data.embedded import MEAN, STD


def test_embedded_fashion_mnist_is_class_balanced_uint8():
    d = load("fashion-mnist-embedded")
    assert d.train.x.shape == (10000, 1, 28, 28) and d.test.x.shape == (2000, 1, 28, 28)
    assert d.train.x.dtype == torch.uint8 and d.num_classes == 10 and d.in_channels == 1
    assert torch.equal(torch.bincount(d.train.y), torch.full((10,), 1000))
    assert torch.equal(torch.bincount(d.test.y), torch.full((10,), 200))
    x = d.train.x.double() / 255
    assert abs(x.mean() - MEAN[0]) < 1e-3 and abs(x.std() - STD[0]) < 1e-3


def test_subset_per_class_and_unknown_name():
    d = load("fashion-mnist-embedded", train_per_class=5, test_per_class=2)
    assert len(d.train) == 50 and len(d.test) == 20
    with pytest.raises(KeyError, match="fashion-mnist-embedded"):
        DATASETS.get("cifar-100")


def test_image_size_resizes_the_embedded_images_for_nets_that_pool_below_28_px():
    """torchvision vgg11_bn pools 28 px down to 0 (five 2x poolings); 32 px carries it to 1."""
    native = load("fashion-mnist-embedded", train_per_class=5, test_per_class=2)
    big = load("fashion-mnist-embedded", train_per_class=5, test_per_class=2, image_size=32)
    assert big.train.x.shape == (50, 1, 32, 32) and big.test.x.shape == (20, 1, 32, 32)
    assert big.train.x.dtype == torch.uint8 and torch.equal(big.train.y, native.train.y)
    assert big.input_hw == (32, 32) and big.prep.crop_padding == 2
    assert torch.equal(load("fashion-mnist-embedded", train_per_class=5, image_size=28).train.x, native.train.x)
    # resizing keeps the image: mean brightness within 1%
    assert abs(big.train.x.double().mean() - native.train.x.double().mean()) < 0.01 * native.train.x.double().mean()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="image_size"):
            load("fashion-mnist-embedded", image_size=bad)


def test_clean_subset_is_seeded_random_and_sized():
    a, b, c = clean_subset(10000, 0.05, 0), clean_subset(10000, 0.05, 0), clean_subset(10000, 0.05, 1)
    assert len(a) == 500 and torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a.tolist())) == 500
    with pytest.raises(ValueError, match="ratio"):
        clean_subset(100, 0.0, 0)


def test_loader_batches_shuffles_and_augments_reproducibly(embedded):
    ld = Loader(embedded.train, embedded.prep, 128, shuffle=True, augment=True, seed=3)
    batches = list(ld)
    assert len(batches) == len(ld) == -(-len(embedded.train) // 128)
    assert sum(len(y) for _, y in batches) == len(embedded.train)
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
    again = next(iter(Loader(embedded.train, embedded.prep, 128, shuffle=True, augment=True, seed=3)))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert not torch.equal(next(iter(ld))[1], y)  # a new epoch reshuffles


def test_random_crop_shifts_images_within_padding():
    from tscray.data import Preprocess
    prep = Preprocess(mean=(0.0,), std=(1.0,), crop_padding=2)
    x = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 3, 3] = 255
    out = prep.augment(x, torch.Generator().manual_seed(0))
    pos = (out[:, 0] == 255).flatten(1).float().argmax(1)
    rows, cols = pos // 8, pos % 8
    assert rows.min() >= 1 and rows.max() <= 5 and cols.min() >= 1 and cols.max() <= 5
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5
    assert np.all((out == 255).flatten(1).sum(1).numpy() == 1)
