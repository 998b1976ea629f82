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
from ndonnx.graph import Teacher, node_inputs

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

    def op_types(self, model: onnx.ModelProto) -> dict[str, int]:
        return dict(Counter(model.graph.node[i].op_type for i in self.nodes))


@dataclass(frozen=True)
class Partition:
    primary_input: str
    cuts: tuple[str, ...]
    neighbourhoods: tuple[Neighbourhood, ...]
    outside_nodes: tuple[int, ...]  # side computations (mask paths), evaluated by onnxruntime
    outside_params: int  # weights shared between neighbourhoods or read only outside them


def forward_reach(model: onnx.ModelProto, start: str) -> set[int]:
    """Indices of the nodes that depend on tensor `start`."""
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(model.graph.node):
        for name in node_inputs(node):
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

    def weight_on_paths(name: str) -> int:
        read = {n for i in forward_reach(teacher.model, name) for n in nodes[i].input}
        return sum(c for w, c in teacher.weights.items() if w in read)

    return max(names, key=lambda n: (weight_on_paths(n), -names.index(n)))


def partition(teacher: Teacher, cfg: PartitionConfig = PartitionConfig()) -> Partition:
    model = teacher.model
    nodes = model.graph.node
    primary = cfg.primary_input or choose_primary_input(teacher)
    if primary not in teacher.input_names:
        raise NdonnxError(f"--primary-input {primary!r} is not an input of the model "
                          f"(inputs: {', '.join(teacher.input_names)})")
    main = forward_reach(model, primary)
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
    groups = _group_segments(seg_nodes, seg_params, cfg.block_size)
    if len(cuts) == 1 or len(groups) == 1:
        log.warning("no cut point found: the whole model is one neighbourhood")

    neighbourhoods = []
    for k, segs in enumerate(groups):
        idx = tuple(sorted(i for s in segs for i in seg_nodes[s]))
        last = segs[-1]
        outs = (cuts[last + 1],) if last + 1 < n_seg else tuple(o for o in outputs if o != cuts[segs[0]])
        reads = {n for i in idx for n in node_inputs(nodes[i])}
        side = tuple(sorted(n for n in reads if n not in main_tensors and n not in inits))
        weights = tuple(sorted(w for w, s in owner.items() if s in segs))
        neighbourhoods.append(Neighbourhood(
            id=k, inputs=(cuts[segs[0]],), side_inputs=side, outputs=outs, nodes=idx, weights=weights,
            params=sum(teacher.weights[w] for w in weights)))
    inside = sum(n.params for n in neighbourhoods)
    outside_nodes = tuple(i for i in range(len(nodes)) if i not in main)
    return Partition(primary_input=primary, cuts=cuts, neighbourhoods=tuple(neighbourhoods),
                     outside_nodes=outside_nodes, outside_params=teacher.params - inside)


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


def _group_segments(seg_nodes: list[list[int]], seg_params: list[int], block_size: int) -> list[list[int]]:
    """Merge weightless segments into the next weighted one (the last into the previous), then
    merge `block_size` consecutive weighted segments."""
    live = [s for s in range(len(seg_nodes)) if seg_nodes[s]]
    weighted: list[list[int]] = []
    pending: list[int] = []
    for s in live:
        pending.append(s)
        if seg_params[s] > 0:
            weighted.append(pending)
            pending = []
    if pending:
        if weighted:
            weighted[-1].extend(pending)
        else:
            weighted.append(pending)
    return [sum(weighted[k:k + block_size], []) for k in range(0, len(weighted), block_size)]
