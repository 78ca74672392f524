"""Image-text contrastive training (CLIP, Radford et al. 2021) of an image tower against a frozen text tower.

TSC re-uses the original training method F on the clean set; for a CLIP visual encoder F is the CLIP
loss: L2-normalised image and text embeddings, logits ``s · img @ txtᵀ``, and the mean of the image→text
and text→image cross-entropies with the matched pair as target. Parameters:

* ``text_tower``: a frozen module mapping token ids (N × L, 0 = padding) to embeddings (N × embed_dim).
  Default: :class:`TextTower` (mean embedding bag + linear) initialised from ``seed``; pass a loaded
  module to use trained weights. Its parameters are set ``requires_grad=False``, it is kept in eval mode,
  and it runs under ``no_grad``: TSC purifies the image tower only (the paper backdoors and purifies the
  CLIP visual encoder, Section 5.3), so curves and fine-tuning never touch the text side.
* ``temperature``: the logit scale is fixed at ``s = 1 / temperature`` and is not a parameter of the image
  model. Default 0.07, CLIP's initialisation; for a pretrained CLIP pass its learnt value (OpenAI's
  models end at the clamp, s = 100, i.e. ``temperature=0.01``). Departure: CLIP learns s; here it is
  frozen with the text tower, because a curve interpolates only the image model's parameters.
* ``chunk_size``: gradient accumulation to large effective batches (the paper uses batch 32768 with
  gradient accumulation, Appendix L). The loader's batch is the effective batch; it is embedded in chunks
  of ``chunk_size`` images. The contrastive loss couples every pair in the batch, so per-chunk losses would
  not add up to the big-batch loss; instead the chunks are wrapped in non-reentrant activation
  checkpointing: the forward keeps only each chunk's embeddings, the full-batch loss is computed on them,
  and backward re-runs each chunk's forward and back-propagates the cached embedding gradients through it
  (GradCache, Gao et al. 2021). Gradients equal the full-batch ones exactly while activation memory is one
  chunk's. Because this happens inside :meth:`Clip.loss`, ``tscray.train.train`` and
  ``tscray.curves.fit`` use it unchanged (including their L2 term). :meth:`Clip.accumulate` is the explicit
  GradCache for callers that want the backward done by the method. Models whose outputs depend on other
  images of the batch (BatchNorm in train mode) see per-chunk batch statistics ("ghost" BatchNorm), as in
  any accumulation; the re-run does not update running statistics a second time.

Batches are ``(images, captions)``: a 1-D integer tensor holds caption ids, rows of the ``captions``
token table given to the method (what a :class:`tscray.data.captions.CaptionSet` loader yields); a 2-D
tensor holds the token ids themselves. Duplicate captions in a batch count as negatives, as in CLIP.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from tscray.methods.base import METHODS, Forward


class TextTower(nn.Module):
    """Bag-of-words text encoder: mean of token embeddings (padding ignored), then a linear projection."""

    def __init__(self, vocab_size: int, embed_dim: int, width: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, width, mode="mean", padding_idx=0)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab_size, width, generator=gen))
            self.embed.weight[0].zero_()
            self.proj.weight.copy_(torch.randn(embed_dim, width, generator=gen) / width ** 0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(tokens))


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric cross-entropy over the scaled cosine similarities of matched rows."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@contextlib.contextmanager
def _frozen_batchnorm_stats() -> Iterator[None]:
    """While active, BatchNorm forwards leave their running statistics as they were (for the re-run of a
    chunk whose first forward already updated them). Momentum 0 makes the kernel's own in-place update
    an exact no-op; restoring the values afterwards would bump tensors that backward has saved."""
    saved: dict[nn.modules.batchnorm._BatchNorm, tuple[float | None, torch.Tensor]] = {}

    def pre(m: nn.Module, _: object) -> None:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            assert m.num_batches_tracked is not None  # registered when track_running_stats
            saved[m] = (m.momentum, m.num_batches_tracked.clone())
            m.momentum = 0.0

    def post(m: nn.Module, _: object, __: object) -> None:
        if m in saved and isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum, count = saved.pop(m)
            assert m.num_batches_tracked is not None
            with torch.no_grad():
                m.num_batches_tracked.copy_(count)

    handles = [nn.modules.module.register_module_forward_pre_hook(pre),
               nn.modules.module.register_module_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _frozen_batchnorm_stats()


@METHODS.register("clip")
class Clip:
    """CLIP loss of an image tower (``forward``'s output is the image embedding) against a frozen text tower."""

    name = "clip"

    def __init__(self, vocab_size: int | None = None, embed_dim: int = 64, width: int = 64,
                 temperature: float = 0.07, chunk_size: int | None = None, seed: int = 0,
                 captions: torch.Tensor | Sequence[Sequence[int]] | None = None,
                 text_tower: nn.Module | None = None) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        if text_tower is None:
            if vocab_size is None or vocab_size < 2:
                raise ValueError("give vocab_size (>= 2) for the default text tower, or a text_tower module")
            text_tower = TextTower(vocab_size, embed_dim, width, seed)
        self.text = text_tower.eval()
        for p in self.text.parameters():
            p.requires_grad_(False)
        self.scale = 1.0 / temperature
        self.chunk_size = chunk_size
        self.captions = None if captions is None else torch.as_tensor(captions, dtype=torch.long)
        if self.captions is not None and self.captions.dim() != 2:
            raise ValueError(f"captions must be an N × L token table, got shape {tuple(self.captions.shape)}")

    def tokens(self, captions: torch.Tensor) -> torch.Tensor:
        """Token ids of a batch's captions: looked up in the caption table for ids, as given for tokens."""
        if captions.dim() == 2:
            return captions.long()
        if captions.dim() != 1:
            raise ValueError(f"captions must be 1-D caption ids or 2-D token ids, got shape {tuple(captions.shape)}")
        if self.captions is None:
            raise ValueError("this batch carries caption ids but the method has no caption table (captions=)")
        return self.captions.to(captions.device)[captions.long()]

    @torch.no_grad()
    def encode_text(self, captions: torch.Tensor) -> torch.Tensor:
        """Embeddings of a batch's captions (ids or tokens) by the frozen text tower."""
        tokens = self.tokens(captions)
        w = next(self.text.parameters(), None)
        if w is not None and w.device != tokens.device:
            self.text.to(tokens.device)
        return self.text.eval()(tokens)

    def encode_images(self, forward: Forward, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings, in checkpointed chunks of ``chunk_size`` when the batch is larger."""
        if self.chunk_size is None or x.shape[0] <= self.chunk_size or not torch.is_grad_enabled():
            return forward(x)
        return torch.cat([checkpoint(forward, c, use_reentrant=False, context_fn=_checkpoint_contexts)
                          for c in x.split(self.chunk_size)])

    def loss(self, forward: Forward, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, captions = batch[0], batch[1]
        text = self.encode_text(captions)
        image = self.encode_images(forward, x)
        return clip_loss(image, text.to(image.dtype), self.scale)

    def accumulate(self, forward: Forward, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """GradCache, explicitly: embed all chunks without a graph, take the full-batch loss and its gradient
        with respect to the embeddings, then re-run each chunk with grad and back-propagate that gradient.
        Accumulates into ``.grad`` exactly what ``loss(forward, batch).backward()`` would; returns the loss
        (detached). Not needed by ``train``/``fit``, which get the same gradients from :meth:`loss`."""
        x, captions = batch[0], batch[1]
        chunks = x.split(self.chunk_size or x.shape[0])
        text = self.encode_text(captions)
        states = []
        with torch.no_grad():
            embedded = []
            for c in chunks:
                states.append(_rng_state(c.device))
                embedded.append(forward(c))
        image = torch.cat(embedded).requires_grad_(True)
        loss = clip_loss(image, text.to(image.dtype), self.scale)
        (grad,) = torch.autograd.grad(loss, image)
        with _frozen_batchnorm_stats():
            for c, g, state in zip(chunks, grad.split([len(c) for c in chunks]), states):
                _set_rng_state(c.device, state)
                forward(c).backward(g)
        return loss.detach()

    @torch.no_grad()
    def similarity(self, forward: Forward, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Cosine similarities (images × captions); argmax over columns retrieves, over class prompts classifies."""
        image = F.normalize(forward(images), dim=-1)
        return image @ F.normalize(self.encode_text(captions).to(image.device, image.dtype), dim=-1).T


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@torch.no_grad()
def retrieval_accuracy(method: Clip, forward: Forward, images: torch.Tensor, captions: torch.Tensor,
                       content: torch.Tensor) -> float:
    """Image→text retrieval among the given captions: the share of images whose most similar caption
    describes the same content (``content`` ids, e.g. ``CaptionSet.content``) as their own."""
    best = method.similarity(forward, images, captions).argmax(1)
    content = content.to(best.device)
    return float((content[best] == content).float().mean())
