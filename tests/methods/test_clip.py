import copy
import math
import time

import pytest
import torch

from tscray.curves import BezierCurve, fit
from tscray.data import Loader, load
from tscray.data.captions import BRIGHTNESS, WordTokenizer, attributes, caption_dataset
from tscray.methods import METHODS
from tscray.methods import build as method
from tscray.methods.clip import Clip, TextTower, retrieval_accuracy
from tscray.models import build
from tscray.optim import OptimConfig
from tscray.train import train


@pytest.fixture(scope="module")
def captions():
    return caption_dataset(load("fashion-mnist-embedded", train_per_class=20, test_per_class=5), seed=0)


def _tokens(n: int, vocab: int = 12, length: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tok = torch.randint(2, vocab, (n, length), generator=gen)
    tok[:, 3:] *= torch.rand(n, 1, generator=gen) < 0.5  # some padded captions
    return tok


def test_registered_and_validates():
    assert "clip" in METHODS
    m = method("clip", vocab_size=12, embed_dim=8)
    assert isinstance(m, Clip) and m.scale == pytest.approx(1 / 0.07)
    with pytest.raises(ValueError, match="temperature"):
        Clip(vocab_size=12, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        Clip(vocab_size=12, chunk_size=0)
    with pytest.raises(ValueError, match="vocab_size"):
        Clip()
    with pytest.raises(ValueError, match="caption table"):
        m.loss(lambda x: x, (torch.randn(3, 8), torch.arange(3)))


def test_loss_matches_direct_reference():
    torch.manual_seed(0)
    m = Clip(vocab_size=12, embed_dim=4, width=6, temperature=0.5)
    img = torch.randn(5, 4, dtype=torch.float64)
    tok = _tokens(5)
    got = m.loss(lambda x: x, (img, tok))
    txt = m.text(tok).double()
    ref = 0.0
    norm = lambda v: [a / math.sqrt(sum(b * b for b in v)) for a in v]  # noqa: E731
    im, tx = [norm(r.tolist()) for r in img], [norm(r.tolist()) for r in txt]
    s = [[2.0 * sum(a * b for a, b in zip(im[i], tx[j])) for j in range(5)] for i in range(5)]
    for i in range(5):
        ref -= s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(5)))  # image → text
        ref -= s[i][i] - math.log(sum(math.exp(s[j][i]) for j in range(5)))  # text → image
    assert float(got) == pytest.approx(ref / 10, rel=1e-6)


def test_caption_ids_and_tokens_give_the_same_loss():
    tok = _tokens(6)
    m = Clip(vocab_size=12, embed_dim=4, captions=tok)
    img = torch.randn(4, 4)
    ids = torch.tensor([5, 0, 3, 2])
    assert torch.equal(m.loss(lambda x: x, (img, ids)), m.loss(lambda x: x, (img, tok[ids])))


def test_matched_pairs_beat_shuffled():
    m = Clip(vocab_size=12, embed_dim=16, seed=3)
    tok = _tokens(32, seed=1)
    gen = torch.Generator().manual_seed(0)
    img = m.encode_text(tok) + 0.3 * torch.randn(32, 16, generator=gen)  # images close to their captions
    matched = float(m.loss(lambda x: x, (img, tok)))
    shuffled = float(m.loss(lambda x: x, (img, tok[torch.randperm(32, generator=gen)])))
    print(f"matched {matched:.3f} shuffled {shuffled:.3f} (log 32 = {math.log(32):.3f})")
    assert matched < 0.5 * shuffled


def test_text_tower_is_frozen_and_unchanged_by_training(captions):
    m = Clip(vocab_size=captions.vocab_size, embed_dim=16, captions=captions.train.tokens, chunk_size=32)
    before = copy.deepcopy(m.text.state_dict())
    assert all(not p.requires_grad for p in m.text.parameters())
    torch.manual_seed(0)
    model = build("cnn", 16, in_channels=1, widths=(8, 8, 16, 16))
    start = copy.deepcopy(model.state_dict())
    loader = Loader(captions.train.images, captions.prep, batch_size=64, shuffle=True, seed=0)
    train(model, loader, m, 1, OptimConfig(name="adam", lr=1e-3, weight_decay=0.0))
    assert all(p.grad is None for p in m.text.parameters())
    assert all(torch.equal(v, m.text.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in start.items())


def _grads(params, fn):
    for p in params:
        p.grad = None
    loss = fn()
    if loss.requires_grad:
        loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in params]


def test_chunked_gradients_equal_full_batch_gradients():
    """GradCache (inside loss via checkpointing, and explicit accumulate) equals the big batch, float64."""
    torch.manual_seed(0)
    model = build("mlp", 8, in_channels=1, image_size=6, hidden=(16,)).double()
    x, tok = torch.randn(30, 1, 6, 6, dtype=torch.float64), _tokens(30)
    params = list(model.parameters())
    full = Clip(vocab_size=12, embed_dim=8)
    chunked = Clip(vocab_size=12, embed_dim=8, chunk_size=7)  # uneven last chunk
    calls = []

    def counted(inp):
        calls.append(inp.shape[0])
        return model(inp)

    ref_loss, ref = _grads(params, lambda: full.loss(model, (x, tok)))
    loss, got = _grads(params, lambda: chunked.loss(counted, (x, tok)))
    assert calls[:5] == [7, 7, 7, 7, 2] and sorted(calls[5:]) == [2, 7, 7, 7, 7]  # each chunk re-run in backward
    acc_loss, acc = _grads(params, lambda: chunked.accumulate(model, (x, tok)))
    assert loss == pytest.approx(ref_loss, rel=1e-12) and acc_loss == pytest.approx(ref_loss, rel=1e-12)
    for r, g, a in zip(ref, got, acc):
        assert r.abs().sum() > 0
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_chunked_batchnorm_model_is_ghost_batchnorm_with_single_stat_updates():
    torch.manual_seed(0)
    model = build("cnn", 8, in_channels=1, widths=(4, 4, 8, 8)).double().train()
    ghost, init = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    x, tok = torch.randn(20, 1, 12, 12, dtype=torch.float64), _tokens(20)
    m = Clip(vocab_size=12, embed_dim=8, chunk_size=8)
    _, ref = _grads(list(ghost.parameters()),
                    lambda: Clip(vocab_size=12, embed_dim=8).loss(lambda v: torch.cat([ghost(c) for c in v.split(8)]),
                                                                  (x, tok)))
    for run in (lambda: m.loss(model, (x, tok)), lambda: m.accumulate(model, (x, tok))):
        model.load_state_dict(init)
        _, got = _grads(list(model.parameters()), run)
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
        for (k, v), (_, w) in zip(model.state_dict().items(), ghost.state_dict().items()):
            torch.testing.assert_close(v, w, rtol=1e-12, atol=0.0, msg=k)  # BN stats updated once per chunk


def test_chunked_gradients_through_a_bezier_curve_equal_full_batch():
    torch.manual_seed(0)
    a = build("mlp", 8, in_channels=1, image_size=6, hidden=(16,)).double()
    b = build("mlp", 8, in_channels=1, image_size=6, hidden=(16,)).double()
    curve = BezierCurve(a, b)
    x, tok = torch.randn(24, 1, 6, 6, dtype=torch.float64), _tokens(24)
    bend = list(curve.bend)
    ref = _grads(bend, lambda: Clip(vocab_size=12, embed_dim=8).loss(lambda v: curve(v, 0.3), (x, tok)))[1]
    w = curve.weights(0.3)
    got = _grads(bend, lambda: Clip(vocab_size=12, embed_dim=8, chunk_size=5).loss(
        lambda v: torch.func.functional_call(curve.base, w, (v,)), (x, tok)))[1]
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_curve_fit_trains_only_the_bend(captions):
    torch.manual_seed(0)
    a = build("cnn", 16, in_channels=1, widths=(8, 8, 16, 16))
    b = build("cnn", 16, in_channels=1, widths=(8, 8, 16, 16))
    curve = BezierCurve(a, b)
    bend0 = [p.detach().clone() for p in curve.bend]
    fixed0 = {k: v.clone() for k, v in curve.state_dict().items() if not k.startswith("bend")}
    m = Clip(vocab_size=captions.vocab_size, embed_dim=16, captions=captions.train.tokens, chunk_size=32)
    text0 = copy.deepcopy(m.text.state_dict())
    loader = Loader(captions.train.images, captions.prep, batch_size=100, shuffle=True, augment=True, seed=0)
    losses = []
    fit(curve, loader, m, 1, OptimConfig(name="adam", lr=1e-3, weight_decay=0.0, l2=1e-4),
        progress=lambda e, n, loss: losses.append(loss))
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert all(not torch.equal(p, q) for p, q in zip(curve.bend, bend0))
    for k, v in curve.state_dict().items():
        if k.startswith(("start__", "end__")) or (k.startswith("base.") and "running" not in k
                                                  and "num_batches" not in k):
            assert torch.equal(v, fixed0[k]), k
    assert all(torch.equal(v, m.text.state_dict()[k]) for k, v in text0.items())


def test_tokenizer_is_deterministic_and_pads():
    tok = WordTokenizer(["b", "a", "c", "a"])
    assert tok.vocab == ["<pad>", "<unk>", "a", "b", "c"]
    ids = tok.encode(["a b", "C zz a"], length=4)
    assert ids.tolist() == [[2, 3, 0, 0], [4, 1, 2, 0]]
    assert tok.decode(ids) == ["a b", "c <unk> a"]
    assert tok.encode(["a b c a"], length=2).tolist() == [[2, 3]]


def test_captions_describe_the_images_and_are_seeded(captions):
    tr = captions.train
    assert torch.equal(tr.images.y, torch.arange(len(tr))) and tr.tokens.shape[0] == len(tr)
    assert captions.tokenizer.decode(tr.tokens) == [" ".join(t.split()) for t in tr.texts]
    assert all(captions.class_names[c] in t for c, t in zip(tr.labels.tolist(), tr.texts))
    bright, _ = attributes(tr.images.x)
    words = [next(w for w in BRIGHTNESS if f" {w} " in f" {t} ") for t in tr.texts]
    mean = {w: bright[[i for i, v in enumerate(words) if v == w]].mean() for w in BRIGHTNESS}
    assert mean["dark"] < mean["grey"] < mean["bright"]
    again = caption_dataset(load("fashion-mnist-embedded", train_per_class=20, test_per_class=5), seed=0)
    other = caption_dataset(load("fashion-mnist-embedded", train_per_class=20, test_per_class=5), seed=1)
    assert again.train.texts == tr.texts and torch.equal(again.test.tokens, captions.test.tokens)
    assert other.train.texts != tr.texts and torch.equal(other.train.content, tr.content)
    assert torch.equal(TextTower(20, 8, seed=4).proj.weight, TextTower(20, 8, seed=4).proj.weight)
    assert not torch.equal(TextTower(20, 8, seed=4).proj.weight, TextTower(20, 8, seed=5).proj.weight)


def _train_clip(data, epochs: int, seed: int = 0):
    m = Clip(vocab_size=data.vocab_size, embed_dim=32, captions=data.train.tokens, chunk_size=64, seed=seed)
    torch.manual_seed(seed)
    model = build("cnn", 32, in_channels=1, widths=(16, 32, 32, 64))
    loader = Loader(data.train.images, data.prep, batch_size=128, shuffle=True, augment=True, seed=seed)
    losses: list[float] = []
    train(model, loader, m, epochs, OptimConfig(name="adam", lr=3e-3, weight_decay=0.0),
          progress=lambda e, n, loss: losses.append(loss))
    return m, model.eval(), losses


def test_training_is_deterministic(captions):
    (_, a, la), (_, b, lb) = _train_clip(captions, 1), _train_clip(captions, 1)
    assert la == lb
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_training_lowers_loss_and_retrieves_captions():
    data = caption_dataset(load("fashion-mnist-embedded", train_per_class=100, test_per_class=50), seed=0)
    m0 = Clip(vocab_size=data.vocab_size, embed_dim=32, captions=data.train.tokens)
    torch.manual_seed(0)
    untrained = build("cnn", 32, in_channels=1, widths=(16, 32, 32, 64)).eval()
    x = data.prep.normalize(data.test.images.x)
    start = time.perf_counter()
    m, model, losses = _train_clip(data, 6)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        before = float(m0.loss(untrained, (x, data.test.tokens)))
        after = float(m.loss(model, (x, data.test.tokens)))
    acc0 = retrieval_accuracy(m0, untrained, x, data.test.tokens, data.test.content)
    acc = retrieval_accuracy(m, model, x, data.test.tokens, data.test.content)
    c = data.test.content
    chance = float((c[:, None] == c[None]).float().mean())
    zero_shot = float(m.similarity(model, x, data.class_prompts()).argmax(1).eq(data.test.labels).float().mean())
    print(f"train loss per epoch {[round(v, 3) for v in losses]}; test loss {before:.3f} -> {after:.3f}; "
          f"image->text retrieval {acc0:.3f} -> {acc:.3f} over {len(c)} captions (chance {chance:.3f}); "
          f"zero-shot class acc {zero_shot:.3f}; {seconds:.1f}s")
    assert losses[-1] < losses[0] - 1.0 and after < before - 1.5
    assert acc > 0.3 and acc > 8 * chance
    assert zero_shot > 0.3
