"""heads:k - attention head pruning: each attention sub-layer keeps round(k * H) of its H heads (at
least one), each head keeping its size; the least important heads go.

An attention sub-layer is recognised from its core: a MatMul of two activations (the scores, rank 4,
heads on axis -3) whose output reaches a Softmax over its last axis through elementwise ops with
operands from outside (scale, mask) and Reshapes, and whose probabilities are the left operand of a
second MatMul (the context). Q, K and V are followed back from the core through data-movement ops
(Transpose, Reshape, Squeeze, Unsqueeze, Flatten, Split, Slice, Gather, Identity, Cast) and
elementwise ops with a constant (bias, scale) to their projection: a MatMul by a constant 2-D weight,
a Gemm, or a Conv (tf2onnx's 1x1 Conv). One fused qkv projection (split by Split, Slice or Gather, or
by a reshape to (..., 3, H, hd)) and three separate ones are the same case here. The context is
followed forward through data-movement ops to the output projection, whose input rows are cut.

Which projection channel and which output-projection row belongs to which head is not read from
names or assumed layouts: an array of channel indices is pushed through the recorded ops with
numpy, using the shapes of one onnxruntime run on made-up inputs (every symbolic dim set to 2, then
3), and must land with one head per channel on the core's head axis. Every tensor between the
projections and the output projection then has a known head per element; the kept heads must form
a sub-grid of it (that gives each axis's kept indices). Weights, biases and constants of those ops
are sliced with it; Split sizes and Reshape targets are rewritten: an entry that is -1, or a copy
(0) of an input dim, or computed from the `Shape` of a tensor that shrinks with it, is left alone;
a literal entry (an initializer, a Concat'd constant piece, or a Concat'd piece computed from shapes
that does not depend on the symbolic dims, such as `Shape(x)[2]`, `Shape(x)[2] / 2` or `3 * d`)
gets the new size. Last, the student must reproduce, on both runs, the teacher whose output
projection rows of the dropped heads are zeroed (the same function by construction): anything the
analysis did not understand fails that check and the family does not apply.

Importance (gradient-free, from the weights only): head h scores ||W_V,h||_F * ||W_O,h||_F, its
value-projection columns times its output-projection rows. Attention probabilities are convex
weights, so head h adds P_h X W_V,h W_O,h to the output, bounded by ||X|| ||W_V,h|| ||W_O,h||;
W_Q and W_K only decide where a head looks, not how much it writes.

Refused, with a reason: no Softmax attention core; scores not of rank 4 (heads folded into the batch
axis, as torch's nn.MultiheadAttention exports); K/V with fewer heads than Q (multi-query); a Q/K/V
not made by a projection through the ops above; projection channels that reach no head or that
also feed something else; a context that reaches anything but an output projection; a Slice or
Gather across the head axis; a shape entry that must change but depends on the symbolic dims;
fused com.microsoft Attention / MultiHeadAttention nodes (packed weights in an op onnx2torch cannot
train); a single head; a k that keeps every head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ndonnx.candidates import importance as imp
from ndonnx.candidates.base import CandidateSpec, NotApplicable, Student, register, scaled
from ndonnx.candidates.onnx_edit import (add_array, attr, consumers, copy_model, differs, finish, fold_batchnorm,
                                         get_array, names_in_use, param_count, producers, set_array, set_attr,
                                         set_dim, unique_name)
from ndonnx.errors import NdonnxError
from ndonnx.sample import ort_session

MOVE = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Split", "Slice", "Gather", "Identity", "Cast",
        "Dropout")
ARITH = ("Add", "Sub", "Mul", "Div")
SCORE_OPS = ARITH + ("Where", "Max", "Min", "Reshape", "Identity", "Cast")  # scores -> Softmax
PROB_OPS = ("Reshape", "Identity", "Cast", "Dropout")  # Softmax -> context MatMul
SHAPE_READERS = ("Shape", "Size")
FUSED = ("Attention", "MultiHeadAttention", "PackedAttention", "DecoderMaskedMultiHeadAttention")
DIMS = (2, 3)  # every symbolic dim takes these values in the two made-up runs
# ... or a fixed size of another input in turn, where they fail; an input past this many elements is
# not tried (a 4-D mask at BERT-base's 768 in every dim: 905M elements, 12 GiB in made-up runs)
MADE_UP_ELEMENTS = 1 << 22

Step = tuple[int, int, int]  # (node index, input slot read, output index written)


@dataclass
class Projection:
    node: int  # MatMul / Gemm / Conv
    axis: int  # feature axis of its output (MatMul: last; Gemm, Conv: 1)


@dataclass
class Core:
    """One attention sub-layer: its core MatMuls, heads, and the op paths around them."""

    scores: int
    context: int
    heads: int
    inputs: dict[str, tuple[Projection, list[Step]]] = field(default_factory=dict)  # q, k, v: projection -> core
    probs: list[Step] = field(default_factory=list)  # scores -> ... -> context input 0
    out: list[Step] = field(default_factory=list)  # context -> ... -> output projection input
    out_proj: Projection | None = None  # axis: the input axis of its rows
    channels: dict[str, np.ndarray] = field(default_factory=dict)  # q, k, v: projection output channels used
    owner: dict[str, np.ndarray] = field(default_factory=dict)  # q, k, v: global head of each of those channels
    kept: np.ndarray | None = None  # head indices kept (ascending), filled by `plan`
    importance: np.ndarray | None = None


# --- made-up runs ----------------------------------------------------------------------------------

def _feeds(model: onnx.ModelProto, n: int, rest: int | None) -> dict[str, np.ndarray]:
    """Inputs with every symbolic batch dim set to n and other symbolic dims to `rest` (n if None):
    floats random (seeded), ints zero (a valid index), booleans true."""
    rng = np.random.default_rng(n)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else n if a == 0 or rest is None else rest
                for a, d in enumerate(t.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        if int(np.prod(dims)) > MADE_UP_ELEMENTS:
            raise NotApplicable(f"made-up input {vi.name!r} would be {dims}")
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[vi.name] = np.ones(dims, dtype) if dtype == np.bool_ else np.zeros(dims, dtype)
    return feeds


def _session(model: onnx.ModelProto, outputs: list[str] | None = None):
    """An onnxruntime session, with `outputs` exposed too."""
    try:
        return ort_session(model, outputs=outputs or ())
    except NdonnxError as e:
        raise NotApplicable(str(e)) from e


def _runs(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """Every tensor's value (initializers and inputs included) in one run per entry of DIMS. A block
    cut from a teacher may hold one input whose sequence length the sample fixed and another where it
    is symbolic: then the symbolic one takes each fixed length in turn until the block runs."""
    names = [o for node in model.graph.node for o in node.output if o]
    fixed = sorted({d.dim_value for vi in model.graph.input for a, d in enumerate(vi.type.tensor_type.shape.dim)
                    if a > 0 and d.dim_value > 1})
    error = None
    sess = _session(model, names)
    out_names = [o.name for o in sess.get_outputs()]
    for rest in [None, *fixed]:
        try:
            runs = []
            for n in DIMS:
                feeds = _feeds(model, n, rest)
                vals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
                vals.update(feeds)
                vals.update(zip(out_names, sess.run(out_names, feeds)))
                runs.append(vals)
            return runs
        except Exception as e:  # noqa: BLE001 - onnxruntime's refusal of these made-up sizes
            error = error or e
    raise NotApplicable(f"the block does not run on made-up inputs ({str(error).strip().splitlines()[0][:120]})")


# --- finding the attention sub-layers ------------------------------------------------------------

class _Graph:
    def __init__(self, model: onnx.ModelProto, vals: dict[str, np.ndarray]):
        self.model, self.nodes, self.vals = model, model.graph.node, vals
        self.consts = {t.name for t in model.graph.initializer}
        self.prod = producers(model)
        self.cons = consumers(model)

    def users(self, name: str) -> list[tuple[int, int]]:
        """Readers of a tensor other than Shape/Size (which only read its shape)."""
        return [(i, k) for i, k in self.cons.get(name, []) if self.nodes[i].op_type not in SHAPE_READERS]

    def two_activations(self, node: onnx.NodeProto) -> bool:
        return node.op_type == "MatMul" and not any(n in self.consts for n in node.input)

    def projection(self, i: int) -> Projection | None:
        node = self.nodes[i]
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[0] in self.consts:
            return None
        w = get_array(self.model, node.input[1]) if node.input[1] in self.consts else None
        if w is None:
            return None
        if node.op_type == "MatMul" and w.ndim == 2:
            return Projection(i, self.vals[node.output[0]].ndim - 1)
        if node.op_type == "Gemm" and w.ndim == 2 and not attr(node, "transA", 0):
            return Projection(i, 1)
        if node.op_type == "Conv" and attr(node, "group", 1) == 1:
            return Projection(i, 1)
        return None

    def back_to_projection(self, name: str, what: str) -> tuple[Projection, list[Step]]:
        """The ops from a projection's output to `name`, in forward order."""
        steps: list[Step] = []
        while True:
            i = self.prod.get(name)
            if i is None:
                raise NotApplicable(f"{what} is not computed inside the block")
            node = self.nodes[i]
            proj = self.projection(i)
            if proj is not None and node.output[0] == name:
                return proj, steps[::-1]
            if node.op_type in MOVE:
                slot = 0
            elif node.op_type in ARITH and len(node.input) == 2 and sum(n in self.consts for n in node.input) == 1:
                slot = 0 if node.input[1] in self.consts else 1
            else:
                raise NotApplicable(f"{what} comes from {node.op_type} {_label(node)}, not from a linear projection")
            steps.append((i, slot, list(node.output).index(name)))
            name = node.input[slot]

    def forward_chain(self, name: str, ops: tuple[str, ...]) -> tuple[list[Step], tuple[int, int]]:
        """Single-reader steps through `ops` from `name`; returns them and the (node, slot) reached."""
        steps: list[Step] = []
        while True:
            users = self.users(name)
            if len(users) != 1:
                return steps, (-1, len(users))
            i, slot = users[0]
            node = self.nodes[i]
            if node.op_type not in ops or len([o for o in node.output if o]) != 1:
                return steps, (i, slot)
            steps.append((i, slot, 0))
            name = node.output[0]


def _label(node: onnx.NodeProto) -> str:
    return repr(node.name or f"{node.op_type} -> {node.output[0]}")


def _cores(g: _Graph) -> list[Core]:
    cores = []
    for i, node in enumerate(g.nodes):
        if not g.two_activations(node):
            continue
        to_soft, (s, _) = g.forward_chain(node.output[0], SCORE_OPS)
        if s < 0 or g.nodes[s].op_type != "Softmax":
            continue
        soft = g.nodes[s]
        x = g.vals[soft.input[0]]
        opset13 = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 1) >= 13
        if attr(soft, "axis", -1 if opset13 else 1) % x.ndim != x.ndim - 1:
            raise NotApplicable(f"Softmax {_label(soft)} is not over the last axis")
        to_ctx, (c, slot) = g.forward_chain(soft.output[0], PROB_OPS)
        if c < 0 or slot != 0 or not g.two_activations(g.nodes[c]):
            raise NotApplicable(f"the probabilities of Softmax {_label(soft)} do not reach a MatMul with V")
        ctx = g.nodes[c]
        shapes = [g.vals[n].shape for n in (*node.input, *ctx.input, ctx.output[0])]
        if any(len(s) != 4 for s in shapes):
            raise NotApplicable(f"attention at MatMul {_label(node)} is not of rank 4 (heads folded into the batch axis)")
        heads = shapes[0][1]
        if any(s[1] != heads for s in shapes):
            raise NotApplicable(f"attention at MatMul {_label(node)}: K/V heads differ from Q heads")
        probs = to_soft + [(s, 0, 0)] + to_ctx
        cores.append(Core(i, c, heads, probs=probs))
    return cores


def _wire(g: _Graph, core: Core) -> None:
    """The projections of Q, K, V and the output projection of one core."""
    sc, cx = g.nodes[core.scores], g.nodes[core.context]
    for role, name in (("q", sc.input[0]), ("k", sc.input[1]), ("v", cx.input[1])):
        core.inputs[role] = g.back_to_projection(name, f"{role.upper()} of attention at {_label(sc)}")
    core.out, (i, slot) = g.forward_chain(cx.output[0], MOVE)
    proj = g.projection(i) if i >= 0 else None
    if proj is None or slot != 0 or any(g.nodes[s].op_type in ("Split", "Slice", "Gather") for s, _, _ in core.out):
        what = f"{g.nodes[i].op_type} {_label(g.nodes[i])}" if i >= 0 else f"{slot} readers"
        raise NotApplicable(f"the context of attention at {_label(sc)} reaches {what}, not an output projection")
    node = g.nodes[i]
    x = node.input[0]
    proj.axis = g.vals[x].ndim - 1 if node.op_type == "MatMul" else 1
    core.out_proj = proj


# --- heads of every element: channel indices pushed through the recorded ops ---------------------

def _slice_args(g: _Graph, node: onnx.NodeProto, vals, rank: int) -> list[slice]:
    if len(node.input) > 1:
        parts = [vals[n].astype(np.int64).reshape(-1) if n else None for n in node.input[1:5]]
        starts, ends, axes, steps = parts + [None] * (4 - len(parts))
    else:  # opset < 10: attributes
        starts, ends, axes, steps = attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    out = [slice(None)] * rank
    for a, s, e, st in zip(axes, starts, ends, steps):
        out[a] = slice(int(s), int(e), int(st))
    return out


def _move(g: _Graph, step: Step, arr: np.ndarray, vals) -> np.ndarray:
    """Where each element of the step's data input lands in its output (numpy, same semantics)."""
    i, _, out = step
    node = g.nodes[i]
    op = node.op_type
    shape = vals[node.output[out]].shape
    if op == "Transpose":
        return arr.transpose(attr(node, "perm") or list(range(arr.ndim))[::-1])
    if op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten"):
        return arr.reshape(shape)
    if op == "Split":
        axis = attr(node, "axis", 0) % arr.ndim
        start = sum(vals[o].shape[axis] for o in node.output[:out])
        return np.take(arr, range(start, start + shape[axis]), axis=axis)
    if op == "Slice":
        return arr[tuple(_slice_args(g, node, vals, arr.ndim))]
    if op == "Gather":
        return np.take(arr, vals[node.input[1]].astype(np.int64), axis=attr(node, "axis", 0))
    if op == "Softmax" or op in ("Identity", "Cast", "Dropout"):
        return arr
    return np.broadcast_to(arr, shape)  # elementwise with an operand from outside


def _walk(g: _Graph, steps: list[Step], arr: np.ndarray, vals, out: dict[str, np.ndarray]) -> np.ndarray:
    for step in steps:
        arr = _move(g, step, arr, vals)
        out[g.nodes[step[0]].output[step[2]]] = arr
    return arr


def _head_axis(shape: tuple, offset: int) -> np.ndarray:
    """Global head id of each element of a core tensor [B, H, ., .]."""
    return np.broadcast_to((offset + np.arange(shape[1])).reshape(1, -1, 1, 1), shape)


def head_map(g: _Graph, cores: list[Core], vals) -> dict[str, np.ndarray]:
    """tensor -> global head id of every element (core c's head h is sum(heads before c) + h), for
    every tensor from the projections' outputs to the output projections' inputs."""
    heads: dict[str, np.ndarray] = {}
    owner: dict[int, np.ndarray] = {}  # projection node -> head of each output channel (-1: none yet)
    paths: list[tuple[Projection, list[Step], np.ndarray]] = []
    offset = 0
    for core in cores:
        sc, cx = g.nodes[core.scores], g.nodes[core.context]
        for role, (proj, steps) in core.inputs.items():
            y = g.nodes[proj.node].output[0]
            shape = vals[y].shape
            chan = np.broadcast_to(np.arange(shape[proj.axis]).reshape([-1 if a == proj.axis else 1
                                                                        for a in range(len(shape))]), shape)
            at = _walk(g, steps, chan, vals, {})
            want = _head_axis(at.shape, offset)
            table = owner.setdefault(proj.node, np.full(shape[proj.axis], -1))
            for c, h in set(zip(at.reshape(-1).tolist(), want.reshape(-1).tolist())):
                if table[c] not in (-1, h):
                    raise NotApplicable(f"projection {_label(g.nodes[proj.node])}: a channel reaches two heads")
                table[c] = h
            paths.append((proj, steps, chan))
            core.channels[role] = np.unique(at)
        for name in (sc.output[0], cx.output[0], *sc.input, *cx.input):
            heads[name] = _head_axis(vals[name].shape, offset)
        probs = _walk(g, core.probs, heads[sc.output[0]], vals, heads)
        if not np.array_equal(probs, heads[cx.input[0]]):
            raise NotApplicable(f"attention at {_label(sc)}: the path to Softmax mixes heads")
        rows = _walk(g, core.out, heads[cx.output[0]], vals, heads)
        _rows_of(rows, core.out_proj.axis, f"output projection {_label(g.nodes[core.out_proj.node])}")
        offset += core.heads
    for node, table in owner.items():
        if (table < 0).any():
            raise NotApplicable(f"projection {_label(g.nodes[node])}: {int((table < 0).sum())} output channels "
                                "reach no attention head")
    for core in cores:
        for role, (proj, _) in core.inputs.items():
            core.owner[role] = owner[proj.node][core.channels[role]]
    for proj, steps, chan in paths:
        table = owner[proj.node]
        heads[g.nodes[proj.node].output[0]] = table[chan]
        mapped: dict[str, np.ndarray] = {}
        _walk(g, steps, chan, vals, mapped)
        heads.update((n, table[a]) for n, a in mapped.items())
    return heads


def _rows_of(arr: np.ndarray, axis: int, what: str) -> np.ndarray:
    """The one head of each index along `axis`."""
    moved = np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)
    if (moved != moved[:, :1]).any():
        raise NotApplicable(f"{what}: an input row mixes heads")
    return moved[:, 0]


def kept_axes(heads: np.ndarray, kept: np.ndarray) -> list[np.ndarray] | None:
    """Per axis, the indices that hold a kept head, when the kept elements form exactly that sub-grid."""
    mask = np.isin(heads, kept)
    keep = [np.flatnonzero(np.moveaxis(mask, a, 0).reshape(mask.shape[a], -1).any(axis=1)) for a in range(mask.ndim)]
    if int(mask.sum()) != int(np.prod([len(k) for k in keep])) or not mask[np.ix_(*keep)].all():
        return None
    return keep


# --- importance and the plan ------------------------------------------------------------------------

def head_importance(wv_heads: list[np.ndarray], wo_heads: list[np.ndarray]) -> np.ndarray:
    """||W_V,h||_F * ||W_O,h||_F per head, from each head's V columns and output-projection rows."""
    return np.array([np.linalg.norm(np.asarray(v, np.float64)) * np.linalg.norm(np.asarray(o, np.float64))
                     for v, o in zip(wv_heads, wo_heads)])


def _weight_axis(node: onnx.NodeProto, output_side: bool) -> int:
    """Axis of the weight that holds a projection's output channels (or input rows)."""
    if node.op_type == "Conv":
        return 0 if output_side else 1
    trans = node.op_type == "Gemm" and attr(node, "transB", 0)
    return (0 if trans else 1) if output_side else (1 if trans else 0)


def _importance(g: _Graph, core: Core, heads: dict[str, np.ndarray], offset: int) -> np.ndarray:
    proj, _ = core.inputs["v"]
    vnode, onode = g.nodes[proj.node], g.nodes[core.out_proj.node]
    orows = _rows_of(heads[onode.input[0]], core.out_proj.axis, "output projection")
    wv, wo = get_array(g.model, vnode.input[1]), get_array(g.model, onode.input[1])
    ax_v, ax_o = _weight_axis(vnode, True), _weight_axis(onode, False)
    vchan, vhead = core.channels["v"], core.owner["v"]
    return head_importance([np.take(wv, vchan[vhead == offset + h], axis=ax_v) for h in range(core.heads)],
                           [np.take(wo, np.flatnonzero(orows == offset + h), axis=ax_o) for h in range(core.heads)])


def plan(sub: onnx.ModelProto, k: float) -> tuple[onnx.ModelProto, _Graph, list[Core], list[dict]]:
    """The BN-folded teacher, its graph, its attention sub-layers with the heads kept at k (ascending
    per sub-layer), and the made-up runs. Raises NotApplicable where heads cannot be cut."""
    model = fold_batchnorm(sub)
    fused = [n for n in model.graph.node if n.domain == "com.microsoft" and n.op_type in FUSED]
    if fused:
        raise NotApplicable(f"fused com.microsoft {fused[0].op_type} {fused[0].name!r} (packed weights onnx2torch "
                            "cannot train) is not rewritten")
    if not any(n.op_type == "Softmax" for n in model.graph.node):
        raise NotApplicable("no attention (no Softmax)")
    runs = _runs(model)
    g = _Graph(model, runs[0])
    cores = _cores(g)
    if not cores:
        raise NotApplicable("no attention core (MatMul of two activations -> Softmax -> MatMul)")
    for core in cores:
        if core.heads < 2:
            raise NotApplicable(f"attention at {_label(g.nodes[core.scores])} has a single head")
        _wire(g, core)
    heads = head_map(g, cores, runs[0])
    offset = 0
    for core in cores:
        core.importance = _importance(g, core, heads, offset)
        core.kept = imp.keep_indices(core.importance, scaled(core.heads, k))
        offset += core.heads
    return model, g, cores, runs


# --- the rewrite -----------------------------------------------------------------------------------

class _Edit:
    """The student being written: weights per input slot (copied when shared), new nodes to place
    before a given node, value_info dims."""

    def __init__(self, model: onnx.ModelProto):
        self.model = copy_model(model)
        self.nodes = self.model.graph.node
        self.cons = consumers(self.model)
        self.taken = names_in_use(self.model)
        self.before: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []

    def put(self, i: int, slot: int, array: np.ndarray, base: str | None = None) -> str:
        """New value for the constant read at (node i, slot): in place when only that slot reads it."""
        node = self.nodes[i]
        name = node.input[slot] if slot < len(node.input) else ""
        if name and base is None and len(self.cons.get(name, [])) == 1 and any(
                t.name == name for t in self.model.graph.initializer):
            set_array(self.model, name, array)
            return name
        new = add_array(self.model, f"{base or name}_heads", array, self.taken)
        node.input[slot] = new
        return new

    def fresh(self, base: str) -> str:
        return unique_name(self.taken, base)

    def done(self) -> onnx.ModelProto:
        for anchor, new in self.before:  # new nodes go right before the node that reads them
            at = next(k for k, n in enumerate(self.nodes) if n is anchor)
            for n in reversed(new):
                self.nodes.insert(at, n)
        self.before = []
        return self.model


def _dims(keeps: dict[str, list[np.ndarray]], vals: dict, name: str) -> tuple[int, ...]:
    """A tensor's dims in the student (concrete, in one made-up run)."""
    kk = keeps.get(name)
    return tuple(len(k) for k in kk) if kk is not None else tuple(vals[name].shape)


def _slice_const(c: np.ndarray, keep: list[np.ndarray], full: tuple[int, ...]) -> np.ndarray:
    """A constant broadcast against a tensor of dims `full`, cut where that tensor is cut."""
    lead = len(full) - c.ndim
    for a, k in enumerate(keep):
        ca = a - lead
        if ca >= 0 and c.shape[ca] == full[a] and len(k) < full[a]:
            c = np.take(c, k, axis=ca)
    return c


def _weights(ed: _Edit, g: _Graph, cores: list[Core], keeps: dict, vals: dict) -> None:
    """Projection weights and biases, output-projection rows, constants met on the way."""
    done: set[int] = set()
    for core in cores:
        for proj, _ in core.inputs.values():
            if proj.node in done:
                continue
            done.add(proj.node)
            node = g.nodes[proj.node]
            keep = keeps[node.output[0]][proj.axis]
            ed.put(proj.node, 1, np.take(get_array(g.model, node.input[1]), keep, axis=_weight_axis(node, True)))
            b = get_array(g.model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if b is not None and b.ndim >= 1 and b.shape[-1] == vals[node.output[0]].shape[proj.axis] and b.shape[-1] > 1:
                ed.put(proj.node, 2, np.take(b, keep, axis=b.ndim - 1))
            elif b is not None and b.size > 1 and node.op_type == "Gemm":
                raise NotApplicable(f"Gemm {_label(node)} has a C of shape {b.shape}")
        node = g.nodes[core.out_proj.node]
        keep = keeps[node.input[0]][core.out_proj.axis]
        ed.put(core.out_proj.node, 1, np.take(get_array(g.model, node.input[1]), keep, axis=_weight_axis(node, False)))


def _operands(ed: _Edit, g: _Graph, steps: list[Step], keeps: dict, vals: dict) -> None:
    """Elementwise ops on the way: constants are cut with the tensor, other operands must broadcast."""
    for i, slot, out in dict.fromkeys(steps):
        node = g.nodes[i]
        if node.op_type in MOVE or node.op_type == "Softmax":
            continue
        y = node.output[out]
        full, keep = vals[y].shape, keeps[y]
        for k, name in enumerate(node.input):
            if k == slot or not name:
                continue
            if name in g.consts:
                c = get_array(g.model, name)
                cut = _slice_const(c, keep, full)
                if cut.shape != c.shape:
                    ed.put(i, k, cut)
                continue
            dims = vals[name].shape
            lead = len(full) - len(dims)
            if any(a >= lead and dims[a - lead] != 1 and len(keep[a]) < full[a] for a in range(len(full))):
                raise NotApplicable(f"{node.op_type} {_label(node)} adds a per-head input {name!r} from outside")


def _movers(ed: _Edit, g: _Graph, steps: list[Step], keeps: list[dict], runs: list[dict]) -> list[int]:
    """Split sizes rewritten, Slice/Gather across a cut axis refused; returns the Reshapes met."""
    reshapes = []
    for i, slot, out in dict.fromkeys(steps):
        node = g.nodes[i]
        x = node.input[slot]
        cut = [a for a, k in enumerate(keeps[0][x]) if len(k) < runs[0][x].shape[a]]
        if node.op_type == "Reshape":
            reshapes.append(i)
        elif node.op_type in ("Slice", "Gather") and cut:
            acts = (attr(node, "axis", 0) % runs[0][x].ndim,) if node.op_type == "Gather" else [
                a for a, s in enumerate(_slice_args(g, node, runs[0], runs[0][x].ndim)) if s != slice(None)]
            if set(acts) & set(cut):
                raise NotApplicable(f"{node.op_type} {_label(node)} cuts across the head axis")
        elif node.op_type == "Split":
            axis = attr(node, "axis", 0) % runs[0][x].ndim
            if axis not in cut:
                continue
            sizes = [[len(kk[o][axis]) if o in kk else -1 for o in node.output] for kk in keeps]
            if sizes[0] != sizes[1] or -1 in sizes[0]:
                raise NotApplicable(f"Split {_label(node)}: its new sizes are not fixed")
            if len(node.input) > 1 and node.input[1]:
                if node.input[1] not in g.consts:
                    raise NotApplicable(f"Split {_label(node)}: its sizes are computed")
                ed.put(i, 1, np.array(sizes[0], np.int64))
            elif attr(node, "split") is not None:
                set_attr(ed.nodes[i], "split", sizes[0])
            elif len(set(sizes[0])) != 1:
                raise NotApplicable(f"Split {_label(node)}: equal parts no longer fit")
    return list(dict.fromkeys(reshapes))


# shape entries: the Reshape targets evaluated apart from the data, with any tensor dims

def _shape_values(model: onnx.ModelProto, names: list[str], keeps: dict, vals: dict) -> dict[str, np.ndarray]:
    """The values of `names` (shape tensors) when every tensor a Shape/Size reads has its dims in
    the student (`keeps`; {} for the teacher): their ancestors, cut at those readers, run by
    onnxruntime on zeros."""
    prod = producers(model)
    inits = {t.name: t for t in model.graph.initializer}
    out = {n: numpy_helper.to_array(inits[n]) for n in names if n in inits}
    nodes, fed, stack = set(), set(), [n for n in names if n not in inits]
    while stack:
        name = stack.pop()
        i = prod.get(name)
        if name in inits or i in nodes:
            continue
        if i is None:
            raise NotApplicable(f"a reshape target reads the activation {name!r}")
        nodes.add(i)
        node = model.graph.node[i]
        if node.op_type in SHAPE_READERS:
            fed.add(node.input[0])
        else:
            stack.extend(n for n in node.input if n)
    todo = [n for n in names if n not in inits]
    if not todo:
        return out
    g = model.graph
    reads = {n for i in nodes for n in g.node[i].input}
    graph = helper.make_graph(
        [g.node[i] for i in sorted(nodes)], "shapes",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(vals[n].dtype), None) for n in sorted(fed)],
        [helper.make_tensor_value_info(n, onnx.TensorProto.INT64, None) for n in todo],  # Reshape reads int64
        [inits[n] for n in sorted(reads & inits.keys())])
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    sess = _session(sub)
    feeds = {n: np.zeros(_dims(keeps, vals, n), vals[n].dtype) for n in sorted(fed)}
    out.update(zip(todo, sess.run(todo, feeds)))
    return out


def _reshaped(shape: tuple, target: np.ndarray, allowzero: int) -> tuple[int, ...]:
    out = [int(shape[e]) if v == 0 and not allowzero else int(v) for e, v in enumerate(target.reshape(-1))]
    if -1 in out:
        known = int(np.prod([v for v in out if v != -1]))
        out[out.index(-1)] = int(np.prod(shape)) // known if known else 0
    return tuple(out)


def _targets(ed: _Edit, g: _Graph, reshapes: list[int], keeps: list[dict], runs: list[dict]) -> None:
    """Rewrite the literal entries of Reshape targets that must follow the heads."""
    names = [g.nodes[i].input[1] for i in reshapes]
    teacher = [_shape_values(g.model, names, {}, vals) for vals in runs]
    student = [_shape_values(g.model, names, kk, vals) for kk, vals in zip(keeps, runs)]
    for i in reshapes:
        node = g.nodes[i]
        x, y, t = node.input[0], node.output[0], node.input[1]
        allow = attr(node, "allowzero", 0)
        want = [_dims(kk, rr, y) for kk, rr in zip(keeps, runs)]
        if all(_reshaped(_dims(kk, rr, x), s[t], allow) == w for kk, rr, s, w in zip(keeps, runs, student, want)):
            continue
        fix = {}
        for e, v in enumerate(teacher[0][t].reshape(-1).tolist()):
            if v == -1 or (v == 0 and not allow):
                continue
            if any(int(s[t].reshape(-1)[e]) != w[e] for s, w in zip(student, want)):
                if len({w[e] for w in want}) != 1:
                    raise NotApplicable(f"Reshape {_label(node)}: entry {e} of its target must change with the input size")
                fix[e] = want[0][e]
        if not fix:
            raise NotApplicable(f"Reshape {_label(node)}: its -1/0 entries do not give the pruned shape")
        _set_entries(ed, g, i, fix, runs)
    model = ed.done()
    for i in reshapes:
        node = model.graph.node[next(k for k, n in enumerate(model.graph.node) if n.output[0] == g.nodes[i].output[0])]
        for kk, rr in zip(keeps, runs):
            got = _shape_values(model, [node.input[1]], kk, rr)[node.input[1]]
            if _reshaped(_dims(kk, rr, node.input[0]), got, attr(node, "allowzero", 0)) != _dims(kk, rr, node.output[0]):
                raise NotApplicable(f"Reshape {_label(node)}: its target cannot be rewritten for the kept heads")


def _set_entries(ed: _Edit, g: _Graph, i: int, fix: dict[int, int], runs: list[dict]) -> None:
    """Entries of Reshape i's target set to new sizes: in a copy of the constant, or of the Concat
    that builds it (its constant or static pieces replaced); the Reshape reads the copy."""
    node, target = ed.nodes[i], g.nodes[i].input[1]
    chain, src = [], target
    while src in g.prod and g.nodes[g.prod[src]].op_type in ("Cast", "Identity"):
        chain.append(g.nodes[g.prod[src]])
        src = g.nodes[g.prod[src]].input[0]
    if src in g.consts:
        new = runs[0][target].astype(np.int64).reshape(-1).copy()
        new[list(fix)] = list(fix.values())
        node.input[1] = add_array(ed.model, f"{target}_heads", new, ed.taken)
        return
    concat = g.nodes[g.prod[src]] if src in g.prod else None
    if concat is None or concat.op_type != "Concat":
        what = concat.op_type if concat is not None else "an input"
        raise NotApplicable(f"Reshape {_label(node)}: its target comes from {what}, whose head count cannot be set")
    pieces, start = list(concat.input), 0
    for j, p in enumerate(concat.input):
        size = runs[0][p].size
        mine = {e - start: v for e, v in fix.items() if start <= e < start + size}
        start += size
        if not mine:
            continue
        if p not in g.consts and not all(np.array_equal(runs[0][p], r[p]) for r in runs):
            raise NotApplicable(f"Reshape {_label(node)}: the piece {p!r} of its target depends on the input size")
        new = runs[0][p].reshape(-1).copy()
        new[list(mine)] = list(mine.values())
        pieces[j] = add_array(ed.model, f"{p}_heads", new.astype(runs[0][p].dtype).reshape(runs[0][p].shape), ed.taken)
    made = [helper.make_node("Concat", pieces, [ed.fresh(f"{src}_heads")], name=ed.fresh(f"{concat.name}_heads"),
                             axis=attr(concat, "axis", 0))]
    for c in reversed(chain):
        copy = onnx.NodeProto()
        copy.CopyFrom(c)
        copy.input[0], copy.output[0], copy.name = made[-1].output[0], ed.fresh(f"{c.output[0]}_heads"), ed.fresh(c.name)
        made.append(copy)
    node.input[1] = made[-1].output[0]
    ed.before.append((node, made))


# --- the check and the generator ------------------------------------------------------------------

def _zeroed(model: onnx.ModelProto, g: _Graph, cores: list[Core], heads: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The teacher with the dropped heads' output-projection rows set to zero: what the student must compute."""
    ed = _Edit(model)
    offset = 0
    for core in cores:
        node = g.nodes[core.out_proj.node]
        rows = _rows_of(heads[node.input[0]], core.out_proj.axis, "output projection")
        drop = np.flatnonzero(~np.isin(rows, offset + core.kept))
        w = get_array(model, node.input[1]).copy()
        index = [slice(None)] * w.ndim
        index[_weight_axis(node, False)] = drop
        w[tuple(index)] = 0
        ed.put(core.out_proj.node, 1, w, base=node.input[1])
        offset += core.heads
    return ed.done()


def _check(student: onnx.ModelProto, reference: onnx.ModelProto, runs: list[dict]) -> None:
    inits = {t.name for t in reference.graph.initializer}
    feeds = [{i.name: vals[i.name] for i in reference.graph.input if i.name not in inits} for vals in runs]
    try:
        why = differs(student, reference, *feeds)
    except NdonnxError as e:
        raise NotApplicable(str(e)) from e
    if why:
        raise NotApplicable(f"the rewritten attention does not compute the teacher without the dropped heads ({why})")


def prune(sub: onnx.ModelProto, k: float) -> tuple[onnx.ModelProto, list[Core]]:
    """The heads-k student (checked) and its attention sub-layers, each with the heads it keeps."""
    model, g, cores, runs = plan(sub, k)
    if all(len(c.kept) == c.heads for c in cores):
        raise NotApplicable(f"heads {k:g} keeps every head ({', '.join(str(c.heads) for c in cores)} heads)")
    kept = np.concatenate([sum(c.heads for c in cores[:j]) + c.kept for j, c in enumerate(cores)])
    maps = [head_map(g, cores, vals) for vals in runs]
    keeps = []
    for hm in maps:
        kk = {}
        for name, arr in hm.items():
            kk[name] = kept_axes(arr, kept)
            if kk[name] is None:
                raise NotApplicable(f"{name!r}: the kept heads do not form a sub-grid of its axes")
        keeps.append(kk)
    steps = [s for c in cores for _, path in c.inputs.values() for s in path] + \
            [s for c in cores for s in (*c.probs, *c.out)]
    ed = _Edit(model)
    _weights(ed, g, cores, keeps[0], runs[0])
    _operands(ed, g, steps, keeps[0], runs[0])
    reshapes = _movers(ed, g, steps, keeps, runs)
    _targets(ed, g, reshapes, keeps, runs)
    student = ed.done()
    for name, kk in keeps[0].items():
        for a, kp in enumerate(kk):
            if len(kp) < runs[0][name].shape[a]:
                _set_static_dim(student, name, a, len(kp))
    student = finish(sub, student, f"heads:{k:g}")
    _check(student, _zeroed(model, g, cores, maps[0]), runs)
    return student, cores


def _set_static_dim(model: onnx.ModelProto, name: str, axis: int, size: int) -> None:
    """value_info follows a cut axis where it records a fixed size (symbolic dims stay)."""
    for vi in model.graph.value_info:
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            dim = vi.type.tensor_type.shape.dim[axis]
            if dim.HasField("dim_value"):
                set_dim(model, name, axis, size)


@register("heads", values=(0.0, 1.0, False, True))
def generate(sub: onnx.ModelProto, spec: CandidateSpec) -> Student:
    model, _ = prune(sub, float(spec.value))
    n = param_count(model)
    return Student(spec, model, n, n)
