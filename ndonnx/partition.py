"""Cutting a teacher into neighbourhoods: the tensors every path from the primary input to the
outputs must cross (the dominator chain of a virtual sink) are the boundaries."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import networkx as nx
import numpy as np
import onnx

from ndonnx import light
from ndonnx.config import PartitionConfig
from ndonnx.errors import NdonnxError
from ndonnx.graph import NONDETERMINISTIC_OPS, Teacher, attr, node_inputs, subgraph_reads

log = logging.getLogger(__name__)

SOURCE, SINK = ("s", ""), ("k", "")


@dataclass(frozen=True)
class Neighbourhood:
    """A shape-preserving piece of the teacher: `nodes` index `teacher.model.graph.node`."""

    id: int
    inputs: tuple[str, ...]  # the boundary tensor(s) it reads from the previous neighbourhood
    side_inputs: tuple[str, ...]  # tensors from other graph inputs or constants alone (masks)
    outputs: tuple[str, ...]
    nodes: tuple[int, ...]
    weights: tuple[str, ...]  # initializers owned here (read by no other neighbourhood)
    params: int
    # Shape arithmetic it reads (Shape -> Gather -> Concat -> Reshape): a copy of those nodes travels
    # with the neighbourhood, and the tensors they take shapes of are inputs read for their shape only.
    shape_nodes: tuple[int, ...] = ()
    shape_inputs: tuple[str, ...] = ()

    @property
    def feeds(self) -> tuple[str, ...]:
        """The sub-model's inputs, in order: boundary, side, shape-only."""
        return (*self.inputs, *self.side_inputs, *self.shape_inputs)

    def op_types(self, model: onnx.ModelProto) -> dict[str, int]:
        return dict(Counter(model.graph.node[i].op_type for i in self.nodes))


@dataclass(frozen=True)
class Partition:
    primary_input: str
    cuts: tuple[str, ...]
    neighbourhoods: tuple[Neighbourhood, ...]
    outside_nodes: tuple[int, ...]  # side computations (mask and shape paths), evaluated by onnxruntime
    outside_params: int  # weights shared between neighbourhoods or read only outside them

    def feeds_next(self, k: int) -> bool:
        """Neighbourhood k's outputs are exactly what the next one reads (no multi-tensor boundary
        skips past it): the next can run on its outputs alone."""
        nb = self.neighbourhoods
        return k + 1 < len(nb) and nb[k].outputs == nb[k + 1].inputs


SHAPE_OPS = {"Shape", "Size"}
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def shape_tensors(model: onnx.ModelProto, weights, data_edges: frozenset[int] = frozenset()) -> dict[str, int]:
    """Tensors that carry shapes, not activations -> the node that makes them: outputs of Shape/Size
    (except the nodes in `data_edges`) and of weightless ops computed from such values and constants
    (Gather, Concat, ConstantOfShape, Range, ...). Their values follow the batch size, so they are
    recomputed wherever they are read instead of being cached as activations."""
    consts = {i.name for i in model.graph.initializer} - set(weights)
    out: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        ins = [n for n in node.input if n]
        if node.domain not in ("", "ai.onnx") or subgraph_reads(node) or node.op_type in NONDETERMINISTIC_OPS:
            continue
        if node.op_type in SHAPE_OPS and i not in data_edges:
            out.update((o, i) for o in node.output)
        elif ins and any(n in out for n in ins) and all(n in out or n in consts for n in ins):
            out.update((o, i) for o in node.output)
    return out


def index_tensors(model: onnx.ModelProto, weights, shapes: dict[str, int], primary: str) -> dict[str, int]:
    """For an integer or boolean primary input (token ids): the tensors computed from it without
    weights -> the node that makes them. A ragged token batch's (sentence, position) pairs (NonZero
    of ids >= 0), the ids gathered at them, masks and position signals derived from them: their
    values can name a sample's place in the batch, so, like shape tensors, they are recomputed from
    the input wherever they are read instead of being cached. Empty for float inputs (images)."""
    vi = next((i for i in model.graph.input if i.name == primary), None)
    if vi is None or vi.type.tensor_type.elem_type in FLOAT_TYPES:
        return {}
    consts = {i.name for i in model.graph.initializer} - set(weights)
    shape_nodes = set(shapes.values())
    out: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        ins = [n for n in node.input if n]
        if (i in shape_nodes or not ins or node.domain not in ("", "ai.onnx") or subgraph_reads(node)
                or node.op_type in NONDETERMINISTIC_OPS):
            continue
        if any(n == primary or n in out for n in ins) and all(
                n == primary or n in out or n in consts or n in shapes for n in ins):
            out.update((o, i) for o in node.output)
    return out


def forward_reach(model: onnx.ModelProto, start: str, shapes: dict[str, int] | None = None,
                  through: dict[str, int] | None = None) -> set[int]:
    """Indices of the nodes that depend on tensor `start`; with `shapes` (from `shape_tensors`), only
    through activations: a Shape node reads no values, and shape tensors carry none. Nodes making
    `through` tensors (`index_tensors`) are passed through but not counted."""
    consumers: dict[str, list[int]] = {}
    shape_nodes = set((shapes or {}).values())
    for i, node in enumerate(model.graph.node):
        if i in shape_nodes:
            continue
        for name in node_inputs(node):
            if shapes is None or name not in shapes:
                consumers.setdefault(name, []).append(i)
    passed = set((through or {}).values())
    seen: set[int] = set()
    stack = [start]
    while stack:
        for i in consumers.get(stack.pop(), ()):
            if i not in seen:
                seen.add(i)
                stack.extend(model.graph.node[i].output)
    return seen - passed


def choose_primary_input(teacher: Teacher) -> str:
    """The input on whose paths the most weight lies (ties: the first input)."""
    names = teacher.input_names
    if not names:
        raise NdonnxError("the model has no inputs")
    nodes = teacher.model.graph.node
    shapes = shape_tensors(teacher.model, teacher.weights)

    def weight_on_paths(name: str) -> int:
        read = {n for i in forward_reach(teacher.model, name, shapes) for n in nodes[i].input}
        return sum(c for w, c in teacher.weights.items() if w in read)

    return max(names, key=lambda n: (weight_on_paths(n), -names.index(n)))


def partition(teacher: Teacher, cfg: PartitionConfig = PartitionConfig()) -> Partition:
    """Neighbourhoods between the cut tensors. Shape edges are left out of the data flow. Where a
    shape is taken of a tensor that would vanish when another neighbourhood is replaced (one inside
    it), the partition is made again: with that tensor kept as a boundary when it is a cut, else with
    that edge counted as data flow after all."""
    primary = cfg.primary_input or choose_primary_input(teacher)
    if primary not in teacher.input_names:
        raise NdonnxError(f"--primary-input {primary!r} is not an input of the model "
                          f"(inputs: {', '.join(teacher.input_names)})")
    data_edges: frozenset[int] = frozenset()
    keep: frozenset[str] = frozenset()
    nodes = teacher.model.graph.node
    while True:
        part, unstable = _partition(teacher, cfg, primary, data_edges, keep)
        if not unstable:
            break
        keep |= unstable & set(part.cuts)
        data_edges |= {i for i, n in enumerate(nodes) if n.op_type in SHAPE_OPS and n.input[0] in unstable - keep}
    if len(part.cuts) == 1 or len(part.neighbourhoods) == 1:
        log.warning("no cut point found: the whole model is one neighbourhood")
    return part


def _partition(teacher: Teacher, cfg: PartitionConfig, primary: str,
               data_edges: frozenset[int], keep: frozenset[str]) -> tuple[Partition, set[str]]:
    model = teacher.model
    nodes = model.graph.node
    shapes = shape_tensors(model, teacher.weights, data_edges)
    index = index_tensors(model, teacher.weights, shapes, primary)
    main = forward_reach(model, primary, shapes, index)
    inits = {i.name for i in model.graph.initializer}
    main_tensors = {primary} | {o for i in main for o in nodes[i].output}

    g = nx.DiGraph()
    g.add_edge(SOURCE, ("t", primary))
    for i in main:
        reads = [n for n in node_inputs(nodes[i]) if n in main_tensors]
        for name in reads or [primary]:  # a node reading only index tensors hangs off the primary input
            g.add_edge(("t", name), ("n", i))
        for name in nodes[i].output:
            g.add_edge(("n", i), ("t", name))
    outputs = [o.name for o in model.graph.output if o.name in main_tensors]
    if not outputs:
        raise NdonnxError(f"no output of the model depends on the primary input {primary!r}")
    for name in outputs:
        g.add_edge(("t", name), SINK)

    idom = nx.immediate_dominators(g, SOURCE)
    chain = []
    v = SINK
    while v != SOURCE:
        v = idom[v]
        if v[0] == "t":
            chain.append(v[1])
    cuts = tuple(reversed(chain))  # cuts[0] is the primary input

    segment = _segment_of_nodes(g, idom, cuts)
    n_seg = len(cuts)
    seg_nodes: list[list[int]] = [[] for _ in range(n_seg)]
    for i in sorted(main):
        seg_nodes[segment[i]].append(i)

    owner = _weight_owners(teacher, seg_nodes)
    seg_params = [sum(teacher.weights[w] for w, s in owner.items() if s == k) for k in range(n_seg)]
    dims = _inferred_dims(model)
    ranks = {n: len(d) for n, d in dims.items()}
    seg_nodes, seg_params = _merge_wide_cuts(model, dims, cuts, seg_nodes, seg_params, keep, teacher.weights)
    seg_nodes, seg_params = _merge_channel_cuts(teacher, ranks, cuts, seg_nodes, seg_params, keep)
    groups = _group_segments(seg_nodes, seg_params, cfg.block_size, {k for k, c in enumerate(cuts) if c in keep})
    node_sets = [sorted(i for s in segs for i in seg_nodes[s]) for segs in groups]
    owner = _weight_owners(teacher, node_sets)
    if cfg.block_size == 1:  # --block-size asks for coarser pieces: leave them whole
        node_sets = [piece for idx, k in zip(node_sets, range(len(node_sets)))
                     for piece in _split_large(teacher, shapes, ranks, idx,
                                               sum(teacher.weights[w] for w, o in owner.items() if o == k))]
        node_sets = _pair_lone_ops(teacher, node_sets, keep)

    outside_nodes = tuple(i for i in range(len(nodes)) if i not in main)
    side_paths = [i for i in outside_nodes if not set(nodes[i].output) <= shapes.keys()]  # masks, not shape arithmetic
    _, outside_sources = _shape_closure(model, shapes, {n for i in side_paths for n in node_inputs(nodes[i])})
    owner = _weight_owners(teacher, node_sets)
    readers = _readers(model, shapes, main)
    position = {i: p for p, i in enumerate(sorted(main))}
    producer = {o: i for i in main for o in nodes[i].output}
    neighbourhoods = []
    for k, idx in enumerate(node_sets):
        inside = set(idx)
        produced = {o for i in idx for o in nodes[i].output}
        reads = {n for i in idx for n in node_inputs(nodes[i])}
        ins = sorted((n for n in reads if (n in main_tensors and n not in produced)),
                     key=lambda n: (-position.get(producer.get(n), -1), n))  # the latest first: the main flow
        outs = [o for o in outputs if o in produced] + sorted(
            (o for o in produced if o not in outputs and readers.get(o, set()) - inside),
            key=lambda o: (position[producer[o]], o))
        index_nodes, index_sources = _index_closure(model, index, reads)
        ins += [n for n in sorted(index_sources) if n not in ins and n in main_tensors]  # the primary input
        side = tuple(sorted({n for n in reads if n not in main_tensors and n not in inits and n not in shapes
                             and n not in index} | (index_sources - main_tensors)))
        shape_nodes, sources = _shape_closure(model, shapes, reads | {n for i in index_nodes for n in nodes[i].input})
        shape_nodes = tuple(sorted({*shape_nodes, *index_nodes}))
        recomputed = {o for i in index_nodes for o in nodes[i].output}
        weights = tuple(sorted(w for w, s in owner.items() if s == k))
        neighbourhoods.append(Neighbourhood(
            id=k, inputs=tuple(ins), side_inputs=side, outputs=tuple(outs), nodes=tuple(idx), weights=weights,
            params=sum(teacher.weights[w] for w in weights), shape_nodes=shape_nodes,
            shape_inputs=tuple(sorted(sources - produced - recomputed - set(ins) - set(side)))))
    # Tensors that outlive any replacement: graph inputs, boundaries, side computations.
    stable = set(teacher.input_names) | {n for nb in neighbourhoods for n in (*nb.inputs, *nb.outputs)} \
        | {o for i in outside_nodes for o in nodes[i].output}
    unstable = ({t for nb in neighbourhoods for t in nb.shape_inputs} | outside_sources) - stable
    inside = sum(n.params for n in neighbourhoods)
    return Partition(primary_input=primary, cuts=cuts, neighbourhoods=tuple(neighbourhoods),
                     outside_nodes=outside_nodes, outside_params=teacher.params - inside), unstable


# A neighbourhood holding more than this share of the parameters is cut again at small sets of tensors,
# unless it is one block: a residual, bottleneck, inverted-residual (with squeeze-excite) or transformer
# block has at most BLOCK_OPS weighted ops, and cutting it would leave its width students nothing to shrink.
SPLIT_SHARE = 1 / 3
BLOCK_OPS = 5
MAX_FRONTIER = 6  # tensors crossing such a cut, at most (twice that to halve a piece still too large)


def _dense_ops(teacher: Teacher, idx: list[int]) -> int:
    """Ops that mix channels with a constant weight (Conv or ConvTranspose with group 1, Gemm, MatMul):
    a width student needs two of them in one neighbourhood, the inner channels between them."""
    n = 0
    for i in idx:
        node = teacher.model.graph.node[i]
        weighted = any(w in teacher.weights for w in node.input[1:2])
        n += weighted and (node.op_type in ("Gemm", "MatMul") or
                           (node.op_type in ("Conv", "ConvTranspose") and attr(node, "group", 1) == 1))
    return n


# Weighted ops a plain chain is made of; a piece holding another (an LSTM, an embedding Gather) has
# students of its own and is never joined to its neighbours.
CHAIN_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
                       "Add", "Mul", "Sub", "Div", "PRelu", "Clip"})


def _chainable(teacher: Teacher, idx: list[int]) -> bool:
    nodes = teacher.model.graph.node
    return all(nodes[i].op_type in CHAIN_OPS for i in idx if any(w in teacher.weights for w in nodes[i].input))


def _pair_lone_ops(teacher: Teacher, node_sets: list[list[int]], keep: frozenset[str]) -> list[list[int]]:
    """A plain chain (a depthwise-separable backbone, a VGG without residuals) is cut after every op,
    each piece holding one channel-mixing op and so no inner channels for a width student. Runs of two
    or more such pieces are joined, consecutive ones, until each holds two channel-mixing ops (a
    depthwise-separable pair then sits between two 1x1 convolutions: the inner channels are the first
    one's outputs). A lone piece next to a block (a ResNet's stem, a classifier head) is left as it is;
    never across a kept boundary or beyond SPLIT_SHARE of the parameters."""
    nodes = teacher.model.graph.node
    dense = [_dense_ops(teacher, idx) for idx in node_sets]
    lone = [d <= 1 and _chainable(teacher, idx) for d, idx in zip(dense, node_sets)]
    params = [sum(teacher.weights.get(n, 0) for n in {n for i in idx for n in nodes[i].input}) for idx in node_sets]
    count = lambda c: sum(dense[m] for m in c)  # noqa: E731  (c: indices of joined pieces)
    size = lambda c: sum(params[m] for m in c)  # noqa: E731

    def kept_between(a: list[int], b: list[int]) -> bool:
        made = {o for i in a for o in nodes[i].output}
        return bool(made & keep & {n for i in b for n in node_inputs(nodes[i])})

    cap = SPLIT_SHARE * teacher.params
    out: list[list[int]] = []
    k = 0
    while k < len(node_sets):
        j = k
        while j + 1 < len(node_sets) and lone[j] and lone[j + 1] and not kept_between(node_sets[j], node_sets[j + 1]):
            j += 1
        if j == k:  # not in a run of lone pieces
            out.append(node_sets[k])
            k += 1
            continue
        chunks: list[list[int]] = []  # indices of the pieces joined into each chunk
        for m in range(k, j + 1):
            if chunks and count(chunks[-1]) < 2 and size(chunks[-1]) + params[m] <= cap:
                chunks[-1].append(m)
            else:
                chunks.append([m])
        if len(chunks) > 1 and count(chunks[-1]) < 2 and size(chunks[-2]) + size(chunks[-1]) <= cap:
            chunks[-2:] = [chunks[-2] + chunks[-1]]  # a tail with one channel-mixing op joins the chunk before it
        for c in chunks:  # a chunk that still lacks two channel-mixing ops gains nothing: left in pieces
            out += [sorted(i for m in c for i in node_sets[m])] if count(c) >= 2 else [node_sets[m] for m in c]
        k = j + 1
    return out


def _readers(model: onnx.ModelProto, shapes: dict[str, int], main: set[int]) -> dict[str, set[int]]:
    """Tensor -> the main nodes that read it: its values, or its shape through shape arithmetic
    (the tensor must then outlive its neighbourhood as well)."""
    nodes = model.graph.node
    out: dict[str, set[int]] = {}
    for i in main:
        reads = node_inputs(nodes[i])
        for n in [*reads, *_shape_closure(model, shapes, set(reads))[1]]:
            out.setdefault(n, set()).add(i)
    return out


def _inferred_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor -> its dims as onnx infers them (None where unknown). Inference is a help: without it
    no cut is judged wide and no Split or Concat is judged, nothing fails."""
    try:
        g = light.infer_shapes(model, data_prop=True).graph
    except Exception:
        return {}
    return {vi.name: [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                      for d in vi.type.tensor_type.shape.dim]
            for vi in [*g.input, *g.value_info, *g.output] if vi.type.tensor_type.HasField("shape")}


def _widths(dims: dict[str, list[int | None]]) -> tuple[dict[str, int], dict[str, int]]:
    """Per tensor with known dims: elements per sample (batch axis left out) and, for images (rank 4
    and up), channels."""
    elements, channels = {}, {}
    for name, d in dims.items():
        if len(d) > 1 and None not in d[1:]:
            elements[name] = int(np.prod(d[1:]))
        if len(d) >= 4 and d[1] is not None:
            channels[name] = d[1]
    return elements, channels


def _merge_wide_cuts(model, dims, cuts, seg_nodes, seg_params, keep, weights):
    """Never a boundary at an expanded inner tensor: a run of cuts wider than the cuts on both sides
    of it (in elements per sample, then in channels), spanning at most three weighted ops (an inverted
    residual's expand and depthwise outputs, a VGG block's convolutions) and no more than SPLIT_SHARE of
    the parameters, is merged away, so the block around it is one neighbourhood with a shrinkable inner
    group. Segments stay indexed by their cut."""
    kept = list(range(len(cuts)))
    members = {k: [k] for k in kept}  # kept cut -> the segments now merged behind it
    params = dict(enumerate(seg_params))
    total = sum(seg_params)
    for size in _widths(dims):
        e = [size.get(cuts[k]) for k in kept]
        drop: set[int] = set()
        i = 2  # the stem's output is wider than the raw input by nature: compare activations only
        while i < len(kept) - 1:
            j = i
            while j + 1 < len(kept) - 1 and e[j + 1] == e[i]:
                j += 1
            weighted = sum(1 for m in range(i - 1, j + 1) for n in members[kept[m]] for x in seg_nodes[n]
                           if any(w in weights for w in model.graph.node[x].input))  # ops the merge would join
            merged = sum(params[kept[m]] for m in range(i - 1, j + 1))
            if None not in (e[i], e[i - 1], e[j + 1]) and e[i] > e[i - 1] and e[i] > e[j + 1] and weighted <= 3 \
                    and merged <= SPLIT_SHARE * total and not {cuts[kept[m]] for m in range(i, j + 1)} & keep:
                drop.update(range(i, j + 1))
            i = j + 1
        survivors: list[int] = []
        for pos, k in enumerate(kept):
            if pos in drop:
                members[survivors[-1]] += members.pop(k)
                params[survivors[-1]] += params.pop(k)
            else:
                survivors.append(k)
        kept = survivors
    nodes_out: list[list[int]] = [[] for _ in cuts]
    params_out = [0] * len(cuts)
    for k in kept:
        nodes_out[k] = [i for m in members[k] for i in seg_nodes[m]]
        params_out[k] = params[k]
    return nodes_out, params_out


def _channel_axis_op(model: onnx.ModelProto, node: onnx.NodeProto, ranks: dict[str, int], name: str) -> bool:
    """Whether `node` (a Split or Concat) acts on axis 1 of the image tensor `name`."""
    rank = ranks.get(name)
    return rank is not None and rank >= 4 and attr(node, "axis", 0) % rank == 1


def _shift_channel_cuts(teacher: Teacher, ranks: dict[str, int], idx: list[int], weighted: list[int],
                        best: list[int], cuts: list[int], born: dict[str, int], last_use: dict[str, int]) -> list[int]:
    """`_merge_channel_cuts` for `_split_large`'s cut positions (best[k]: the one between weighted
    ops k and k+1, positions in `idx`): a cut whose tensors include one a channel Split reads moves
    back before the convolution making it; one whose tensors include a channel Concat's output that
    the next weighted op reads moves after that op (or goes, after the last)."""
    model = teacher.model
    nodes = model.graph.node
    made = {o: nodes[i] for i in idx for o in nodes[i].output}
    split_read = {nodes[i].input[0] for i in idx if nodes[i].op_type == "Split"
                  and _channel_axis_op(model, nodes[i], ranks, nodes[i].input[0])}

    def crossing(c: int) -> set[str]:
        return {t for t, b in born.items() if b < c <= last_use.get(t, -1)}

    def move(k: int) -> int | None:
        """Where the cut best[k] goes (k itself when it stays), or None when it goes."""
        cross = crossing(best[k])
        if cross & split_read:
            return k - 1 if k > 0 else None
        nxt = nodes[idx[weighted[k + 1]]]
        if any(made.get(t) is not None and made[t].op_type == "Concat" and _channel_axis_op(model, made[t], ranks, t)
               and t in nxt.input for t in cross):
            return k + 1 if k + 1 < len(best) else None
        return k

    out = []
    for c in cuts:
        k = best.index(c)
        m = move(k)
        if m is not None and m != k and move(m) != m:  # moved onto another such cut: no boundary here
            m = None
        if m is not None:
            out.append(best[m])
    return sorted(set(out))


def _merge_channel_cuts(teacher: Teacher, ranks: dict[str, int], cuts, seg_nodes, seg_params, keep):
    """Never a boundary where a block splits or merges its channels: a cut read by a channel Split
    (YOLOv8's C2f, CSP blocks) joins the convolution that makes it, and a cut made by a channel
    Concat joins the lone convolution that fuses it (C2f's and C3's last 1x1, a U-Net decoder's conv).
    On such a boundary the pieces' channels are fixed, and width students can shrink only what lies
    between; across it the whole block shrinks. Within SPLIT_SHARE of the parameters; segments stay
    indexed by their cut."""
    model = teacher.model
    nodes = model.graph.node
    nodes_out = [list(n) for n in seg_nodes]
    params = list(seg_params)
    total = sum(seg_params)
    producer = {o: nodes[i] for idx in seg_nodes for i in idx for o in nodes[i].output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for idx in seg_nodes:
        for i in idx:
            for n in nodes[i].input:
                readers.setdefault(n, []).append(nodes[i])

    def dense(k: int) -> int:
        return _dense_ops(teacher, nodes_out[k])

    def join(ks: list[int]) -> None:  # ks ascending, live: the later ones merge into the first
        if sum(params[k] for k in ks) > SPLIT_SHARE * total or {cuts[k] for k in ks[1:]} & keep:
            return
        for k in ks[1:]:
            nodes_out[ks[0]] += nodes_out[k]
            params[ks[0]] += params[k]
            nodes_out[k], params[k] = [], 0
        nodes_out[ks[0]].sort()

    for k in range(1, len(cuts)):
        split = any(r.op_type == "Split" and r.input[0] == cuts[k] and _channel_axis_op(model, r, ranks, cuts[k])
                    for r in readers.get(cuts[k], []))
        if not nodes_out[k] or not split:
            continue
        back = [k]  # back to the segment that holds the convolution making the split tensor
        for j in range(k - 1, -1, -1):
            if nodes_out[j]:
                back.insert(0, j)
                if sum(dense(m) for m in back[:-1]):
                    break
        if len(back) > 1 and sum(dense(m) for m in back[:-1]) == 1:
            join(back)
    for k in range(1, len(cuts)):
        made = producer.get(cuts[k])
        if (nodes_out[k] and made is not None and made.op_type == "Concat"
                and _channel_axis_op(model, made, ranks, cuts[k]) and dense(k) == 1):
            prev = max((j for j in range(k) if nodes_out[j]), default=None)
            if prev is not None:
                join([prev, k])
    return nodes_out, params


def _split_large(teacher: Teacher, shapes: dict[str, int], ranks: dict[str, int], idx: list[int],
                 params: int) -> list[list[int]]:
    """A neighbourhood with more than SPLIT_SHARE of the parameters and several weighted ops (a
    backbone whose stages feed an FPN neck, a U-Net, a wide last block) cut at small sets of tensors.
    Between each two weighted ops the candidate is the position in the graph's order where the fewest
    tensors are live; it is taken where fewer are live than at the neighbouring candidates (block ends,
    not block insides); a piece still too large is then halved at its narrowest, most even candidate."""
    nodes = teacher.model.graph.node
    weight_of = [sum(teacher.weights.get(n, 0) for n in nodes[i].input) for i in idx]
    weighted = [p for p, w in enumerate(weight_of) if w]
    if params <= SPLIT_SHARE * teacher.params or len(weighted) <= BLOCK_OPS:
        return [idx]
    pos = {i: p for p, i in enumerate(idx)}
    graph_outputs = {o.name for o in teacher.model.graph.output}
    born: dict[str, int] = {}
    for p, i in enumerate(idx):
        born.update((o, p) for o in nodes[i].output)
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        reads = node_inputs(node)
        for n in [*reads, *_shape_closure(teacher.model, shapes, set(reads))[1]]:
            if n not in shapes:  # a reader after this neighbourhood keeps the tensor live to its end
                last_use[n] = max(last_use.get(n, -1), pos.get(i, len(idx)) if i in pos or n in born else -1)
    for n in graph_outputs & born.keys():
        last_use[n] = len(idx)
    inits = {i.name for i in teacher.model.graph.initializer}
    for n in {n for i in idx for n in node_inputs(nodes[i])} - born.keys() - shapes.keys() - inits:
        born[n] = -1  # read from before this neighbourhood
    live = [sum(1 for t, b in born.items() if b < p <= last_use.get(t, -1)) for p in range(len(idx) + 1)]
    best = [min(range(a + 1, b + 1), key=lambda q: (live[q], -q)) for a, b in zip(weighted, weighted[1:])]
    cuts: list[int] = []
    k = 0
    while k < len(best):  # plateaus of equal counts lower than their neighbours
        j = k
        while j + 1 < len(best) and live[best[j + 1]] == live[best[k]]:
            j += 1
        sides = [live[best[m]] for m in (k - 1, j + 1) if 0 <= m < len(best)]
        if sides and all(v > live[best[k]] for v in sides) and live[best[k]] <= MAX_FRONTIER:
            cuts.extend(best[k:j + 1])
        k = j + 1

    cuts = _shift_channel_cuts(teacher, ranks, idx, weighted, best, cuts, born, last_use)

    def halve(a: int, b: int) -> list[int]:
        inner = [p for p in best if a < p < b and live[p] <= 2 * MAX_FRONTIER]  # a wider set beats one huge piece
        if sum(weight_of[a:b]) <= SPLIT_SHARE * teacher.params or not inner:
            return []
        total = sum(weight_of[a:b])
        p = min(inner, key=lambda q: (live[q], abs(2 * sum(weight_of[a:q]) - total)))
        return [*halve(a, p), p, *halve(p, b)]

    bounds = [0, *cuts, len(idx)]
    bounds = sorted({*bounds, *(p for a, b in zip(bounds, bounds[1:]) for p in halve(a, b))})
    return [idx[a:b] for a, b in zip(bounds, bounds[1:])]


def merge(nbhs: list[Neighbourhood], inputs: tuple[str, ...] | None = None) -> Neighbourhood:
    """Consecutive neighbourhoods as one (id -1): what they read from each other stays inside."""
    nodes = tuple(sorted(i for n in nbhs for i in n.nodes))
    inside = {o for n in nbhs for o in n.outputs}  # made by one of them: read from inside
    inputs = inputs or tuple(dict.fromkeys(i for n in nbhs for i in n.inputs if i not in inside))
    sides = tuple(sorted({s for n in nbhs for s in n.side_inputs} - set(inputs)))
    shapes = tuple(sorted({s for n in nbhs for s in n.shape_inputs} - inside - set(inputs) - set(sides)))
    return Neighbourhood(id=-1, inputs=inputs, side_inputs=sides, outputs=nbhs[-1].outputs, nodes=nodes,
                         weights=tuple(sorted(w for n in nbhs for w in n.weights)),
                         params=sum(n.params for n in nbhs),
                         shape_nodes=tuple(sorted({i for n in nbhs for i in n.shape_nodes})), shape_inputs=shapes)


def _closure(model: onnx.ModelProto, made: dict[str, int], reads: set[str],
             sources_of: Callable[[onnx.NodeProto], set[str]]) -> tuple[set[int], set[str]]:
    """The nodes that make the tensors of `made` (tensor -> node) among `reads`, followed back through
    `made`, and what `sources_of(node)` names as read from outside."""
    nodes = model.graph.node
    seen: set[int] = set()
    sources: set[str] = set()
    stack = [n for n in reads if n in made]
    while stack:
        i = made[stack.pop()]
        if i in seen:
            continue
        seen.add(i)
        outside = sources_of(nodes[i])
        sources |= outside
        stack.extend(n for n in nodes[i].input if n in made and n not in outside)
    return seen, sources


def _shape_closure(model: onnx.ModelProto, shapes: dict[str, int], reads: set[str]) -> tuple[tuple[int, ...], set[str]]:
    """The shape nodes that compute the shape tensors among `reads`, and the tensors whose shapes they take."""
    seen, sources = _closure(model, shapes, reads, lambda n: {n.input[0]} if n.op_type in SHAPE_OPS else set())
    return tuple(sorted(seen)), sources


def _index_closure(model: onnx.ModelProto, index: dict[str, int], reads: set[str]) -> tuple[set[int], set[str]]:
    """The nodes that compute the index tensors among `reads`, and the graph inputs they read."""
    graph_in = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    return _closure(model, index, reads, lambda n: {x for x in n.input if x in graph_in})


def _segment_of_nodes(g: nx.DiGraph, idom: dict, cuts: tuple[str, ...]) -> dict[int, int]:
    """Segment k holds the nodes whose nearest dominating cut is cuts[k]."""
    children: dict = {}
    for v, d in idom.items():
        if v != d:
            children.setdefault(d, []).append(v)
    index = {("t", c): k for k, c in enumerate(cuts)}
    segment: dict[int, int] = {}
    stack = [(SOURCE, 0)]
    while stack:
        v, k = stack.pop()
        k = index.get(v, k)
        if v[0] == "n":
            segment[v[1]] = k
        stack.extend((c, k) for c in children.get(v, ()))
    return segment


def _weight_owners(teacher: Teacher, seg_nodes: list[list[int]]) -> dict[str, int]:
    """Weight -> the one segment that reads it; weights read by several segments (tied) or
    only by side computations belong to no segment and count as outside parameters."""
    readers: dict[str, set[int]] = {}
    for s, idx in enumerate(seg_nodes):
        for i in idx:
            for name in node_inputs(teacher.model.graph.node[i]):
                if name in teacher.weights:
                    readers.setdefault(name, set()).add(s)
    return {w: next(iter(s)) for w, s in readers.items() if len(s) == 1}


def _group_segments(seg_nodes: list[list[int]], seg_params: list[int], block_size: int,
                    starts: set[int] = frozenset()) -> list[list[int]]:
    """Merge weightless segments into the next weighted one (the last into the previous), then
    merge `block_size` consecutive weighted segments; never across a segment in `starts` (its cut
    must stay a boundary)."""
    live = [s for s in range(len(seg_nodes)) if seg_nodes[s]]
    runs: list[list[int]] = [[]]
    for s in live:
        if s in starts and runs[-1]:
            runs.append([])
        runs[-1].append(s)
    groups: list[list[int]] = []
    for run in runs:
        weighted: list[list[int]] = []
        pending: list[int] = []
        for s in run:
            pending.append(s)
            if seg_params[s] > 0:
                weighted.append(pending)
                pending = []
        if pending:
            if weighted:
                weighted[-1].extend(pending)
            else:
                weighted.append(pending)
        groups += [sum(weighted[k:k + block_size], []) for k in range(0, len(weighted), block_size)]
    return groups
