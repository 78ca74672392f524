"""Small conv encoder-decoders for generator-based attacks (Input-Aware, SSBA) and their (de)serialisation.

Every net here works at any image size and channel count: inputs are padded (replicate) to a multiple of
``2**steps`` before the ``steps`` 2×2 down-samplings and the output is cropped back, so 28 px images with
``steps=2`` need no padding and 32/64 px images need none up to ``steps=5``/``6``.

Weights travel as a flat dict of state-dict tensors (``prefix + name``), which safetensors stores; the
architecture hyper-parameters come from the attack's own kwargs and the channel count from the tensors.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-7  # Input-Aware's EPSILON (keeps tanh/2 + 0.5 strictly inside (0, 1))

NetT = TypeVar("NetT", bound=nn.Module)


def _block(cin: int, cout: int, bn: bool, relu: bool = True) -> nn.Sequential:
    """3×3 conv (+ BN) (+ ReLU), Input-Aware's ``Conv2dBlock`` (BN momentum 0.05 as there)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(cout, momentum=0.05))
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def conv_at(net: nn.Module, *path: int) -> nn.Conv2d:
    """The conv at ``path`` in nested ModuleLists/Sequentials, e.g. ``conv_at(ed.down, 0, 0, 0)`` (their indexing
    is typed as returning a plain Module, which is not indexable)."""
    m: Any = net
    for i in path:
        m = m[i]
    if not isinstance(m, nn.Conv2d):
        raise TypeError(f"expected a Conv2d at {path}, found {type(m).__name__}")
    return m


def _pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, h, w


class EncoderDecoder(nn.Module):
    """Input-Aware's generator: ``steps`` × [conv, conv, max-pool], a middle conv, ``steps`` × [bilinear up,
    conv, conv], channels ``width · 2^k``; the last conv has BN but no ReLU. Output is the raw pre-activation.

    ``skip=True`` adds U-Net skips (StegaStamp's encoder has them; Input-Aware's generator has none).
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 16, steps: int = 2, bn: bool = True,
                 skip: bool = False) -> None:
        super().__init__()
        if width < 1 or steps < 1:
            raise ValueError(f"generator width and steps must be >= 1, got {width}, {steps}")
        self.steps, self.skip = steps, skip
        chans = [width * 2 ** k for k in range(steps)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.down.append(nn.Sequential(_block(cin, c, bn), _block(c, c, bn)))
            cin = c
        self.middle = _block(cin, cin, bn)
        self.up = nn.ModuleList()
        for k in reversed(range(steps)):
            c = chans[k]
            cin_up = cin + (c if skip else 0)
            cout = chans[k - 1] if k > 0 else out_channels
            self.up.append(nn.Sequential(_block(cin_up, cin, bn), _block(cin, cout, bn, relu=k > 0)))
            cin = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = _pad_to(x, 2 ** self.steps)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.middle(x)
        for block in self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            s = skips.pop()
            x = block(torch.cat([x, s], 1) if self.skip else x)
        return x[..., :h, :w]


def unit_interval(raw: torch.Tensor) -> torch.Tensor:
    """Input-Aware's output squashing ``tanh(x) / (2 + ε) + 0.5`` into (0, 1)."""
    return torch.tanh(raw) / (2 + EPS) + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """Input-Aware's near-binary mask ``tanh(20 m - 10) / (2 + ε) + 0.5``."""
    return torch.tanh(m * 20 - 10) / (2 + EPS) + 0.5


class SecretEncoder(nn.Module):
    """StegaStamp-style encoder: secret bits (as ±1) → dense → ``C×g×g`` map upsampled to the image, concatenated
    with the image, a U-Net → a residual (same channels as the image) added to the image; a 1×1 conv of the secret
    map is added to the U-Net's output so bits reach the residual from the first step. The U-Net's last conv
    starts at zero, so a fresh encoder's residual is the secret map alone (not a large image-dependent offset that
    clamping at black pixels would cut off)."""

    def __init__(self, in_channels: int, bits: int, width: int = 16, steps: int = 2, grid: int = 8) -> None:
        super().__init__()
        self.in_channels, self.grid = in_channels, grid
        self.dense = nn.Linear(bits, in_channels * grid * grid)
        self.net = EncoderDecoder(2 * in_channels, in_channels, width, steps, bn=False, skip=True)
        self.direct = nn.Conv2d(in_channels, in_channels, 1)  # secret map → residual shortcut (learns fast)
        last = conv_at(self.net.up, -1, -1, 0)
        nn.init.zeros_(last.weight)
        assert last.bias is not None  # nn.Conv2d's default bias=True
        nn.init.zeros_(last.bias)

    def forward(self, image: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
        s = self.dense(secret * 2 - 1).view(-1, self.in_channels, self.grid, self.grid)
        s = F.interpolate(s, size=image.shape[-2:], mode="nearest")
        s = s.expand(len(image), -1, -1, -1)
        return self.net(torch.cat([s, image], 1)) + self.direct(s)


class SecretDecoder(nn.Module):
    """StegaStamp-style decoder: strided convs, adaptive pooling to 4×4 (any image size), dense → bit logits,
    plus a linear read-out of the image average-pooled to the secret's ``grid×grid`` map (a shortcut that
    lets the bits be recovered within the few hundred CPU steps we train for)."""

    def __init__(self, in_channels: int, bits: int, width: int = 16, grid: int = 8) -> None:
        super().__init__()
        w = width
        self.grid = grid
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, 2, 1), nn.ReLU(), nn.Conv2d(w, w, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, 2, 1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.dense = nn.Sequential(nn.Linear(4 * w * 16, 256), nn.ReLU(), nn.Linear(256, bits))
        self.linear = nn.Linear(in_channels * grid * grid, bits)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(image, self.grid).flatten(1)
        return self.dense(self.convs(image).flatten(1)) + self.linear(pooled)


# ----------------------------------------------------------------------------------------------- helpers
@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (weight init) from a seeded global RNG without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def flatten(nets: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{prefix: net}`` → one flat dict ``{prefix.name: tensor}`` of contiguous CPU copies."""
    return {f"{p}.{k}": v.detach().cpu().contiguous().clone() for p, net in nets.items()
            for k, v in net.state_dict().items()}


def unflatten(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The state dict stored under ``prefix`` by :func:`flatten`."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


def load_net(net: NetT, tensors: dict[str, torch.Tensor], prefix: str, what: str) -> NetT:
    """Load ``net`` from the flat resource; a clear error when tensors are missing or mis-shaped."""
    state = unflatten(tensors, prefix)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{what}: resource does not match the attack's generator settings "
                         f"(prefix {prefix!r}): {e}") from None
    return net.eval().requires_grad_(False)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images → float in [0, 1]."""
    return x.float() / 255.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] → uint8 (rounded, clamped)."""
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)
