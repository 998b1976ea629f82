"""vocab:k - an embedding table cut down to the rows the calibration data uses.

An embedding lookup (`lowrank.embedding_table`: a Gather on axis 0 of a constant 2-D float table
[V, D], indexed by token ids) becomes

    Gather(remap [V] int64, ids) -> Gather(small table [K + 1, D], new ids)

The ids keep their name, dtype and shape (the student's interface is the teacher's). The small
table holds the rows of the K most frequent ids in the calibration data (ties: the lower id),
K = min(ids seen, floor(k * V)), at least 1: `vocab:1` keeps every id the data holds, `vocab:0.25`
at most a quarter of the table's rows. Kept rows keep their order by id; row K is the "unknown"
row every other id maps to. It starts as the mean of the dropped rows: an id the data never showed
could be any of them, and their mean is the single row closest to all of them in squared error
(for the linear layers and LayerNorm that follow, the least surprising input); training then moves
it towards what the dropped ids that the data does hold need. Ids are counted as Gather reads them:
a negative id i means V + i.

Counting: `params` is (K + 1) * D, the float weights. The remap is an index constant (V int64
values), which `ndonnx.graph.weight_counts` does not count as parameters, like every shape or index
tensor, and which the trainer leaves as it is (only weights are trained, `ndonnx.trainable`). It
still takes 8 * V bytes in the file: for a float32 table the file shrinks by 4 * D * (V - K - 1) -
8 * V bytes, so only while K + 1 < V * (1 - 2 / D) (D = 256: below 99.2% of the rows), although the
parameter count shrinks whenever K + 1 < V, which is when the family applies.

The calibration ids come from the neighbourhood's inputs (the family is registered with
needs_sample; `ndonnx distill` passes the training split of its activation cache, so the held-out
error it reports includes the cost of ids the training split never showed): read directly when the ids are an input of the neighbourhood, else computed from its
inputs with onnxruntime (e.g. ids cast or regrouped inside it). The student's `note` says how many
distinct ids the data holds, how many rows are kept and the fraction of token occurrences they
cover; ids outside that fraction (and every id the data never showed) read the unknown row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from ndonnx.candidates.base import CandidateSpec, NotApplicable, Sample, Student, register
from ndonnx.candidates.lowrank import embedding_table
from ndonnx.candidates.onnx_edit import (add_array, consumers, finish, fold_batchnorm, names_in_use, param_count,
                                         unique_name, value_infos)


@dataclass(frozen=True)
class Coverage:
    """What a vocabulary cut keeps of one table, from the ids of the calibration data."""

    rows: int  # V, the table's rows
    seen: int  # distinct ids in the data
    kept: np.ndarray  # the kept ids, ascending (K of them)
    tokens: int  # id occurrences in the data
    covered: int  # occurrences of kept ids

    @property
    def fraction(self) -> float:
        return self.covered / self.tokens if self.tokens else 0.0

    def describe(self, table: str) -> str:
        return (f"{table}: {self.seen:,} of {self.rows:,} ids seen in the calibration data, "
                f"{len(self.kept):,} rows kept + 1 unknown, covering {self.fraction:.2%} of {self.tokens:,} tokens")


def coverage(ids: np.ndarray, rows: int, k: float) -> Coverage:
    """The rows `vocab:k` keeps of a [rows, D] table for the ids `ids` (any shape; negative ids
    count as Gather reads them): the most frequent, at most floor(k * rows) and only ids seen."""
    flat = np.asarray(ids).reshape(-1).astype(np.int64)
    flat = np.where(flat < 0, flat + rows, flat)
    if flat.size and (flat.min() < 0 or flat.max() >= rows):
        bad = int(flat.min() if flat.min() < 0 else flat.max())
        raise NotApplicable(f"the calibration data holds id {bad}, outside the table's {rows} rows")
    counts = np.bincount(flat, minlength=rows)
    seen = int((counts > 0).sum())
    budget = max(1, int(math.floor(k * rows + 1e-9)))
    order = np.argsort(-counts, kind="stable")  # most frequent first; ties: the lower id
    kept = np.sort(order[:min(seen, budget)])
    return Coverage(rows=rows, seen=seen, kept=kept, tokens=int(flat.size), covered=int(counts[kept].sum()))


def _ids(sub: onnx.ModelProto, name: str, sample: Sample) -> np.ndarray:
    """The values the ids tensor `name` takes over the calibration data."""
    inputs = [i.name for i in sub.graph.input]
    if name in inputs:
        if name not in sample:
            raise NotApplicable(f"the ids {name!r} are not in the calibration sample")
        return np.asarray(sample[name])
    from ndonnx.sample import ort_session

    # computed inside the neighbourhood: the nodes that make the ids, run on its inputs
    g = sub.graph
    made = {o: k for k, node in enumerate(g.node) for o in node.output}
    need, todo = set(), [name]
    while todo:
        k = made.get(todo.pop())
        if k is not None and k not in need:
            need.add(k)
            todo += [n for n in g.node[k].input if n]
    nodes = [g.node[k] for k in sorted(need)]
    reads = {n for node in nodes for n in node.input}
    missing = [n for n in inputs if n in reads and n not in sample]
    if missing:
        raise NotApplicable(f"the ids {name!r} are computed from {missing[0]!r}, which the calibration sample lacks")
    part = helper.make_model(helper.make_graph(
        nodes, "ids", [i for i in g.input if i.name in reads], [onnx.ValueInfoProto(name=name)],
        [t for t in g.initializer if t.name in reads]), opset_imports=sub.opset_import, ir_version=sub.ir_version)
    feeds = {n: np.ascontiguousarray(sample[n]) for n in inputs if n in reads}
    return ort_session(part).run([name], feeds)[0]


def _swap(model: onnx.ModelProto, node: onnx.NodeProto, cov: Coverage, taken: set[str]) -> list[onnx.NodeProto]:
    """The remap and small-table lookups that replace `node` (their initializers added to `model`)."""
    g = model.graph
    table_name, ids = node.input[0], node.input[1]
    table = next(onnx.numpy_helper.to_array(t) for t in g.initializer if t.name == table_name)
    dropped = np.ones(cov.rows, bool)
    dropped[cov.kept] = False
    unknown = table[dropped].astype(np.float64).mean(axis=0).astype(table.dtype)
    small = np.concatenate([table[cov.kept], unknown[None]], axis=0)
    remap = np.full(cov.rows, len(cov.kept), np.int64)
    remap[cov.kept] = np.arange(len(cov.kept), dtype=np.int64)
    small_name = add_array(model, f"{table_name}_vocab", small, taken)
    remap_name = add_array(model, f"{table_name}_remap", remap, taken)
    new_ids = unique_name(taken, f"{ids}_vocab")
    label = node.name or node.output[0]
    remap_node = helper.make_node("Gather", [remap_name, ids], [new_ids], name=unique_name(taken, f"{label}/remap"),
                                  axis=0)
    lookup = helper.make_node("Gather", [small_name, new_ids], list(node.output),
                              name=unique_name(taken, f"{label}/vocab"), axis=0)
    vi = value_infos(model).get(ids)
    if vi is not None and vi.type.tensor_type.HasField("shape"):
        g.value_info.append(helper.make_tensor_value_info(new_ids, TensorProto.INT64, [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]))
    return [remap_node, lookup]


@register("vocab", values=(0.0, 1.0, False, True), needs_sample=True)
def generate(sub: onnx.ModelProto, spec: CandidateSpec, sample: Sample) -> Student:
    k = float(spec.value)
    model = fold_batchnorm(sub)
    inits = {t.name for t in model.graph.initializer}
    readers = consumers(model)
    lookups: dict[int, Coverage] = {}
    reasons: list[str] = []
    for i, node in enumerate(model.graph.node):
        table = embedding_table(model, node, inits)
        if table is None:
            continue
        if len(readers.get(node.input[0], [])) > 1:
            reasons.append(f"{node.input[0]!r} is also read by another op (tied weights)")
            continue
        cov = coverage(_ids(model, node.input[1], sample), table.shape[0], k)
        if not cov.tokens:
            reasons.append(f"the calibration data holds no ids for {node.input[0]!r}")
            continue
        if len(cov.kept) + 1 >= table.shape[0]:
            reasons.append(f"{node.input[0]!r}: the data uses {cov.seen} of its {table.shape[0]} rows, "
                           f"keeping {len(cov.kept)} + 1 saves nothing")
            continue
        lookups[i] = cov
    if not lookups:
        raise NotApplicable(reasons[0] if reasons else
                            "no embedding lookup (Gather on axis 0 of a constant 2-D float table)")
    note = "; ".join(cov.describe(model.graph.node[i].input[0]) for i, cov in lookups.items())
    taken = names_in_use(model)
    nodes = []
    for i, node in enumerate(model.graph.node):
        nodes += _swap(model, node, lookups[i], taken) if i in lookups else [node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model = finish(sub, model, str(spec))
    n = param_count(model)
    return Student(spec, model, n, n, note=note)
