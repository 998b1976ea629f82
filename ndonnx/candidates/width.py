"""width:k - the paper's bottleneck multiplier: shrink every inner channel group to round(k * size).

An inner channel group is the output channels of a weighted op (Conv or ConvTranspose with group 1,
Gemm, MatMul with a constant 2-D weight: the "producer") followed through ops that treat channels
independently into the input axis of the next weighted op (the "consumers"). Followed:

- activations and other elementwise unary ops (Relu, Clip, Sigmoid, HardSigmoid, HardSwish, Tanh,
  LeakyRelu, Gelu, Erf, ...), Identity, Dropout, Cast;
- BatchNormalization / InstanceNormalization on axis 1 (statistics sliced);
- elementwise binary ops (Add, Sub, Mul, Div, Pow, Max, Min, PRelu) with a scalar or broadcast
  per-channel constant (the constant is sliced), or with another tensor of a channel group: the two
  groups are coupled (union-find, Torch-Pruning's dependency graph) and keep the same channels,
  as in squeeze-excite's x * sigmoid(fc2(...)) or Gelu written as x * (1 + erf(x / sqrt 2)) / 2;
- a depthwise Conv (group == channels, one filter per channel): its filters follow the group and
  its `group` attribute becomes the new channel count (inverted residuals);
- pooling and reductions that keep the channel axis (GlobalAveragePool, ReduceMean over spatial
  axes feeding a squeeze-excite branch, MaxPool, ...), Flatten of [N, C, 1, 1], Squeeze/Unsqueeze
  of other axes, Resize/Upsample whose channel scale is a constant 1 (or whose constant target size
  is rewritten);
- Concat on the channel axis (a U-Net's skip, an FPN's or PAN's merge): its result is a group of
  parts, each input's group at its offset (an input no group produces is a part kept whole). The
  parts shrink by their own scores, consumers are sliced at every part's kept channels, and where
  the result cannot shrink (it reaches an output, meets another group) neither can its parts;
- Split on the channel axis (YOLOv8's C2f, CSP blocks), the reverse: each output is a piece of the
  input's group at its offset, scored by the producers' rows there; the input's group follows its
  pieces and the Split's sizes are rewritten. A Split of another axis passes the group to every output;
- Slices of the channel axis whose constant ranges tile it (torch's `chunk` from its legacy exporter;
  the bounds are folded to constants on loading), as a Split: bounds rewritten. A Slice of other axes
  passes the group on; one that drops channels of its own (x[:, :6] of 8) blocks;
- a Reshape that keeps the channels as the last axis (TensorFlow's Tensordot, as tf2onnx writes a
  Dense layer on a sequence: [tokens, C] -> [1, tokens, C] and back): the constant that holds the
  target's last entry (the Reshape's own, or the constant piece of a Concat'd target, through Cast)
  is rewritten to the new size; -1 there needs nothing;
- a Shape of a group tensor whose value is read only at other axes (Cast, then Gather of constant
  indices, as Tensordot takes the leading dims).

A group is not shrinkable (left whole, never guessed) when any of its tensors reaches the
neighbourhood's outputs (the boundary shape is fixed), meets a tensor of the same channel count that
no group produces (a residual Add with the block input), or enters anything else: Reshape, Concat
on another axis, Transpose, another Shape or Reshape, Softmax, LayerNormalization, a grouped
(non-depthwise) Conv, a MatMul of two activations. Attention heads are therefore never shrunk: the qkv projection's output goes
through Reshape/Transpose (after a Split, each piece does) into head-wise MatMuls, so its group or
its pieces are refused, and the output
projection's group reaches the residual Add. In a transformer layer only the feed-forward inner
dimension shrinks.

Each op type's rule is an entry of `RULES` ({op_type: Rule}, filled by the `@rule` decorator, like
the converter registry and Torch-Pruning's one pruning function per layer type), so following a new
op is one entry. An op type without a rule, or from another domain, blocks every group entering it.

Which channels survive is decided by `ndonnx.candidates.importance` (L1 norm of the producers'
output-channel weights by default); this module only slices. A BatchNormalization right after a
Conv or one-group ConvTranspose is folded into it first (students carry no BN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import onnx

from ndonnx.candidates import importance as imp
from ndonnx.candidates.base import CandidateSpec, NotApplicable, Student, register, scaled
from ndonnx.candidates.refit import cut_of, refitter
from ndonnx.candidates.onnx_edit import (add_array, attr, consumers, copy_model, finish, fold_batchnorm, get_array,
                                         names_in_use, param_count, set_array, set_attr, set_dim, shapes)
from ndonnx.graph import onnx_opset

UNARY = ("Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Gelu", "Erf", "Elu", "Selu",
         "Celu", "Softplus", "Softsign", "ThresholdedRelu", "Mish", "Abs", "Neg", "Exp", "Log", "Sqrt",
         "Reciprocal", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Identity", "Dropout", "Cast")
BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu")
POOL = ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "AveragePool", "MaxPool", "LpPool")
REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSumExp", "ReduceSumSquare")
CHANNEL_NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}  # per-channel input slots


class Producer(NamedTuple):
    """A weight whose output channels make (part of) a group: rows `first`.. of its `axis` (a Split
    piece's producer is the split tensor's weight, from the piece's offset)."""

    node: int
    weight: str
    axis: int
    first: int = 0


@dataclass
class ChannelGroup:
    """One set of coupled channels (after union-find). Slots are (node index, input slot, axis)."""

    size: int
    producers: list[Producer] = field(default_factory=list)
    slices: list[tuple[int, int, int]] = field(default_factory=list)  # initializer inputs to slice
    depthwise: list[int] = field(default_factory=list)  # Conv nodes whose `group` follows
    tensors: list[tuple[str, int]] = field(default_factory=list)  # (tensor, channel axis)
    sizes: list[tuple[int, int, int]] = field(default_factory=list)  # (node, input slot, entry): shape constants
    blocked: list[str] = field(default_factory=list)  # why it cannot shrink
    parts: list[tuple[int, int]] = field(default_factory=list)  # a Concat's or Split's: (member group id, offset)
    splits: list[int] = field(default_factory=list)  # Split nodes whose sizes follow the parts
    cut_slices: list[tuple[int, int]] = field(default_factory=list)  # (Slice node, axis): one a part, in order
    id: int = -1  # its index among the analysis's groups (what `parts` name)

    @property
    def shrinkable(self) -> bool:
        """Whether it shrinks by its own producers' scores (a Concat's or a split group follows its parts)."""
        return not self.blocked and self.size > 1 and not self.parts


class Rule(NamedTuple):
    """How one op type passes, consumes or slices the channel groups entering it."""

    fn: Callable[["_Analysis", int, onnx.NodeProto], None]  # (analysis, node index, node)
    starts_groups: bool  # a weighted op: runs on every node, not only where a group arrives


# op_type -> Rule. An op type without an entry blocks every group that enters it.
RULES: dict[str, Rule] = {}


def rule(*op_types: str, starts_groups: bool = False):
    """Decorator: `fn` is the rule of `op_types`. Registering an op type twice is an error."""

    def deco(fn):
        for op in op_types:
            if op in RULES:
                raise ValueError(f"op type {op!r} already has a width rule")
            RULES[op] = Rule(fn, starts_groups)
        return fn

    return deco


class _Analysis:
    """One forward pass over the nodes (topological order), tagging each tensor that carries a
    group's channels with (group id, axis). The rules in RULES act on it through the methods below."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.shape = shapes(model)
        self.consts = {t.name for t in model.graph.initializer}
        self.producer = {o: k for k, n in enumerate(model.graph.node) for o in n.output}
        self.readers = consumers(model)
        self.parent: list[int] = []
        self.raw: list[ChannelGroup] = []
        self.tag: dict[str, tuple[int, int]] = {}
        for i, node in enumerate(model.graph.node):
            self._node(i, node)
        for o in model.graph.output:
            if o.name in self.tag:
                self.block(self.tag[o.name][0], f"reaches the output {o.name!r}")

    def _node(self, i: int, node: onnx.NodeProto) -> None:
        r = RULES.get(node.op_type)
        if node.domain not in ("", "ai.onnx") or r is None:
            self.block_inputs(node)
        elif r.starts_groups or any(n in self.tag for n in node.input):
            r.fn(self, i, node)

    # union-find --------------------------------------------------------------------------
    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
        return a

    def new(self, size: int) -> int:
        self.parent.append(len(self.raw))
        self.raw.append(ChannelGroup(size))
        return len(self.raw) - 1

    def size(self, g: int) -> int:
        return self.raw[self.find(g)].size

    # tags and lookups ---------------------------------------------------------------------
    def block(self, g: int, why: str) -> None:
        self.raw[g].blocked.append(why)

    def mark(self, name: str, g: int, axis: int) -> None:
        self.tag[name] = (g, axis)
        self.raw[g].tensors.append((name, axis))

    def rank(self, name: str) -> int | None:
        s = self.shape.get(name)
        return None if s is None else len(s)

    def dim(self, name: str, axis: int):
        s = self.shape.get(name)
        return None if s is None or axis >= len(s) else s[axis]

    def const(self, name: str) -> np.ndarray | None:
        return get_array(self.model, name) if name in self.consts else None

    def block_inputs(self, node: onnx.NodeProto, why: str | None = None) -> None:
        for name in node.input:
            if name in self.tag:
                self.block(self.tag[name][0], why or f"enters {node.op_type} {node.name!r}")

    def tagged_params(self, node: onnx.NodeProto) -> bool:
        """Whether a group reaches an input after the first (a weight, axes, ...)."""
        return any(n in self.tag for n in node.input[1:])

    def const_axes(self, node: onnx.NodeProto, slot: int = 1) -> list[int] | None:
        axes = attr(node, "axes")
        if axes is None and len(node.input) > slot and node.input[slot]:
            a = self.const(node.input[slot])
            axes = None if a is None else [int(v) for v in a.reshape(-1)]
        return None if axes is None else list(axes)

    # result ------------------------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        # A Concat's or split group's channels are its parts' channels: where they cannot shrink,
        # neither can the parts. Repeated until nothing changes (a Split's parts come after it).
        changed = True
        while changed:
            changed = False
            for g, raw in enumerate(self.raw):
                whole = self.raw[self.find(g)]
                for m, _ in raw.parts if whole.blocked else ():
                    if not self.raw[self.find(m)].blocked:
                        verb = "split from" if raw.splits or raw.cut_slices else "concatenated into"
                        self.block(self.find(m), f"is {verb} a group that {whole.blocked[0]}")
                        changed = True
        merged: dict[int, ChannelGroup] = {}
        for g, raw in enumerate(self.raw):
            root = self.find(g)
            m = merged.setdefault(root, ChannelGroup(self.raw[root].size, id=root))
            m.producers += raw.producers
            m.slices += raw.slices
            m.depthwise += raw.depthwise
            m.tensors += raw.tensors
            m.sizes += raw.sizes
            m.blocked += raw.blocked
            m.parts += [(self.find(p), off) for p, off in raw.parts]
            m.splits += raw.splits
            m.cut_slices += raw.cut_slices
        return list(merged.values())


# weighted ops: consume the group on their input axis, produce a new one ----------------------------

@rule("Conv", starts_groups=True)
def _conv(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    w = a.const(node.input[1])
    x = a.tag.get(node.input[0])
    if w is None or a.tagged_params(node):
        return a.block_inputs(node)
    groups = attr(node, "group", 1)
    if groups == 1:
        _dense_conv(a, i, node, w, x)
    elif x is not None and x[1] == 1 and w.shape[1] == 1 and groups == w.shape[0] == a.size(x[0]):
        _depthwise_conv(a, i, node, x[0])
    else:
        a.block_inputs(node, f"enters grouped Conv {node.name!r}")


def _has_bias(node: onnx.NodeProto) -> bool:
    return len(node.input) > 2 and bool(node.input[2])


def _dense_conv(a: _Analysis, i: int, node: onnx.NodeProto, w: np.ndarray, x: tuple[int, int] | None,
                in_axis: int = 1, out_axis: int = 0) -> None:
    """A one-group convolution: the group entering slices the weight's `in_axis`, the new group its
    `out_axis` (Conv [out, in, *kernel]; ConvTranspose [in, out, *kernel]) and the bias."""
    if x is not None:
        if x[1] == 1:
            a.raw[x[0]].slices.append((i, 1, in_axis))
        else:
            a.block(x[0], f"enters {node.op_type} {node.name!r} on axis {x[1]}")
    g = a.new(w.shape[out_axis])
    a.raw[g].producers.append(Producer(i, node.input[1], out_axis))
    a.raw[g].slices.append((i, 1, out_axis))
    if _has_bias(node):
        a.raw[g].slices.append((i, 2, 0))
    a.mark(node.output[0], g, 1)


def _depthwise_conv(a: _Analysis, i: int, node: onnx.NodeProto, g: int) -> None:
    """One filter per channel: the filters follow the group, and `group` becomes its new size."""
    a.raw[g].depthwise.append(i)
    a.raw[g].slices.append((i, 1, 0))
    if _has_bias(node):
        a.raw[g].slices.append((i, 2, 0))
    a.mark(node.output[0], g, 1)


@rule("ConvTranspose", starts_groups=True)
def _conv_transpose(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    """Weight [in, out / group, *kernel]: a group entering is sliced on axis 0, the new one on axis 1
    (group 1 only: with groups the output channels interleave per group)."""
    w = a.const(node.input[1])
    x = a.tag.get(node.input[0])
    if w is None or a.tagged_params(node) or attr(node, "group", 1) != 1:
        return a.block_inputs(node, f"enters ConvTranspose {node.name!r} (grouped or not a constant weight)")
    _dense_conv(a, i, node, w, x, in_axis=0, out_axis=1)


@rule("Gemm", starts_groups=True)
def _gemm(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    b = a.const(node.input[1])
    if b is None or b.ndim != 2 or a.tagged_params(node):
        return a.block_inputs(node)
    trans_a, trans_b = attr(node, "transA", 0), attr(node, "transB", 0)
    x = a.tag.get(node.input[0])
    if x is not None:
        if trans_a == 0 and x[1] == 1:
            a.raw[x[0]].slices.append((i, 1, 1 if trans_b else 0))
        else:
            a.block(x[0], f"enters Gemm {node.name!r} on axis {x[1]} (transA={trans_a})")
    out_axis = 0 if trans_b else 1
    g = a.new(b.shape[out_axis])
    a.raw[g].producers.append(Producer(i, node.input[1], out_axis))
    a.raw[g].slices.append((i, 1, out_axis))
    if _has_bias(node):
        c = a.const(node.input[2])
        if c is None:
            a.block(g, f"Gemm {node.name!r} adds a non-constant C")
        elif c.ndim >= 1 and c.shape[-1] == b.shape[out_axis] and c.shape[-1] > 1:
            a.raw[g].slices.append((i, 2, c.ndim - 1))
        elif c.ndim >= 1 and c.shape[-1] != 1:
            a.block(g, f"Gemm {node.name!r} has a C of shape {c.shape}")
    a.mark(node.output[0], g, 1)


@rule("MatMul", starts_groups=True)
def _matmul(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    w = a.const(node.input[1])
    rank = a.rank(node.input[0])
    if w is None or w.ndim != 2 or node.input[0] in a.consts or rank is None or rank < 2:
        return a.block_inputs(node, f"enters MatMul {node.name!r} (not activation x constant 2-D weight)")
    x = a.tag.get(node.input[0])
    if x is not None:
        if x[1] == rank - 1:
            a.raw[x[0]].slices.append((i, 1, 0))
        else:
            a.block(x[0], f"enters MatMul {node.name!r} on axis {x[1]}")
    g = a.new(w.shape[1])
    a.raw[g].producers.append(Producer(i, node.input[1], 1))
    a.raw[g].slices.append((i, 1, 1))
    a.mark(node.output[0], g, rank - 1)


# channel-wise ops: the group passes through -----------------------------------------------------

def _one_output(node: onnx.NodeProto) -> bool:
    return len([o for o in node.output if o]) == 1


@rule(*UNARY)
def _elementwise(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    if [k for k, n in enumerate(node.input) if n in a.tag] != [0] or not _one_output(node):
        return a.block_inputs(node)
    g, axis = a.tag[node.input[0]]
    a.mark(node.output[0], g, axis)


@rule(*CHANNEL_NORMS)
def _channel_norm(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    """Per-channel statistics and affine parameters are sliced with the group."""
    slots = CHANNEL_NORMS[node.op_type]
    g, axis = a.tag.get(node.input[0], (None, None))
    ok = (g is not None and axis == 1 and _one_output(node)
          and all(a.const(node.input[s]) is not None for s in slots) and not a.tagged_params(node))
    if not ok:
        return a.block_inputs(node)
    for s in slots:
        a.raw[g].slices.append((i, s, 0))
    a.mark(node.output[0], g, 1)


@rule(*POOL)
def _pool(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    g, axis = a.tag[node.input[0]]
    tagged = [k for k, n in enumerate(node.input) if n in a.tag]
    if tagged != [0] or axis != 1 or not _one_output(node):
        return a.block_inputs(node)
    a.mark(node.output[0], g, 1)


@rule("Resize", "Upsample")
def _resize(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    """Interpolation of other axes keeps the group (an FPN's or U-Net's upsampling): the channel
    axis's scale must be a constant 1, or its target size a constant (rewritten with the group)."""
    g, axis = a.tag.get(node.input[0], (None, None))
    if g is None or a.tagged_params(node) or not _one_output(node) or attr(node, "axes") is not None:
        return a.block_inputs(node, f"enters {node.op_type} {node.name!r}")
    if node.op_type == "Upsample" or onnx_opset(a.model) <= 10:  # (X, scales)
        slot = 1
    else:  # (X, roi, scales, sizes): one of the last two
        slot = 3 if len(node.input) > 3 and node.input[3] else 2
    if slot >= len(node.input) or not node.input[slot]:  # Upsample-7 keeps its scales as an attribute
        scales = attr(node, "scales")
        ok = scales is not None and axis < len(scales) and scales[axis] == 1
        return a.mark(node.output[0], g, axis) if ok else a.block_inputs(node, f"enters {node.op_type} {node.name!r}")
    v = a.const(node.input[slot])
    if v is None or axis >= v.size:
        return a.block_inputs(node, f"enters {node.op_type} {node.name!r} (its scales or sizes are computed)")
    if slot == 3:  # sizes: the channel entry holds the group's size and follows it
        if int(v.reshape(-1)[axis]) != a.size(g):
            return a.block_inputs(node, f"enters {node.op_type} {node.name!r} (resizes the channels)")
        a.raw[g].sizes.append((i, slot, axis))
    elif float(v.reshape(-1)[axis]) != 1.0:
        return a.block_inputs(node, f"enters {node.op_type} {node.name!r} (resizes the channels)")
    a.mark(node.output[0], g, axis)


@rule(*REDUCE)
def _reduce(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    """Reducing other axes keeps the group (squeeze-excite's spatial mean); reducing it blocks."""
    g, axis = a.tag.get(node.input[0], (None, None))
    rank = a.rank(node.input[0])
    axes = a.const_axes(node)
    if g is None or rank is None or not axes or a.tagged_params(node):
        return a.block_inputs(node, f"enters {node.op_type} {node.name!r} (all axes or unknown)")
    axes = sorted(v % rank for v in axes)
    if axis in axes:
        return a.block_inputs(node, f"is reduced by {node.op_type} {node.name!r}")
    keep = attr(node, "keepdims", 1)
    a.mark(node.output[0], g, axis if keep else axis - sum(v < axis for v in axes))


# elementwise binary ops: slice a per-channel constant, or couple two groups ---------------------

@rule(*BINARY)
def _binary(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    if len(node.input) != 2:
        return a.block_inputs(node)
    r_out = a.rank(node.output[0])
    if r_out is None:
        return a.block_inputs(node, f"{node.op_type} {node.name!r} has no known shape")
    sides = []  # (slot, name, channel axis in the output or None, rank)
    for k, name in enumerate(node.input):
        t = a.tag.get(name)
        r = a.rank(name)
        if r is None:
            return a.block_inputs(node, f"{node.op_type} {node.name!r} has no known shape")
        sides.append((k, name, None if t is None else t[1] + r_out - r, r))
    tagged = [s for s in sides if s[2] is not None]
    if node.op_type == "PRelu" and tagged[0][0] != 0:
        return a.block_inputs(node)
    if len(tagged) == 2:
        return _couple(a, node, tagged[0][1], tagged[0][2], tagged[1][1], tagged[1][2])
    other = next(s for s in sides if s[0] != tagged[0][0])
    _with_untagged(a, i, node, tagged[0][1], tagged[0][2], other, r_out)


def _couple(a: _Analysis, node: onnx.NodeProto, n1: str, a1: int, n2: str, a2: int) -> None:
    """Two groups meet (squeeze-excite's x * gate, x * erf(x)): same size -> one group (union-find,
    Torch-Pruning's dependency graph); a 1-channel group broadcast against the other stays whole."""
    out = node.output[0]
    g1, g2 = a.tag[n1][0], a.tag[n2][0]
    if a.find(g1) == a.find(g2) and a1 == a2:
        return a.mark(out, g1, a1)
    if a.raw[a.find(g1)].parts or a.raw[a.find(g2)].parts:  # a Concat's group stays apart from others
        a.block(g1, f"meets another group at {node.op_type} {node.name!r} after a Concat")
        a.block(g2, f"meets another group at {node.op_type} {node.name!r} after a Concat")
        return
    if a1 != a2:
        a.block(g1, f"meets another group on a different axis at {node.op_type} {node.name!r}")
        a.block(g2, f"meets another group on a different axis at {node.op_type} {node.name!r}")
        return
    s1, s2 = a.size(g1), a.size(g2)
    if s1 == s2:
        return a.mark(out, a.union(g1, g2), a1)
    small, big = (g1, g2) if s1 == 1 else (g2, g1) if s2 == 1 else (None, None)
    if small is None:
        a.block(g1, "size mismatch")
        a.block(g2, "size mismatch")
        return
    a.block(small, f"broadcast against another group at {node.op_type} {node.name!r}")
    a.mark(out, big, a1)


def _with_untagged(a: _Analysis, i: int, node: onnx.NodeProto, name: str, axis: int,
                   other: tuple, r_out: int) -> None:
    """One group and a tensor of none: a constant of the group's size is sliced, a broadcast one is
    fine; a non-constant tensor of the same size (residual with the block input) blocks."""
    ko, other_name, _, r_other = other
    g = a.tag[name][0]
    size = a.size(g)
    aligned = axis - (r_out - r_other)
    dim = a.dim(other_name, aligned) if aligned >= 0 else 1
    if other_name in a.consts:
        if dim == size and size > 1:
            a.raw[g].slices.append((i, ko, aligned))
        elif dim != 1:
            a.block(g, f"{node.op_type} {node.name!r} broadcasts a constant of shape {a.shape.get(other_name)}")
    elif dim != 1:
        a.block(g, f"joins {other_name!r}, which no channel group produces, at {node.op_type} {node.name!r}")
    a.mark(node.output[0], g, axis)


@rule("Concat")
def _concat(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    """Concatenating on the channel axis (a U-Net's skip, an FPN's or a PAN's merge) makes a group of
    parts: the channels of each input at its offset. Each part shrinks by its own producers' scores
    and the consumers of the result are sliced at the kept channels of every part. An input no group
    produces is a part that keeps all its channels."""
    rank = a.rank(node.output[0])
    if rank is None or not _one_output(node):
        return a.block_inputs(node, f"enters Concat {node.name!r} (unknown rank)")
    cat = attr(node, "axis", 0) % rank
    parts, offset = [], 0
    for name in node.input:
        t = a.tag.get(name)
        if t is not None and t[1] != cat:
            return a.block_inputs(node, f"enters Concat {node.name!r} on another axis")
        size = a.size(t[0]) if t is not None else a.dim(name, cat)
        if not isinstance(size, int):
            return a.block_inputs(node, f"enters Concat {node.name!r} (an input of unknown size)")
        g = t[0] if t is not None else a.new(size)
        if t is None:
            a.block(g, f"is {name!r}, which no channel group produces")
        parts.append((g, offset))
        offset += size
    c = a.new(offset)
    a.raw[c].parts = parts
    a.mark(node.output[0], c, cat)


@rule("Split")
def _split(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    """Splitting another axis passes the group to every output. Splitting the channel axis (YOLOv8's
    C2f, CSP blocks) gives each output a group of its own, a piece scored by the producers' rows at
    its offset; the split group then follows its pieces, as a Concat's follows its parts, and the
    Split's sizes are rewritten."""
    g, axis = a.tag.get(node.input[0], (None, None))
    rank = a.rank(node.input[0])
    if g is None or rank is None or a.tagged_params(node):
        return a.block_inputs(node, f"enters Split {node.name!r}")
    outputs = list(node.output)
    if attr(node, "axis", 0) % rank != axis:
        for name in outputs:
            a.mark(name, g, axis)
        return
    sizes = _split_sizes(a, node, a.size(g))
    if isinstance(sizes, str) or a.raw[a.find(g)].parts:
        return a.block_inputs(node, f"enters Split {node.name!r} ({sizes if isinstance(sizes, str) else 'a Concat'})")
    _pieces(a, g, axis, list(zip(outputs, sizes)))
    a.raw[a.find(g)].splits.append(i)


def _pieces(a: _Analysis, g: int, axis: int, outputs: list[tuple[str, int]]) -> None:
    """Group g's channels cut in consecutive pieces, one per (output tensor, size): each a group of
    its own, scored by g's producers' rows at its offset; g's group becomes their composite."""
    root = a.find(g)
    producers = [p for r in range(len(a.raw)) if a.find(r) == root for p in a.raw[r].producers]
    offset = 0
    for name, size in outputs:
        piece = a.new(size)
        a.raw[piece].producers = [p._replace(first=p.first + offset) for p in producers]
        a.raw[root].parts.append((piece, offset))
        a.mark(name, piece, axis)
        offset += size


@rule("Slice")
def _slice(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    """A Slice of other axes keeps the group. Slices of the channel axis whose ranges tile it (torch's
    `chunk` as its legacy exporter writes it: one Slice a piece, bounds folded to constants on
    loading) are a Split: pieces at their offsets, bounds rewritten. Anything else blocks."""
    if node.output[0] in a.tag:  # a piece, made with the first Slice of its tensor
        return
    g, axis = a.tag.get(node.input[0], (None, None))
    rank = a.rank(node.input[0])
    bounds = _slice_bounds(a, node, rank, None if g is None else a.size(g)) if rank is not None else None
    if g is None or a.tagged_params(node) or bounds is None:
        return a.block_inputs(node, f"enters Slice {node.name!r} (bounds not constant)")
    if axis not in bounds:
        return a.mark(node.output[0], g, axis)
    size = a.size(g)
    cuts = []  # (start, end, node index) of every Slice of this tensor on the group's axis
    for k, _ in a.readers.get(node.input[0], []):
        other = a.model.graph.node[k]
        if other.op_type != "Slice":
            continue
        b = _slice_bounds(a, other, rank, size)
        if b is None or axis in b and (len(b) > 1 or b[axis][2] != 1):
            return a.block_inputs(node, f"enters Slice {other.name!r} (not a step-1 cut of the channel axis alone)")
        if axis in b:
            cuts.append((b[axis][0], b[axis][1], k))
    cuts.sort()
    if [c[0] for c in cuts] != [0, *(c[1] for c in cuts[:-1])] or cuts[-1][1] != size or a.raw[a.find(g)].parts:
        return a.block_inputs(node, f"enters Slice {node.name!r} (its Slices do not tile the channels)")
    _pieces(a, g, axis, [(a.model.graph.node[k].output[0], e - s) for s, e, k in cuts])
    a.raw[a.find(g)].cut_slices += [(k, axis) for _, _, k in cuts]


def _slice_bounds(a: _Analysis, node: onnx.NodeProto, rank: int, size: int | None) -> dict[int, tuple] | None:
    """{axis: (start, end, step)} of a Slice with constant bounds (ends clamped to `size` on the
    axes it is known for: only the group's axis matters), or None."""
    names = list(node.input[1:5]) + [""] * (5 - len(node.input))  # opset >= 10 (teachers load at 11+)
    vals = [a.const(n) if n else None for n in names]
    if any(v is None for v, n in zip(vals, names) if n) or vals[0] is None or vals[1] is None:
        return None
    starts, ends, axes, steps = [None if v is None else v.reshape(-1).tolist() for v in vals]
    axes = list(range(len(starts))) if axes is None else [int(x) % rank for x in axes]
    steps = [1] * len(starts) if steps is None else steps
    out = {}
    for ax, s, e, st in zip(axes, starts, ends, steps):
        n = size if size is not None else a.dim(node.input[0], ax)
        if isinstance(n, int):
            s, e = (s + n if s < 0 else min(s, n)), (e + n if e < 0 else min(e, n))
        out[ax] = (int(s), int(e), int(st))
    return out


def _split_sizes(a: _Analysis, node: onnx.NodeProto, total: int) -> list[int] | str:
    """A Split's output sizes along its axis (its `split` input or attribute, else equal parts)."""
    split = attr(node, "split")
    if split is None and len(node.input) > 1 and node.input[1]:
        v = a.const(node.input[1])
        if v is None:
            return "computed sizes"
        split = [int(x) for x in v.reshape(-1)]
    if split is None:
        n = len(node.output)
        if total % n:
            return f"{total} channels in {n} unequal parts"
        split = [total // n] * n
    if len(split) != len(node.output) or sum(split) != total:
        return f"sizes {list(split)} for {total} channels"
    return list(split)


# shape ops that only add or drop size-1 axes: the group moves to its new axis -------------------

def _only_data_tagged(a: _Analysis, node: onnx.NodeProto):
    """(group, axis, input shape) of input 0, or None after blocking what entered."""
    g, axis = a.tag.get(node.input[0], (None, None))
    shape = a.shape.get(node.input[0])
    if g is None or shape is None or a.tagged_params(node):
        a.block_inputs(node)
        return None
    return g, axis, shape


@rule("Flatten")
def _flatten(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    if (t := _only_data_tagged(a, node)) is None:
        return
    g, axis, shape = t
    at = attr(node, "axis", 1) % max(len(shape), 1)
    if at == axis == 1 and all(d == 1 for d in shape[2:]):  # [N, C, 1, 1] -> [N, C]
        return a.mark(node.output[0], g, 1)
    a.block_inputs(node)


@rule("Squeeze")
def _squeeze(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    if (t := _only_data_tagged(a, node)) is None:
        return
    g, axis, shape = t
    axes = a.const_axes(node)
    if axes is None:
        axes = [k for k, d in enumerate(shape) if d == 1]
    axes = [v % len(shape) for v in axes]
    if axis in axes:
        return a.block_inputs(node)
    a.mark(node.output[0], g, axis - sum(v < axis for v in axes))


@rule("Unsqueeze")
def _unsqueeze(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    if (t := _only_data_tagged(a, node)) is None:
        return
    g, axis, shape = t
    axes = a.const_axes(node)
    if axes is None:
        return a.block_inputs(node)
    r_out = len(shape) + len(axes)
    axes = {v % r_out for v in axes}
    kept = [k for k in range(r_out) if k not in axes]
    a.mark(node.output[0], g, kept[axis])


# channels-last reshapes (TensorFlow's Tensordot) and the Shape reads that build their targets ---------

def _last_entry(a: _Analysis, node_index: int, slot: int, size: int) -> tuple[int, int, int] | str | None:
    """Where the last entry of the shape tensor at (node, slot) is stored: (node, slot, entry) of a
    constant holding `size` there, None for a -1 (inferred: nothing to rewrite), or why not."""
    name = a.model.graph.node[node_index].input[slot]
    arr = a.const(name)
    if arr is not None:
        last = int(arr.reshape(-1)[-1]) if arr.size else None
        return None if last == -1 else (node_index, slot, arr.size - 1) if last == size else f"a target ending in {last}"
    k = a.producer.get(name)
    node = a.model.graph.node[k] if k is not None else None
    if node is not None and node.op_type == "Cast":
        return _last_entry(a, k, 0, size)
    if node is not None and node.op_type == "Concat" and attr(node, "axis", 0) in (0, -1):
        return _last_entry(a, k, len(node.input) - 1, size)
    return "a target computed in a way not followed"


@rule("Reshape")
def _reshape(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    if (t := _only_data_tagged(a, node)) is None:
        return
    g, axis, shape = t
    out = a.shape.get(node.output[0])
    size = a.size(g)
    if axis != len(shape) - 1 or not out or out[-1] != size:
        return a.block_inputs(node, f"enters Reshape {node.name!r} (channels not kept last)")
    where = _last_entry(a, i, 1, size)
    if isinstance(where, str):
        return a.block_inputs(node, f"enters Reshape {node.name!r} ({where})")
    if where is not None:
        a.raw[g].sizes.append(where)
    a.mark(node.output[0], g, len(out) - 1)


def _reads_only_other_axes(a: _Analysis, name: str, axis: int, rank: int) -> bool:
    """The shape vector `name` flows only through Cast into Gathers of constant indices without `axis`."""
    for k, _ in a.readers.get(name, []):
        node = a.model.graph.node[k]
        if node.op_type == "Cast":
            if not _reads_only_other_axes(a, node.output[0], axis, rank):
                return False
        elif node.op_type == "Gather" and node.input[0] == name and (idx := a.const(node.input[1])) is not None:
            if axis in {int(v) % rank for v in idx.reshape(-1)}:
                return False
        else:
            return False
    return True


@rule("Shape")
def _shape(a: _Analysis, i: int, node: onnx.NodeProto) -> None:
    g, axis = a.tag[node.input[0]]
    rank = a.rank(node.input[0])
    if (attr(node, "start") is not None or attr(node, "end") is not None or rank is None
            or not _reads_only_other_axes(a, node.output[0], axis, rank)):
        a.block_inputs(node)


def channel_groups(model: onnx.ModelProto) -> list[ChannelGroup]:
    """Every channel group of a (BN-folded) sub-model, shrinkable or not, with the reasons."""
    return _Analysis(model).groups()


def shrink(sub: onnx.ModelProto, k: float, score: str = "l1",
           multiple: int = 1) -> tuple[onnx.ModelProto, list[tuple[int, int]]]:
    """The width-k student of a teacher sub-model, and (old, new) size of each shrinkable group.

    Raises NotApplicable when no group can shrink. k = 1.0 gives the BN-folded teacher."""
    model, sizes, *_ = _shrink(sub, k, score, multiple)
    return model, sizes


def _shrink(sub: onnx.ModelProto, k: float, score: str, multiple: int):
    """`shrink`, the reference the student must compute (the BN-folded teacher with every dropped
    channel zeroed in every weight and constant its group slices: a dropped channel then adds
    nothing to anything kept, whatever the ops between), and the ops that lost input rows (`refit.Cut`:
    what `refit` corrects)."""
    model = fold_batchnorm(sub)
    reference = copy_model(model)
    every = channel_groups(model)
    groups = [g for g in every if g.shrinkable]
    if not groups:
        nodes = model.graph.node
        why = [f"{nodes[g.producers[0][0]].name or nodes[g.producers[0][0]].op_type} "
               f"{g.blocked[0] if g.blocked else 'has one channel'}" for g in every if g.producers]
        more = f"; +{len(why) - 3} more" if len(why) > 3 else ""
        raise NotApplicable("no shrinkable inner channel group" + (f" ({'; '.join(why[:3])}{more})" if why else
                                                                   " (no Conv with group 1, Gemm or MatMul by a constant)"))
    scorer = imp.IMPORTANCE[score]
    nodes = model.graph.node
    edits: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    sizes = []
    kept: dict[int, np.ndarray] = {}  # group id -> the channels it keeps, for the groups that shrink
    for g in groups:
        n = scaled(g.size, k, multiple)
        sizes.append((g.size, n))
        if n < g.size:
            rows = [np.take(get_array(model, p.weight), np.arange(p.first, p.first + g.size), axis=p.axis)
                    for p in g.producers]
            kept[g.id] = imp.keep_indices(scorer(list(zip(rows, (p.axis for p in g.producers)))), n)
    by_id = {g.id: g for g in every}

    def keep_of(gid: int) -> np.ndarray | None:
        """A composite's kept channels: its parts' at their offsets (None: it keeps all)."""
        g = by_id[gid]
        if gid not in kept and g.parts and not g.blocked:
            ks = [keep_of(m) for m, _ in g.parts]
            if any(k is not None for k in ks):
                kept[gid] = np.concatenate([(np.arange(by_id[m].size) if k is None else k) + off
                                            for (m, off), k in zip(g.parts, ks)])
        return kept.get(gid)

    for g in every:
        keep_of(g.id)
    zeros: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    for g in every:
        if g.id not in kept:
            continue
        keep = kept[g.id]
        part_sizes = [len(kept.get(m, range(by_id[m].size))) for m, _ in g.parts]
        for node in g.splits:
            _set_split(model, node, part_sizes)
        for (node, axis), start, size in zip(g.cut_slices, np.cumsum([0, *part_sizes[:-1]]), part_sizes):
            _set_slice(model, node, axis, int(start), int(start) + size)
        n = len(keep)
        for node, slot, axis in dict.fromkeys(g.slices):
            edits.setdefault((node, slot), []).append((axis, keep))
            zeros.setdefault((node, slot), []).append((axis, np.setdiff1d(np.arange(g.size), keep)))
        for node in g.depthwise:
            set_attr(nodes[node], "group", n)
        for name, axis in g.tensors:
            set_dim(model, name, axis, n)
        for node, slot, entry in dict.fromkeys(g.sizes):
            _set_entry(model, node, slot, entry, n)
    kept_at = {name: kept[g.id] for g in every if g.id in kept for name, _ in g.tensors}  # tensor -> kept channels
    cuts = {}  # the ops that lose input rows (not a group's producers, not depthwise), from the folded teacher
    for g in every:
        for node, slot, axis in g.slices if g.id in kept else ():
            if slot == 1 and node not in {p.node for p in g.producers} and node not in g.depthwise:
                n = nodes[node]
                cut = cut_of(n, get_array(model, n.input[1]), axis, kept[g.id], g.size, kept_at.get(n.output[0]))
                if cut is not None:
                    cuts[n.output[0]] = cut
    _apply_slices(model, edits)
    _zero(reference, zeros)
    return model, sizes, reference, list(cuts.values())


def _zero(model: onnx.ModelProto, zeros: dict[tuple[int, int], list[tuple[int, np.ndarray]]]) -> None:
    """Set entries to zero per input slot (a copy per slot: a constant may be read elsewhere too)."""
    taken = names_in_use(model)
    for (node, slot), cuts in zeros.items():
        name = model.graph.node[node].input[slot]
        arr = get_array(model, name).copy()
        for axis, drop in cuts:
            index = [slice(None)] * arr.ndim
            index[axis] = drop
            arr[tuple(index)] = 0
        model.graph.node[node].input[slot] = add_array(model, f"{name}_z", arr, taken)


def _set_entry(model: onnx.ModelProto, node: int, slot: int, entry: int, value: int) -> None:
    """Entry `entry` of the shape constant at (node, slot) becomes `value`; a constant other nodes
    also read is copied first."""
    nodes = model.graph.node
    name = nodes[node].input[slot]
    arr = get_array(model, name).copy()
    arr.reshape(-1)[entry] = value
    if len(consumers(model).get(name, [])) > 1:
        nodes[node].input[slot] = add_array(model, f"{name}_w", arr, names_in_use(model))
    else:
        set_array(model, name, arr)


def _set_split(model: onnx.ModelProto, node: int, sizes: list[int]) -> None:
    """A Split's output sizes become `sizes`: its attribute (opset < 13) or its `split` input (a new
    constant; `num_outputs`, which may not stand beside it, is dropped)."""
    n = model.graph.node[node]
    if onnx_opset(model) < 13:
        return set_attr(n, "split", sizes)
    for k, a in enumerate(n.attribute):
        if a.name == "num_outputs":
            del n.attribute[k]
            break
    name = add_array(model, f"{n.name or 'split'}_sizes", np.array(sizes, np.int64))
    if len(n.input) > 1:
        n.input[1] = name
    else:
        n.input.append(name)


def _set_slice(model: onnx.ModelProto, node: int, axis: int, start: int, end: int) -> None:
    """A Slice's bounds on `axis` become [start, end), as new constants (its own may be read by
    others: torch's chunk shares one Slice's end as the next one's start)."""
    n = model.graph.node[node]
    rank = len(shapes(model)[n.input[0]])
    axes = [int(a) % rank for a in get_array(model, n.input[3]).reshape(-1)] if len(n.input) > 3 and n.input[3] \
        else list(range(get_array(model, n.input[1]).size))
    taken = names_in_use(model)
    for slot, value in ((1, start), (2, end)):
        arr = get_array(model, n.input[slot]).copy()
        arr.reshape(-1)[axes.index(axis)] = value
        n.input[slot] = add_array(model, f"{n.input[slot]}_w", arr, taken)


def _apply_slices(model: onnx.ModelProto, edits: dict[tuple[int, int], list[tuple[int, np.ndarray]]]) -> None:
    """Slice initializers per input slot; an initializer shared by slots that need different
    slices (or none) is copied under a new name for the slots that differ."""
    nodes = model.graph.node
    cons = consumers(model)
    taken = names_in_use(model)
    by_init: dict[str, list[tuple[int, int]]] = {}
    for node, slot in edits:
        by_init.setdefault(nodes[node].input[slot], []).append((node, slot))

    def key(e):
        return tuple((a, tuple(k.tolist())) for a, k in sorted(e, key=lambda x: x[0]))

    for name, slots in by_init.items():
        base = get_array(model, name)
        variants = {key(edits[s]) for s in slots}
        in_place = len(variants) == 1 and len(slots) == len(cons.get(name, []))
        done: dict[tuple, str] = {}
        for s in slots:
            kk = key(edits[s])
            if kk not in done:
                arr = base
                for axis, keep in edits[s]:
                    arr = np.take(arr, keep, axis=axis)
                if in_place:
                    set_array(model, name, arr)
                    done[kk] = name
                else:
                    done[kk] = add_array(model, f"{name}_w", arr, taken)
            nodes[s[0]].input[s[1]] = done[kk]


@register("width", values=(0.0, 1.0, False, True))
def generate(sub: onnx.ModelProto, spec: CandidateSpec) -> Student:
    model, sizes, reference, cuts = _shrink(sub, float(spec.value), "l1", spec.multiple)
    if all(old == new for old, new in sizes):
        raise NotApplicable(f"width {spec.value:g} removes no channel (groups of "
                            f"{', '.join(str(o) for o, _ in sizes)} channels)")
    model = finish(sub, model, str(spec))
    n = param_count(model)
    return Student(spec, model, n, n, reference=reference,
                   refit=refitter(model, sub, cuts) if cuts else None)
