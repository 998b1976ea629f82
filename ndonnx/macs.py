"""Multiply-accumulates (MACs) per node, per neighbourhood and for the whole model: a deterministic
compute figure for `ndonnx check --max-macs` and `ndonnx inspect` (latency is too noisy to gate in CI).
No torch: the light install runs it.

Counted for one sample: the first dim of every graph input, when symbolic, is the batch and is set to
1. Other symbolic input dims (sequence length, image size) take their value from `dims` ({dim name:
value}; `inspect` passes the shapes of its sample run, `check` its `--dim NAME=SIZE` options); a symbol
left without a value is refused with an NdonnxError naming it, never guessed. An input whose first
dim is fixed keeps it (a model exported with a fixed batch of 8 is counted for its 8 samples).
Shapes then come from onnx shape inference with data propagation (Reshape targets computed from
Shape ops resolve; where its propagation stops, the Shape ops of known shapes are made constants, the
shape arithmetic folded and inference run again).

Each op type's count is one entry of `RULES` ({op_type: fn}, filled by the `@rule` decorator, like
`candidates.width.RULES`): `fn(node, shape)` returns the node's MACs, where `shape(name)` is the
inferred shape of a tensor as a tuple of ints, or None when unknown. The MAC ops:

- Conv: N * Cout * prod(out spatial) * (Cin / group) * prod(kernel), any spatial rank;
- ConvTranspose: N * Cin * prod(in spatial) * (Cout / group) * prod(kernel) (every input element
  meets one kernel slice of each output channel in its group);
- Gemm: M * N * K; MatMul: prod(output shape) * K, broadcast batch dims and 1-D operands included;
- quantized models: ConvInteger, QLinearConv, MatMulInteger and QLinearMatMul as their float ops (a
  QDQ model's Conv/MatMul count as such; QuantizeLinear/DequantizeLinear cost none).

Biases, activations, additions, pooling and normalisations cost no MACs: the elementwise and
normalisation ops that read weights (BatchNormalization, LayerNormalization, Add/Mul of a constant,
PRelu, Gather of an embedding table...) have rules that return 0, so that they are counted as 0 on
purpose. A node is *uncounted* (listed, never taken as 0) when its rule needs a shape that inference
could not give, when it reads a weight and has no rule (LSTM, Einsum), when it is of another domain
than onnx's (a custom op), or when an If/Loop/Scan body holds a MAC op. Ops without weights and
without a rule (Relu, Reshape, pooling, Softmax...) are 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ndonnx import light
from ndonnx.errors import NdonnxError
from ndonnx.graph import WEIGHTED_OPS, attr, fold_constants, graph_inputs, weight_counts

ShapeOf = Callable[[str], tuple | None]
# op_type -> fn(node, shape) -> MACs (None: a shape it needs is unknown). An op type without an
# entry is 0 when it reads no weight, and uncounted when it does.
RULES: dict[str, Callable[[onnx.NodeProto, ShapeOf], int | None]] = {}


def rule(*op_types: str):
    """Decorator: `fn` counts the MACs of `op_types`. Registering an op type twice is an error."""

    def deco(fn):
        for op in op_types:
            if op in RULES:
                raise ValueError(f"op type {op!r} already has a MAC rule")
            RULES[op] = fn
        return fn

    return deco


@rule("Conv")
def _conv(node: onnx.NodeProto, shape: ShapeOf) -> int | None:
    y, w = shape(node.output[0]), shape(node.input[1])
    if y is None or w is None:
        return None
    return math.prod(y) * math.prod(w[1:])  # N*Cout*spatial_out x (Cin/group)*kernel


@rule("ConvTranspose")
def _conv_transpose(node: onnx.NodeProto, shape: ShapeOf) -> int | None:
    x, w = shape(node.input[0]), shape(node.input[1])
    if x is None or w is None:
        return None
    return math.prod(x) * math.prod(w[1:])  # N*Cin*spatial_in x (Cout/group)*kernel


@rule("Gemm")
def _gemm(node: onnx.NodeProto, shape: ShapeOf) -> int | None:
    a, y = shape(node.input[0]), shape(node.output[0])
    if a is None or y is None or len(a) != 2:
        return None
    k = a[0] if attr(node, "transA", 0) else a[1]
    return math.prod(y) * k


@rule("MatMul")
def _matmul(node: onnx.NodeProto, shape: ShapeOf) -> int | None:
    a, y = shape(node.input[0]), shape(node.output[0])
    if a is None or y is None or not a:
        return None
    return math.prod(y) * a[-1]  # the output holds the broadcast batch dims; each element sums K products


rule("ConvInteger")(_conv)  # quantized models: the same products, on integers
rule("MatMulInteger", "QLinearMatMul")(_matmul)


@rule("QLinearConv")
def _qlinear_conv(node: onnx.NodeProto, shape: ShapeOf) -> int | None:
    y, w = shape(node.output[0]), shape(node.input[3])
    if y is None or w is None:
        return None
    return math.prod(y) * math.prod(w[1:])


ZERO_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Clip",
            "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
            "RMSNormalization", "SkipLayerNormalization", "Gather", "GatherElements", "GatherND", "Concat",
            "Expand", "Reshape", "Tile", "Pad", "Equal", "Less", "Greater", "Cast", "Identity", "Unsqueeze",
            "Squeeze", "Transpose", "Slice", "Split", "Resize", "Upsample")


@rule(*ZERO_OPS)
def _zero(node: onnx.NodeProto, shape: ShapeOf) -> int:
    """Elementwise, normalisation and data-movement ops: no multiply-accumulates (biases and
    normalisations are left out of the count on purpose)."""
    return 0


@dataclass
class MacCount:
    total: int  # MACs of the counted nodes, for one sample
    per_node: dict[int, int] = field(default_factory=dict)  # graph.node index -> MACs (counted nodes)
    uncounted: list[tuple[int, str]] = field(default_factory=list)  # (node index, why)

    def of(self, nodes) -> int | None:
        """MACs of these node indices, or None when one of them is uncounted."""
        bad = {i for i, _ in self.uncounted}
        if any(i in bad for i in nodes):
            return None
        return sum(self.per_node.get(i, 0) for i in nodes)


def concrete_dims(model: onnx.ModelProto, feeds: dict) -> dict[str, int]:
    """{symbolic input dim: value} read from concrete input arrays (a sample run), the batch (first
    dim) left out: it is always 1 here."""
    out: dict[str, int] = {}
    for vi in model.graph.input:
        if vi.name not in feeds:
            continue
        actual = getattr(feeds[vi.name], "shape", ())
        for j, d in enumerate(vi.type.tensor_type.shape.dim):
            if j > 0 and d.dim_param and j < len(actual):
                out.setdefault(d.dim_param, int(actual[j]))
    return out


def _fixed(model: onnx.ModelProto, dims: dict[str, int]) -> onnx.ModelProto:
    """A copy with concrete input dims (batch 1), no recorded inner shapes and the outputs' dims
    unknown, so inference starts from the inputs alone (a large model's weights as typed inputs:
    `light.shape_view`)."""
    out = light.shape_view(model)
    g = out.graph
    names = set(graph_inputs(out))
    batch = {vi.type.tensor_type.shape.dim[0].dim_param for vi in g.input
             if vi.name in names and len(vi.type.tensor_type.shape.dim)
             and vi.type.tensor_type.shape.dim[0].dim_param}
    for vi in g.input:
        if vi.name not in names:
            continue
        for j, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                continue
            sym = d.dim_param
            if j == 0 or sym in batch:
                value = 1
            elif sym and sym in dims:
                value = dims[sym]
            else:
                what = f"symbolic dim {sym!r}" if sym else f"an unnamed dim (axis {j})"
                raise NdonnxError(f"cannot count MACs: input {vi.name!r} has {what} of unknown size; give it "
                                  f"with --dim {sym or 'NAME'}=SIZE")
            d.Clear()
            d.dim_value = int(value)
    del g.value_info[:]
    for o in g.output:
        for d in o.type.tensor_type.shape.dim:
            d.Clear()
    return out


def _inferred(model: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # inference refuses inconsistent graphs: say so, not a traceback
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise NdonnxError(f"cannot count MACs: onnx shape inference failed: {first}") from e
    out: dict[str, tuple] = {i.name: tuple(i.dims) for i in inferred.graph.initializer}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if all(d is not None for d in dims):
            out[vi.name] = tuple(dims)
    return out


def _shapes(model: onnx.ModelProto, rounds: int = 8) -> dict[str, tuple]:
    """{tensor name: concrete shape} by onnx shape inference. Its data propagation stops at some
    shape arithmetic (Div, Cast of a Shape's value, as exporters write `d // heads`): a Shape of a
    tensor whose shape is known is then made a constant and the arithmetic folded
    (`graph.fold_constants`), and inference runs again. Tensor names stay, so the shapes apply to
    the nodes of the model given."""
    shapes = _inferred(model)
    for _ in range(rounds):
        known = {}
        for node in model.graph.node:
            if node.op_type == "Shape" and node.domain in ("", "ai.onnx") and node.input[0] in shapes:
                dims = shapes[node.input[0]]
                start, end = attr(node, "start", 0), attr(node, "end", None)
                known[node.output[0]] = np.array(dims[start:end], dtype=np.int64)
        if not known:
            return shapes
        g = model.graph
        kept = [n for n in g.node if not (n.op_type == "Shape" and n.output[0] in known)]
        del g.node[:]
        g.node.extend(kept)
        g.initializer.extend(numpy_helper.from_array(v, k) for k, v in known.items())
        try:
            model = fold_constants(model)
        except Exception:  # onnxruntime refused the folded arithmetic: keep what inference gave
            return shapes
        shapes = {**shapes, **_inferred(model)}
    return shapes


def _body_mac_ops(node: onnx.NodeProto) -> set[str]:
    found: set[str] = set()
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in g.node:
                if n.op_type in WEIGHTED_OPS:
                    found.add(n.op_type)
                found |= _body_mac_ops(n)
    return found


def count_macs(model: onnx.ModelProto, dims: dict[str, int] | None = None) -> MacCount:
    """MACs of every node of a loaded model (`load_teacher(...).model`) for one sample: the total of
    the counted nodes, per node, and the uncounted nodes with the reason."""
    shapes = _shapes(_fixed(model, dims or {}))
    weights = set(weight_counts(model))
    count = MacCount(total=0)
    for i, node in enumerate(model.graph.node):
        label = f"{node.op_type} {(node.name or node.output[0])!r}"
        body = _body_mac_ops(node)
        if body:
            count.uncounted.append((i, f"{label}: {', '.join(sorted(body))} inside its body"))
            continue
        if node.domain not in ("", "ai.onnx"):
            count.uncounted.append((i, f"{label}: an op of domain {node.domain!r}, which has no MAC rules"))
            continue
        fn = RULES.get(node.op_type)
        if fn is None:
            if any(n in weights for n in node.input):
                count.uncounted.append((i, f"{label}: reads weights and has no MAC rule"))
            continue
        macs = fn(node, shapes.get)
        if macs is None:
            count.uncounted.append((i, f"{label}: shapes unknown to onnx shape inference"))
            continue
        count.per_node[i] = int(macs)
        count.total += int(macs)
    return count


def fmt_macs(n: int | None) -> str:
    """31M, 3.61M, 1.2G, 640 (for tables)."""
    if n is None:
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)
