import torch

from tscray.attacks import build, poison_test, poison_train


def test_badnets_trigger_is_a_white_square_bottom_right(embedded):
    x = embedded.train.x[:4]
    out = build("badnets").apply(x)
    assert torch.all(out[..., -3:, -3:] == 255)
    assert torch.equal(out[..., :-3, :], x[..., :-3, :]) and torch.equal(out[..., :, :-3], x[..., :, :-3])
    assert not torch.equal(out, x)


def test_poisoning_is_seeded_relabels_non_target_images_only(embedded):
    atk = build("badnets")
    a = poison_train(embedded.train, atk, 0.1, target=3, seed=0)
    b = poison_train(embedded.train, atk, 0.1, target=3, seed=0)
    c = poison_train(embedded.train, atk, 0.1, target=3, seed=1)
    assert len(a.poison_idx) == round(0.1 * len(embedded.train))
    assert torch.equal(a.poison_idx, b.poison_idx) and not torch.equal(a.poison_idx, c.poison_idx)
    assert torch.all(embedded.train.y[a.poison_idx] != 3) and torch.all(a.data.y[a.poison_idx] == 3)
    untouched = torch.ones(len(embedded.train), dtype=torch.bool)
    untouched[a.poison_idx] = False
    assert torch.equal(a.data.x[untouched], embedded.train.x[untouched])
    assert torch.equal(a.data.y[untouched], embedded.train.y[untouched])


def test_poisoned_test_set_excludes_target_class(embedded):
    pt = poison_test(embedded.test, build("badnets"), target=0)
    assert len(pt) == int((embedded.test.y != 0).sum())
    assert torch.all(pt.y == 0) and torch.all(pt.x[..., -3:, -3:] == 255)
