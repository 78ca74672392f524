"""A small synthetic image-caption dataset for CLIP-style training, built offline from an image dataset.

Each image gets a template caption built from its class name plus two attributes measured on its own
pixels: brightness (mean intensity of the foreground) and size (fraction of foreground pixels), each cut
into ``dark/grey/bright`` and ``small/medium/large`` at the train split's tertiles (the test split reuses
the train thresholds). A seeded choice among a few templates adds caption noise that the image cannot
predict, so retrieval is scored on the caption's *content* ``(class, brightness, size)``, not its wording.

Captions are tokenised by :class:`WordTokenizer`, a deterministic word-level tokenizer (``<pad>`` = 0,
``<unk>`` = 1, then the sorted vocabulary). How a batch carries captions: a :class:`CaptionSet`'s
``images`` are an :class:`ImageData` whose labels are *caption ids* (row numbers of ``tokens``), so the
ordinary :class:`Loader` yields ``(images, caption_ids)`` and the CLIP method, which holds the token table,
looks the captions up (see :mod:`tscray.methods.clip`). Clean subsets (``images.subset(idx)``) keep their
caption ids, so they still index the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tscray.data import Dataset, ImageData, Preprocess

FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot")
BRIGHTNESS = ("dark", "grey", "bright")
SIZE = ("small", "medium", "large")
TEMPLATES = ("a photo of a {b} {s} {c}", "a {s} {c} that is {b}", "{b} {s} {c}", "a picture of the {s} {b} {c}")
FOREGROUND = 16  # uint8 intensity above which a pixel counts as object, not background

PAD, UNK = "<pad>", "<unk>"


class WordTokenizer:
    """Deterministic word-level tokenizer: lower-cased whitespace split; id 0 pads, id 1 is unknown."""

    def __init__(self, words: Sequence[str]) -> None:
        vocab = sorted({w for w in words} - {PAD, UNK})
        self.vocab = [PAD, UNK, *vocab]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "WordTokenizer":
        return cls([w for t in texts for w in t.lower().split()])

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, texts: Sequence[str], length: int | None = None) -> torch.Tensor:
        """Token ids (N × length, int64), right-padded with 0; longer texts are truncated."""
        ids = [[self.index.get(w, 1) for w in t.lower().split()] for t in texts]
        length = max((len(i) for i in ids), default=1) if length is None else length
        out = torch.zeros(len(ids), length, dtype=torch.long)
        for row, i in enumerate(ids):
            i = i[:length]
            out[row, :len(i)] = torch.tensor(i, dtype=torch.long)
        return out

    def decode(self, tokens: torch.Tensor) -> list[str]:
        return [" ".join(self.vocab[i] for i in row.tolist() if i != 0) for row in tokens]


@dataclass
class CaptionSet:
    """Images with one caption each. ``images.y[i]`` is the caption id of image i (a row of ``tokens``);
    ``labels`` are the class labels and ``content`` the id of ``(class, brightness, size)``."""

    images: ImageData
    labels: torch.Tensor
    texts: list[str]
    tokens: torch.Tensor
    content: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class CaptionDataset:
    """Train and test caption sets sharing one tokenizer and one preprocessing."""

    train: CaptionSet
    test: CaptionSet
    tokenizer: WordTokenizer
    prep: Preprocess
    class_names: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def class_prompts(self, template: str = "a photo of a {c}") -> torch.Tensor:
        """Token ids of one prompt per class, for zero-shot classification."""
        return self.tokenizer.encode([template.format(c=c) for c in self.class_names])


def attributes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (brightness, size): mean foreground intensity and foreground fraction of uint8 images."""
    fg = (x > FOREGROUND).flatten(1)
    area = fg.float().mean(1)
    bright = (x.flatten(1).float() * fg).sum(1) / fg.sum(1).clamp_min(1)
    return bright, area


def _tertiles(v: torch.Tensor) -> torch.Tensor:
    return torch.quantile(v.double(), torch.tensor([1 / 3, 2 / 3], dtype=torch.double)).float()


def _caption_set(data: ImageData, names: Sequence[str], cuts: tuple[torch.Tensor, torch.Tensor],
                 gen: torch.Generator) -> tuple[ImageData, torch.Tensor, list[str], torch.Tensor]:
    bright, area = attributes(data.x)
    b = torch.bucketize(bright, cuts[0])
    s = torch.bucketize(area, cuts[1])
    tmpl = torch.randint(0, len(TEMPLATES), (len(data),), generator=gen)
    texts = [TEMPLATES[k].format(b=BRIGHTNESS[i], s=SIZE[j], c=names[c])
             for k, i, j, c in zip(tmpl.tolist(), b.tolist(), s.tolist(), data.y.tolist())]
    content = (data.y * len(BRIGHTNESS) + b) * len(SIZE) + s
    return ImageData(data.x, torch.arange(len(data))), data.y.clone(), texts, content


def caption_dataset(dataset: Dataset, seed: int = 0, class_names: Sequence[str] | None = None) -> CaptionDataset:
    """Captions for ``dataset``'s train and test images (Fashion-MNIST class names by default)."""
    names = tuple(class_names) if class_names is not None else FASHION_MNIST_CLASSES
    if len(names) != dataset.num_classes:
        raise ValueError(f"{len(names)} class names for {dataset.num_classes} classes")
    bright, area = attributes(dataset.train.x)
    cuts = (_tertiles(bright), _tertiles(area))
    gen = torch.Generator().manual_seed(seed)
    train = _caption_set(dataset.train, names, cuts, gen)
    test = _caption_set(dataset.test, names, cuts, gen)
    words = [t for tmpl in TEMPLATES for t in tmpl.split() if not t.startswith("{")]
    words += [w for n in names for w in n.lower().split()] + list(BRIGHTNESS) + list(SIZE)
    tok = WordTokenizer(words)
    length = max(len(t.split()) for t in train[2] + test[2])
    sets = [CaptionSet(im, y, texts, tok.encode(texts, length), c) for im, y, texts, c in (train, test)]
    return CaptionDataset(sets[0], sets[1], tok, dataset.prep, names)
