"""Permutation specs derived from a model's graph, for architectures nobody wrote a spec for.

``derive(model, example_input)`` traces the model with ``torch.fx``, propagates shapes with the
example input, and follows the *channel layout* of every tensor: which group of hidden units each
entry of its channel axis belongs to. Groups are union-find variables:

- a conv (``groups=1``) or Linear output starts a new group; its weight's input axis carries the
  input's layout (a concatenation → a concatenated group, a flattened map → ``Expand``);
- BatchNorm, PReLU, elementwise activations, pooling, dropout, padding and interpolation keep the
  layout and their per-channel tensors carry it;
- a depthwise conv (``groups == in_channels``) keeps its input's groups (weight axis 0 tied to them);
- an elementwise sum or product of tensors unifies their layouts (a residual stream is one group);
- ``torch.cat`` along the channel axis concatenates layouts (block-diagonal concatenated groups);
- flatten / view / reshape keep a layout when the channel axis stays unit-major (``Expand``).

Anything else *ends* the groups that reach it: its inputs are fixed (identity permutation) and its
output is untracked. So are the model's inputs and outputs (the classifier's output axis is never
permuted), grouped convolutions other than depthwise, LayerNorm / GroupNorm / InstanceNorm, attention,
in-graph parameters and ops this module does not know. Fixing is always safe: a group that is not
permuted cannot break the function. ``strict=True`` refuses such ops instead, naming op and module.

Every derived spec is checked before it is returned (:func:`verify`): a random permutation of a float64
copy with randomised BatchNorm statistics must leave the outputs unchanged and invert exactly.

Probes (where matching reads activations) follow one rule: in a net with residual sums, the raw output
of every conv / Linear writing into a group; in a plain net, the first ReLU after the producer's
BatchNorm (or after the producer). ``probes="raw"`` or ``"relu"`` forces one rule.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.fx.passes.shape_prop import ShapeProp

from tscray.symmetry.spec import AxisGroup, Expand, PermSpec, Probe

ProbeRule = Literal["auto", "raw", "relu"]
PROBE_RULES: tuple[str, ...] = ("auto", "raw", "relu")


class DeriveError(ValueError):
    """The model's graph cannot be traced, or (``strict``) it holds an op the derivation does not know."""


class SpecMismatch(ValueError):
    """A permutation spec that does not leave the model's function unchanged."""


# ---------------------------------------------------------------------------------------------------
# channel layouts and their union-find groups


class _Groups:
    """Union-find over group variables, with a size, a name hint and a 'fixed' flag per root."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.hint: list[str] = []
        self.fixed: list[bool] = []
        self.residual: list[bool] = []

    def new(self, size: int, hint: str, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.hint.append(hint)
        self.fixed.append(fixed)
        self.residual.append(False)
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:  # cannot happen for shape-checked operands; stay safe
            self.fixed[ra] = self.fixed[rb] = True
            return
        keep, drop = min(ra, rb), max(ra, rb)  # the earlier variable names the group
        self.parent[drop] = keep
        self.fixed[keep] = self.fixed[keep] or self.fixed[drop]
        self.residual[keep] = True

    def fix(self, v: int) -> bool:
        r = self.find(v)
        changed = not self.fixed[r]
        self.fixed[r] = True
        return changed


@dataclass(frozen=True)
class _Layout:
    """The channel axis ``axis`` of a tensor: ``segs`` concatenated, each unit repeated ``repeat`` times."""

    segs: tuple[int, ...]
    repeat: int
    axis: int


@dataclass
class Derivation:
    """A derived spec and the places where groups had to end (``"op at module path: why"``)."""

    spec: PermSpec
    ended: list[str] = field(default_factory=list)


_KEEP_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
    nn.ReplicationPad2d,
)
_KEEP_FUNCS: set[Any] = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.interpolate, F.upsample, torch.clone, torch.abs, torch.exp, torch.square, torch.sqrt,
}
_KEEP_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clone", "contiguous", "float",
                 "double", "half", "to", "type_as", "detach", "abs", "exp", "square", "sqrt", "clamp", "clamp_",
                 "clamp_min", "clamp_min_"}
_BINARY_FUNCS: set[Any] = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                           operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
                           torch.maximum, torch.minimum}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_CAT_FUNCS: set[Any] = {torch.cat, torch.concat, torch.concatenate}
_RESHAPE_FUNCS: set[Any] = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
_REDUCE_FUNCS: set[Any] = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_SHAPE_METHODS = {"size", "dim"}  # return no tensor


def _is_keep_extra(fn: Any) -> bool:
    """Channel-wise functions outside torch: torchvision's stochastic depth (a per-sample scale)."""
    return getattr(fn, "__module__", "") == "torchvision.ops.stochastic_depth" and \
        getattr(fn, "__name__", "") == "stochastic_depth"


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _nodes_in(arg: Any) -> list[fx.Node]:
    out: list[fx.Node] = []

    def visit(n: fx.Node) -> fx.Node:
        out.append(n)
        return n
    fx.node.map_arg(arg, visit)
    return out


class _Deriver:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, strict: bool) -> None:
        self.model, self.gm, self.strict = model, gm, strict
        self.modules = dict(model.named_modules())
        self.g = _Groups()
        self.layout: dict[fx.Node, _Layout | None] = {}
        self.param_axes: dict[str, list[_Layout | None]] = {}  # state key -> one layout (or None) per axis
        self.producers: dict[int, list[str]] = {}  # group variable -> producing conv / Linear modules
        self.alias: dict[int, _Layout] = {}  # root variable -> the layout it stands for
        self.ended: list[str] = []

    # -- helpers ------------------------------------------------------------------------------------
    def fix_layout(self, lay: _Layout | None) -> bool:
        """Fix every group the layout reaches (through aliases); True if anything changed."""
        changed = False
        for v in lay.segs if lay is not None else ():
            r = self.g.find(v)
            changed |= self.fix_layout(self.alias[r]) if r in self.alias else self.g.fix(r)
        return changed

    def resolve(self, lay: _Layout, depth: int = 0) -> _Layout | None:
        """The layout with aliased variables replaced by what they stand for; None when the result is not
        expressible (an expanded alias inside a concatenation) or aliases loop."""
        if not any(self.g.find(v) in self.alias for v in lay.segs):
            return lay
        if depth > 64:
            return None
        segs: list[int] = []
        repeat = lay.repeat
        for v in lay.segs:
            r = self.g.find(v)
            if r not in self.alias:
                segs.append(v)
                continue
            sub = self.resolve(self.alias[r], depth + 1)
            if sub is None or (sub.repeat != 1 and len(lay.segs) > 1):
                return None
            segs.extend(sub.segs)
            repeat = lay.repeat * sub.repeat
        return _Layout(tuple(segs), repeat, lay.axis)

    def end(self, node: fx.Node, why: str) -> None:
        """Fix every tracked tensor the node reads; its output is untracked."""
        where = f"{node.op} {self._op_name(node)}"
        if self.strict:
            raise DeriveError(f"cannot derive a permutation spec through {where}: {why}")
        self.ended.append(f"{where}: {why}")
        for arg in _nodes_in((node.args, node.kwargs)):
            self.fix_layout(self.layout.get(arg))
        self.layout[node] = None

    @staticmethod
    def _op_name(node: fx.Node) -> str:
        t = node.target
        if node.op == "call_module":
            return f"{t!s}"
        return getattr(t, "__name__", str(t))

    def fresh(self, size: int, hint: str, axis: int) -> _Layout:
        return _Layout((self.g.new(size, hint),), 1, axis)

    def assign(self, key: str, ndim: int, axis: int, lay: _Layout | None) -> None:
        axes = self.param_axes.setdefault(key, [None] * ndim)
        old = axes[axis]
        if old is None:
            axes[axis] = lay
        elif lay is None or not self.unify(old, lay):
            self.fix_layout(old)
            self.fix_layout(lay)

    def unify(self, a: _Layout, b: _Layout) -> bool:
        """Make two channel layouts one: the same groups part by part, or, when one side is a single plain
        group (e.g. a squeeze-excitation gate), that group stands for the other layout (an alias)."""
        ra, rb = self.resolve(a), self.resolve(b)
        if ra is None or rb is None:
            return False
        sa = [self.g.size[self.g.find(v)] for v in ra.segs]
        sb = [self.g.size[self.g.find(v)] for v in rb.segs]
        if sa == sb and ra.repeat == rb.repeat:
            for u, w in zip(ra.segs, rb.segs):
                self.g.union(u, w)
            return True
        for x, y in ((ra, rb), (rb, ra)):
            if len(x.segs) == 1 and x.repeat == 1 and self.channel_size(x) == self.channel_size(y):
                r = self.g.find(x.segs[0])
                if any(self.g.find(v) == r for v in y.segs):
                    continue
                if self.g.fixed[r]:
                    self.fix_layout(y)
                self.alias[r] = _Layout(y.segs, y.repeat, 0)
                return True
        return False

    def channel_size(self, lay: _Layout) -> int:
        return sum(self.g.size[self.g.find(v)] for v in lay.segs) * lay.repeat

    # -- the walk -----------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            shape = _shape(node)
            if node.op == "placeholder":
                self.layout[node] = (_Layout((self.g.new(shape[1], "input", fixed=True),), 1, 1)
                                     if shape is not None and len(shape) >= 2 else None)
            elif node.op == "get_attr":
                self.layout[node] = None  # in-graph tensors: unpermuted; combining them with a group fixes it
            elif node.op == "output":
                for arg in _nodes_in(node.args):
                    self.fix_layout(self.layout.get(arg))
            elif shape is None:
                self.layout[node] = None  # sizes, tuples: no channel layout to follow
                if node.op in ("call_module", "call_function", "call_method") and \
                        any(self.layout.get(a) is not None for a in _nodes_in((node.args, node.kwargs))) \
                        and not (node.op == "call_method" and node.target in _SHAPE_METHODS) \
                        and node.target is not getattr:
                    self.end(node, "returns no single tensor")
            elif node.op == "call_module":
                self.module(node, self.modules[str(node.target)], shape)
            elif node.op == "call_function":
                self.function(node, node.target, shape)
            elif node.op == "call_method":
                self.method(node, str(node.target), shape)

    def first(self, node: fx.Node) -> tuple[fx.Node | None, _Layout | None]:
        arg = node.args[0] if node.args else None
        return (arg, self.layout.get(arg)) if isinstance(arg, fx.Node) else (None, None)

    def module(self, node: fx.Node, mod: nn.Module, shape: tuple[int, ...]) -> None:
        path = str(node.target)
        src, lay = self.first(node)
        if isinstance(mod, nn.modules.conv._ConvNd):
            self.conv(node, path, mod, lay, shape)
        elif isinstance(mod, nn.Linear):
            self.linear(node, path, mod, lay, shape)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if lay is None or lay.axis != 1:
                return self.end(node, "BatchNorm over an untracked channel axis")
            for k, t in mod.state_dict().items():
                if t.ndim == 1:
                    self.assign(f"{path}.{k}", 1, 0, lay)
            self.layout[node] = lay
        elif isinstance(mod, nn.PReLU):
            if lay is None or mod.weight.numel() == 1:
                self.layout[node] = lay
            elif lay.axis == 1:
                self.assign(f"{path}.weight", 1, 0, lay)
                self.layout[node] = lay
            else:
                self.end(node, "per-channel PReLU off the channel axis")
        elif isinstance(mod, nn.Flatten):
            self.reshape(node, lay, src, shape)
        elif isinstance(mod, _KEEP_MODULES) and not any(True for _ in mod.parameters()):
            self.keep(node, lay, src, shape)
        else:
            self.end(node, f"{type(mod).__name__} is not known to preserve channel permutations")

    def conv(self, node: fx.Node, path: str, mod: nn.modules.conv._ConvNd, lay: _Layout | None,
             shape: tuple[int, ...]) -> None:
        nd = mod.weight.ndim
        if lay is not None and lay.axis != 1:
            self.fix_layout(lay)
            lay = None
        if mod.groups == 1:
            self.assign(f"{path}.weight", nd, 1, lay)
            out = self.fresh(mod.out_channels, path, 1)
            self.producers.setdefault(out.segs[0], []).append(path)
        elif mod.groups == mod.in_channels and lay is not None and mod.out_channels % mod.in_channels == 0:
            k = mod.out_channels // mod.in_channels  # depthwise (channel multiplier k): output o reads input o // k
            out = _Layout(lay.segs, lay.repeat * k, 1)
        else:
            return self.end(node, f"grouped convolution (groups={mod.groups}) mixes channels within groups")
        self.assign(f"{path}.weight", nd, 0, out)
        if mod.bias is not None:
            self.assign(f"{path}.bias", 1, 0, out)
        self.layout[node] = out

    def linear(self, node: fx.Node, path: str, mod: nn.Linear, lay: _Layout | None, shape: tuple[int, ...]) -> None:
        last = len(shape) - 1
        if lay is not None and lay.axis != last:
            self.fix_layout(lay)
            lay = None
        self.assign(f"{path}.weight", 2, 1, lay)
        out = self.fresh(mod.out_features, path, last)
        self.producers.setdefault(out.segs[0], []).append(path)
        self.assign(f"{path}.weight", 2, 0, out)
        if mod.bias is not None:
            self.assign(f"{path}.bias", 1, 0, out)
        self.layout[node] = out

    def keep(self, node: fx.Node, lay: _Layout | None, src: fx.Node | None, shape: tuple[int, ...]) -> None:
        """Channel-wise op: the layout stays, provided the channel axis kept its size and place."""
        src_shape = _shape(src) if src is not None else None
        if lay is None:
            self.layout[node] = None
        elif src_shape is not None and len(src_shape) == len(shape) and src_shape[lay.axis] == shape[lay.axis] \
                and len(shape) > lay.axis:
            self.layout[node] = lay
        else:
            self.end(node, "changes the channel axis")

    def reshape(self, node: fx.Node, lay: _Layout | None, src: fx.Node | None, shape: tuple[int, ...]) -> None:
        """A reshape keeps a layout when the dims before the channel axis are untouched and the channel
        axis stays unit-major (e.g. (N, C, H, W) → (N, C·H·W) gives ``Expand(C, H·W)``)."""
        src_shape = _shape(src) if src is not None else None
        if lay is None:
            self.layout[node] = None
            return
        a = lay.axis
        if src_shape is None or len(shape) <= a or shape[:a] != src_shape[:a]:
            return self.end(node, "reshapes across the channel axis")
        per_unit = lay.repeat * math.prod(src_shape[a + 1:])  # flat entries owned by one unit
        per_entry = math.prod(shape[a + 1:])  # flat entries under one index of the new axis
        if per_entry == 0 or per_unit % per_entry:
            return self.end(node, "reshapes across the channel axis")
        new = _Layout(lay.segs, per_unit // per_entry, a)
        if self.channel_size(new) != shape[a]:
            return self.end(node, "reshapes across the channel axis")
        self.layout[node] = new

    def reduce(self, node: fx.Node, lay: _Layout | None, shape: tuple[int, ...]) -> None:
        """``mean``/``sum``/``amax``/``amin`` (function or method): reading ``dim`` and ``keepdim`` here."""
        dims: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        src_shape = _shape(node.args[0])
        if lay is None or src_shape is None:
            self.layout[node] = None
            return
        nd = len(src_shape)
        if dims is None:
            self.layout[node] = None  # a full reduction is permutation invariant
            return
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d % nd for d in dims]
        if lay.axis in dims:
            self.layout[node] = None  # reduced over the units: invariant, nothing to follow
            return
        axis = lay.axis if keepdim else lay.axis - sum(d < lay.axis for d in dims)
        self.layout[node] = _Layout(lay.segs, lay.repeat, axis) if shape[axis] == src_shape[lay.axis] else None

    def binary(self, node: fx.Node, shape: tuple[int, ...]) -> None:
        """Elementwise op of broadcast operands: every operand spanning the output's channel axis shares it."""
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node) and _shape(a) is not None]
        tracked = [(a, self.layout.get(a)) for a in tensors if self.layout.get(a) is not None]
        if not tracked:
            self.layout[node] = None
            return
        nd = len(shape)
        aligned = {lay.axis + nd - len(_shape(a) or ()) for a, lay in tracked}  # type: ignore[union-attr]
        if len(aligned) != 1:
            return self.end(node, "combines tensors whose channel axes do not line up")
        axis = aligned.pop()
        result: _Layout | None = None
        for a in tensors:
            s = _shape(a) or ()
            pos = axis - (nd - len(s))
            if pos < 0 or s[pos] == 1 and shape[axis] != 1:
                continue  # broadcast along the channel axis: no channel structure
            lay = self.layout.get(a)
            if lay is None:
                return self.end(node, "combines a group with an untracked tensor")
            lay = _Layout(lay.segs, lay.repeat, axis)
            if result is None:
                result = lay
            elif not self.unify(result, lay):
                return self.end(node, "combines tensors with different channel layouts")
        self.layout[node] = result

    def cat(self, node: fx.Node, shape: tuple[int, ...]) -> None:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(parts, (list, tuple)) or not isinstance(dim, int):
            return self.end(node, "unsupported concatenation")
        dim %= len(shape)
        lays = [self.layout.get(p) if isinstance(p, fx.Node) else None for p in parts]
        if any(lay is None for lay in lays):
            return self.end(node, "concatenates an untracked tensor")
        axes = {lay.axis for lay in lays if lay is not None}
        repeats = {lay.repeat for lay in lays if lay is not None}
        if axes != {dim}:
            if len(axes) == 1:  # concatenation along another axis: every part shares the channel layout
                return self.binary_all(node, [lay for lay in lays if lay is not None])
            return self.end(node, "concatenates tensors whose channel axes differ")
        if len(repeats) != 1:
            return self.end(node, "concatenates channel axes with different spatial expansions")
        segs = tuple(v for lay in lays if lay is not None for v in lay.segs)
        self.layout[node] = _Layout(segs, repeats.pop(), dim)

    def binary_all(self, node: fx.Node, lays: list[_Layout]) -> None:
        first = lays[0]
        for lay in lays[1:]:
            if not self.unify(first, lay):
                return self.end(node, "concatenates tensors with different channel layouts")
        self.layout[node] = first

    def function(self, node: fx.Node, fn: Any, shape: tuple[int, ...]) -> None:
        src, lay = self.first(node)
        if fn in _KEEP_FUNCS or _is_keep_extra(fn):
            self.keep(node, lay, src, shape)
        elif fn in _BINARY_FUNCS:
            self.binary(node, shape)
        elif fn in _CAT_FUNCS:
            self.cat(node, shape)
        elif fn in _RESHAPE_FUNCS:
            self.reshape(node, lay, src, shape)
        elif fn in _REDUCE_FUNCS:
            self.reduce(node, lay, shape)
        elif fn is operator.getitem:
            self.getitem(node, lay, src, shape)
        elif fn is F.pad:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            if lay is not None and isinstance(pad, (list, tuple)) and len(pad) // 2 > len(shape) - 1 - lay.axis:
                return self.end(node, "pads the channel axis")
            self.keep(node, lay, src, shape)
        else:
            self.end(node, "not known to preserve channel permutations")

    def method(self, node: fx.Node, name: str, shape: tuple[int, ...]) -> None:
        src, lay = self.first(node)
        if name in _KEEP_METHODS:
            self.keep(node, lay, src, shape)
        elif name in _BINARY_METHODS:
            self.binary(node, shape)
        elif name in _RESHAPE_METHODS:
            self.reshape(node, lay, src, shape)
        elif name in _REDUCE_METHODS:
            self.reduce(node, lay, shape)
        elif name in ("permute", "transpose"):
            self.move_axis(node, name, lay, shape)
        else:
            self.end(node, "not known to preserve channel permutations")

    def move_axis(self, node: fx.Node, name: str, lay: _Layout | None, shape: tuple[int, ...]) -> None:
        if lay is None:
            self.layout[node] = None
            return
        nd = len(shape)
        args: list[Any] = list(node.args[1:])
        if name == "permute":
            order: list[Any] = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            if not all(isinstance(d, int) for d in order):
                return self.end(node, "permutes dims given at run time")
            axis = [d % nd for d in order].index(lay.axis)
        else:
            if len(args) != 2 or not all(isinstance(d, int) for d in args):
                return self.end(node, "transposes dims given at run time")
            a, b = (d % nd for d in args)
            axis = b if lay.axis == a else a if lay.axis == b else lay.axis
        self.layout[node] = _Layout(lay.segs, lay.repeat, axis)

    def getitem(self, node: fx.Node, lay: _Layout | None, src: fx.Node | None, shape: tuple[int, ...]) -> None:
        if lay is None:
            self.layout[node] = None
            return
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is None or i is Ellipsis or isinstance(i, fx.Node) for i in idx):
            return self.end(node, "indexes with None, Ellipsis or a tensor")
        before = idx[: lay.axis]
        if len(idx) > lay.axis and idx[lay.axis] != slice(None):
            return self.end(node, "slices the channel axis")
        self.layout[node] = _Layout(lay.segs, lay.repeat, lay.axis - sum(isinstance(i, int) for i in before))

    # -- the spec -----------------------------------------------------------------------------------
    def settle(self) -> None:
        """A concatenation or expansion that contains a fixed part is fixed whole (the spec type permutes a
        concatenated group only as the union of its parts); repeat until nothing changes."""
        changed = True
        while changed:
            changed = False
            for axes in self.param_axes.values():
                for raw in axes:
                    if raw is None:
                        continue
                    lay = self.resolve(raw)
                    if lay is None:  # not expressible as a spec axis: fix everything it touches
                        changed |= self.fix_layout(raw)
                        continue
                    flags = {self.g.fixed[self.g.find(v)] for v in lay.segs}
                    if flags == {True, False}:
                        changed |= self.fix_layout(lay)

    def names(self) -> dict[int, str]:
        roots: dict[int, str] = {}
        used: set[str] = set()
        for v in range(len(self.g.parent)):
            r = self.g.find(v)
            if r in roots or self.g.fixed[r] or r in self.alias:
                continue
            base = self.g.hint[r]
            name, i = base, 1
            while name in used:
                i += 1
                name = f"{base}#{i}"
            used.add(name)
            roots[r] = name
        return roots

    def axis_group(self, lay: _Layout | None, names: Mapping[int, str], concat: dict[str, list[str]]) -> AxisGroup:
        lay = self.resolve(lay) if lay is not None else None
        if lay is None:
            return None
        roots = [self.g.find(v) for v in lay.segs]
        if any(self.g.fixed[r] for r in roots):
            return None
        if len(roots) == 1:
            name = names[roots[0]]
        else:
            parts = [names[r] for r in roots]
            name = "cat(" + ",".join(parts) + ")"
            concat[name] = parts
        return Expand(name, lay.repeat) if lay.repeat != 1 else name

    def spec(self, probes: ProbeRule) -> PermSpec:
        self.settle()
        names = self.names()
        concat: dict[str, list[str]] = {}
        axes: dict[str, tuple[AxisGroup, ...]] = {}
        for key, tensor in self.model.state_dict().items():
            lays = self.param_axes.get(key, [None] * tensor.ndim)
            axes[key] = tuple(self.axis_group(lay, names, concat) for lay in lays)
        spec = PermSpec(axes=axes, probes={}, concat=concat)
        used = set(spec.groups())
        rule = probes
        if rule == "auto":
            rule = "raw" if any(self.g.residual[r] for r in names) else "relu"
        found: dict[str, list[Probe]] = {}
        for var, paths in self.producers.items():
            r = self.g.find(var)
            if r not in names or names[r] not in used:
                continue
            for path in paths:
                found.setdefault(names[r], []).append(Probe(path) if rule == "raw" else self.relu_probe(path))
        return PermSpec(axes=axes, probes=found, concat=concat)

    def relu_probe(self, path: str) -> Probe:
        """After the producer's BatchNorm (if it is the only reader) and its ReLU, when those follow directly."""
        node = next(n for n in self.gm.graph.nodes if n.op == "call_module" and str(n.target) == path)
        probe = Probe(path, "raw")
        while len(node.users) == 1:
            user = next(iter(node.users))
            mod = self.modules.get(str(user.target)) if user.op == "call_module" else None
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                node, probe = user, Probe(str(user.target), "raw")
                continue
            if isinstance(mod, nn.ReLU) or user.target in (torch.relu, F.relu) or \
                    (user.op == "call_method" and user.target == "relu"):
                return Probe(probe.module, "relu")
            break
        return probe


def trace(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """Symbolically trace ``model`` and record every node's output shape on ``example_input``."""
    try:
        graph = fx.Tracer().trace(model)
    except Exception as err:  # fx raises many types on data-dependent control flow
        raise DeriveError(f"torch.fx cannot trace {type(model).__name__}: {str(err).splitlines()[0][:200]}") \
            from err
    gm = fx.GraphModule(model, graph)
    was = model.training
    model.eval()
    prop = _ShapeProp(gm)
    try:
        # fx's ShapeProp prints a traceback to stderr before re-raising: the one-line error below says it all
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(example_input)
    except Exception as err:
        root: BaseException = err
        while root.__cause__ is not None:
            root = root.__cause__
        node = prop.current
        where = f" at {node.target if node.op == 'call_module' else node.name}" if node is not None else ""
        raise DeriveError(f"{type(model).__name__} fails on an input of shape {tuple(example_input.shape)}{where}: "
                          f"{(str(root).splitlines() or [type(root).__name__])[0][:200]}") from err
    finally:
        model.train(was)
    return gm


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running, to name it when it fails."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def derivation(model: nn.Module, example_input: torch.Tensor, probes: ProbeRule = "auto",
               strict: bool = False) -> Derivation:
    """The derived spec of ``model`` and where groups ended (unverified; :func:`derive` verifies)."""
    gm = trace(model, example_input)
    d = _Deriver(model, gm, strict)
    d.run()
    return Derivation(d.spec(probes), d.ended)


def derive(model: nn.Module, example_input: torch.Tensor, probes: ProbeRule = "auto",
           strict: bool = False, check: bool = True) -> PermSpec:
    """The permutation spec of ``model``, derived from its graph and verified exact on ``example_input``."""
    spec = derivation(model, example_input, probes, strict).spec
    if check:
        verify(model, spec, example_input)
    return spec


def probes_by_rule(model: nn.Module, example_input: torch.Tensor, rule: ProbeRule) -> dict[str, list[Probe]]:
    """Matching probes for ``model``'s own spec (hand-written or derived), placed by ``rule``: ``raw`` reads
    each group's producers (conv/linear outputs), ``relu`` their BatchNorm + ReLU where those follow,
    ``auto`` raw for residual nets and relu otherwise (the module docstring's rule). The graph is derived with that
    rule and its groups are renamed onto the spec's by the parameter axes both permute."""
    from tscray.symmetry.permute import spec_of

    own = spec_of(model)
    derived = derivation(model, example_input, rule).spec

    def name(ax: AxisGroup) -> str | None:
        return ax.group if isinstance(ax, Expand) else ax

    rename: dict[str, str] = {}
    for key, axes in derived.axes.items():
        mine = own.axes.get(key, ())
        for dim, ax in enumerate(axes):
            d, o = name(ax), name(mine[dim]) if dim < len(mine) else None
            if d is not None and o is not None:
                rename.setdefault(d, o)
    out: dict[str, list[Probe]] = {}
    for group, plist in derived.probes.items():
        if group in rename:
            out.setdefault(rename[group], []).extend(p for p in plist if p not in out.get(rename[group], []))
    missing = [g for g in own.groups() if g not in out]
    if missing:
        raise DeriveError(f"probes {rule!r}: no activations found for group(s) {missing} of "
                          f"{type(model).__name__}'s permutation spec")
    return out


# ---------------------------------------------------------------------------------------------------
# verification


@torch.no_grad()
def _randomised_double(model: nn.Module, generator: torch.Generator) -> nn.Module:
    m = copy.deepcopy(model).double().eval()
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None \
                and mod.running_var is not None:
            n = mod.num_features
            mod.running_mean.copy_(0.2 * torch.randn(n, generator=generator, dtype=torch.float64))
            mod.running_var.copy_(0.5 + torch.rand(n, generator=generator, dtype=torch.float64))
            if mod.affine:
                mod.weight.copy_(0.5 + torch.rand(n, generator=generator, dtype=torch.float64))
                mod.bias.copy_(0.2 * torch.randn(n, generator=generator, dtype=torch.float64))
        bias = getattr(mod, "bias", None)
        if isinstance(bias, torch.Tensor) and not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            bias.copy_(0.1 * torch.randn(bias.shape, generator=generator, dtype=torch.float64))
    return m


def _outputs(model: Callable[[torch.Tensor], Any], x: torch.Tensor) -> list[torch.Tensor]:
    out = model(x)
    flat: list[torch.Tensor] = []

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            flat.append(o)
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
    walk(out)
    return flat


def verify(model: nn.Module, spec: PermSpec, example_input: torch.Tensor, rtol: float = 1e-9,
           seed: int = 0) -> None:
    """Raise :class:`SpecMismatch` unless a random permutation under ``spec`` leaves ``model``'s outputs
    unchanged (float64, randomised BatchNorm statistics, eval mode) and inverts exactly."""
    from tscray.symmetry.permute import invert, permute_state

    g = torch.Generator().manual_seed(seed)
    ref = _randomised_double(model, g)
    state = ref.state_dict()
    uncovered = sorted(set(state) - set(spec.axes))
    if uncovered:
        raise SpecMismatch(f"the spec does not cover {uncovered[0]!r}" +
                           (f" (and {len(uncovered) - 1} more)" if len(uncovered) > 1 else ""))
    try:
        sizes = spec.group_sizes(state)
    except KeyError as err:
        raise SpecMismatch(str(err.args[0])) from err
    except ValueError as err:
        raise SpecMismatch(str(err)) from err
    perm = {name: torch.randperm(sizes[name], generator=g) for name in spec.groups()}
    moved = permute_state(spec, state, perm)
    x = example_input.double()
    with torch.no_grad():
        a = _outputs(ref, x)
        b = _outputs(lambda inp: functional_call(ref, moved, (inp,)), x)
    bad = [i for i, (u, v) in enumerate(zip(a, b)) if not _close(u, v, rtol)]
    if bad or len(a) != len(b):
        other = copy.deepcopy(ref)
        other.load_state_dict(moved)
        culprit = _first_divergence(ref, other, spec, x, rtol)
        raise SpecMismatch(f"a permutation under this spec changes the model's output; first divergence at "
                           f"{culprit}")
    back = permute_state(spec, moved, invert(perm))
    for key, t in state.items():
        if not torch.equal(back[key], t):
            raise SpecMismatch(f"permuting and inverting does not restore {key!r}")


def _close(u: torch.Tensor, v: torch.Tensor, rtol: float) -> bool:
    if u.shape != v.shape:
        return False
    scale = u.abs().max().item() if u.numel() else 0.0
    return bool((u - v).abs().max().item() <= rtol * max(scale, 1.0)) if u.numel() else True


def _first_divergence(ref: nn.Module, other: nn.Module, spec: PermSpec, x: torch.Tensor, rtol: float) -> str:
    """The first leaf module (in execution order) whose output multiset along the channel axis differs:
    a correct permutation only reorders channels, so sorted channel vectors must agree."""
    order: list[str] = []
    outs: dict[str, list[torch.Tensor]] = {"a": [], "b": []}

    def hooks(model: nn.Module, tag: str) -> list[Any]:
        hs = []
        for name, mod in model.named_modules():
            if next(mod.children(), None) is not None:
                continue

            def hook(_m: nn.Module, _i: Any, out: Any, name: str = name, tag: str = tag) -> None:
                if isinstance(out, torch.Tensor):
                    if tag == "a":
                        order.append(name)
                    outs[tag].append(out.detach().clone())
            hs.append(mod.register_forward_hook(hook))
        return hs

    handles = hooks(ref, "a") + hooks(other, "b")
    try:
        with torch.no_grad():
            ref(x)
            other(x)
    finally:
        for h in handles:
            h.remove()
    for name, u, v in zip(order, outs["a"], outs["b"]):
        if u.shape != v.shape:
            return _name_params(name, spec)
        if u.ndim >= 2 and not _close(u.sort(dim=1).values, v.sort(dim=1).values, rtol):
            return _name_params(name, spec)
        if u.ndim < 2 and not _close(u, v, rtol):
            return _name_params(name, spec)
    return "the output (every module agrees up to channel order)"


def _name_params(module: str, spec: PermSpec) -> str:
    keys = [k for k in spec.axes if k.rpartition(".")[0] == module]
    return f"module {module!r}" + (f" (parameter {keys[0]!r}: axes {spec.axes[keys[0]]})" if keys else "")


__all__ = ["Derivation", "DeriveError", "ProbeRule", "SpecMismatch", "derivation", "derive", "trace",
           "verify"]

