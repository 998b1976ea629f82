"""Cutting a teacher into neighbourhoods: the tensors every path from the primary input to the
outputs must cross (the dominator chain of a virtual sink) are the boundaries."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import networkx as nx
import onnx

from ndonnx.config import PartitionConfig
from ndonnx.errors import NdonnxError
from ndonnx.graph import NONDETERMINISTIC_OPS, Teacher, node_inputs, subgraph_reads

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


SHAPE_OPS = {"Shape", "Size"}


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


def forward_reach(model: onnx.ModelProto, start: str, shapes: dict[str, int] | None = None) -> set[int]:
    """Indices of the nodes that depend on tensor `start`; with `shapes` (from `shape_tensors`), only
    through activations: a Shape node reads no values, and shape tensors carry none."""
    consumers: dict[str, list[int]] = {}
    shape_nodes = set((shapes or {}).values())
    for i, node in enumerate(model.graph.node):
        if i in shape_nodes:
            continue
        for name in node_inputs(node):
            if shapes is None or name not in shapes:
                consumers.setdefault(name, []).append(i)
    seen: set[int] = set()
    stack = [start]
    while stack:
        for i in consumers.get(stack.pop(), ()):
            if i not in seen:
                seen.add(i)
                stack.extend(model.graph.node[i].output)
    return seen


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
    main = forward_reach(model, primary, shapes)
    inits = {i.name for i in model.graph.initializer}
    main_tensors = {primary} | {o for i in main for o in nodes[i].output}

    g = nx.DiGraph()
    g.add_edge(SOURCE, ("t", primary))
    for i in main:
        for name in node_inputs(nodes[i]):
            if name in main_tensors:
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
    groups = _group_segments(seg_nodes, seg_params, cfg.block_size, {k for k, c in enumerate(cuts) if c in keep})

    neighbourhoods = []
    for k, segs in enumerate(groups):
        idx = tuple(sorted(i for s in segs for i in seg_nodes[s]))
        last = segs[-1]
        outs = (cuts[last + 1],) if last + 1 < n_seg else tuple(o for o in outputs if o != cuts[segs[0]])
        reads = {n for i in idx for n in node_inputs(nodes[i])}
        side = tuple(sorted(n for n in reads if n not in main_tensors and n not in inits and n not in shapes))
        shape_nodes, sources = _shape_closure(model, shapes, reads)
        produced = {o for i in idx for o in nodes[i].output}
        weights = tuple(sorted(w for w, s in owner.items() if s in segs))
        neighbourhoods.append(Neighbourhood(
            id=k, inputs=(cuts[segs[0]],), side_inputs=side, outputs=outs, nodes=idx, weights=weights,
            params=sum(teacher.weights[w] for w in weights), shape_nodes=shape_nodes,
            shape_inputs=tuple(sorted(sources - produced - {cuts[segs[0]], *side}))))
    outside_nodes = tuple(i for i in range(len(nodes)) if i not in main)
    # Tensors that outlive any replacement: graph inputs, boundaries, side computations.
    stable = set(teacher.input_names) | {n for nb in neighbourhoods for n in (*nb.inputs, *nb.outputs)} \
        | {o for i in outside_nodes for o in nodes[i].output}
    side_paths = [i for i in outside_nodes if not set(nodes[i].output) <= shapes.keys()]  # masks, not shape arithmetic
    _, outside_sources = _shape_closure(model, shapes, {n for i in side_paths for n in node_inputs(nodes[i])})
    unstable = ({t for nb in neighbourhoods for t in nb.shape_inputs} | outside_sources) - stable
    inside = sum(n.params for n in neighbourhoods)
    return Partition(primary_input=primary, cuts=cuts, neighbourhoods=tuple(neighbourhoods),
                     outside_nodes=outside_nodes, outside_params=teacher.params - inside), unstable


def merge(nbhs: list[Neighbourhood], inputs: tuple[str, ...] | None = None) -> Neighbourhood:
    """Consecutive neighbourhoods as one (id -1): what they read from each other stays inside."""
    nodes = tuple(sorted(i for n in nbhs for i in n.nodes))
    inside = {o for n in nbhs[1:] for o in n.inputs} | {o for n in nbhs[:-1] for o in n.outputs}
    inputs = inputs or tuple(dict.fromkeys(i for n in nbhs for i in n.inputs if i not in inside))
    sides = tuple(sorted({s for n in nbhs for s in n.side_inputs} - set(inputs)))
    shapes = tuple(sorted({s for n in nbhs for s in n.shape_inputs} - inside - set(inputs) - set(sides)))
    return Neighbourhood(id=-1, inputs=inputs, side_inputs=sides, outputs=nbhs[-1].outputs, nodes=nodes,
                         weights=tuple(sorted(w for n in nbhs for w in n.weights)),
                         params=sum(n.params for n in nbhs),
                         shape_nodes=tuple(sorted({i for n in nbhs for i in n.shape_nodes})), shape_inputs=shapes)


def _shape_closure(model: onnx.ModelProto, shapes: dict[str, int], reads: set[str]) -> tuple[tuple[int, ...], set[str]]:
    """The shape nodes that compute the shape tensors among `reads`, and the tensors whose shapes they take."""
    nodes = model.graph.node
    seen: set[int] = set()
    sources: set[str] = set()
    stack = [n for n in reads if n in shapes]
    while stack:
        i = shapes[stack.pop()]
        if i in seen:
            continue
        seen.add(i)
        if nodes[i].op_type in SHAPE_OPS:
            sources.add(nodes[i].input[0])
        else:
            stack.extend(n for n in nodes[i].input if n in shapes)
    return tuple(sorted(seen)), sources


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
