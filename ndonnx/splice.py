"""Splicing chosen students into the teacher graph, and saving models atomically.

Rewire at the boundaries: a replaced neighbourhood's nodes go, the student's nodes come in its
place with their inner tensors and initializers renamed (`nd<id>_...`) so nothing clashes, and
the boundary names (inputs, side inputs, outputs) stay the teacher's. A neighbourhood left as the
teacher is untouched."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from ndonnx import __version__
from ndonnx.errors import NdonnxError
from ndonnx.files import atomic_path
from ndonnx.graph import node_inputs, onnx_opset, remove_unused
from ndonnx.partition import Partition

TWO_GB = 2 << 30


def _renamed(student: onnx.ModelProto, prefix: str, keep: set[str]) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    names = {n for node in student.graph.node for n in (*node.input, *node.output) if n} | \
            {i.name for i in student.graph.initializer}
    rename = {n: f"{prefix}{n}" for n in names if n not in keep}
    nodes = []
    for node in student.graph.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = f"{prefix}{node.name}" if node.name else ""
        for k, n in enumerate(new.input):
            new.input[k] = rename.get(n, n)
        for k, n in enumerate(new.output):
            new.output[k] = rename.get(n, n)
        nodes.append(new)
    inits = []
    for init in student.graph.initializer:
        new = onnx.TensorProto()
        new.CopyFrom(init)
        new.name = rename.get(init.name, init.name)
        inits.append(new)
    return nodes, inits


def splice(teacher_model: onnx.ModelProto, part: Partition, students: dict[int, onnx.ModelProto],
           metadata: dict | None = None) -> onnx.ModelProto:
    """The teacher with neighbourhood `id` replaced by `students[id]` (same boundary names)."""
    out = onnx.ModelProto()
    out.CopyFrom(teacher_model)
    g = out.graph
    old_nodes = list(g.node)
    by_id = {n.id: n for n in part.neighbourhoods}
    replaced: dict[int, int] = {}  # teacher node index -> neighbourhood id (to drop)
    insert_at: dict[int, int] = {}  # last teacher node index of a neighbourhood -> its id
    students = {nid: _at_opset(st, onnx_opset(teacher_model), nid) for nid, st in students.items()}
    for nid, st in students.items():
        nbh = by_id[nid]
        want = list(nbh.feeds)
        got = [i.name for i in st.graph.input]
        if got != want or [o.name for o in st.graph.output] != list(nbh.outputs):
            raise ValueError(f"splice: student of neighbourhood {nid} has inputs {got} / outputs "
                             f"{[o.name for o in st.graph.output]}, expected {want} / {list(nbh.outputs)}")
        for i in nbh.nodes:
            replaced[i] = nid
        insert_at[max(nbh.nodes)] = nid  # inputs exist before it, consumers of outputs come after
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    for i, node in enumerate(old_nodes):
        if i not in replaced:
            new_nodes.append(node)
        if i in insert_at:
            nid = insert_at[i]
            nbh = by_id[nid]
            keep = {*nbh.feeds, *nbh.outputs}
            nodes, inits = _renamed(students[nid], f"nd{nid}_", keep)
            new_nodes.extend(nodes)
            new_inits.extend(inits)
    del g.node[:]
    g.node.extend(_topological(new_nodes, {*(i.name for i in g.input), *(i.name for i in g.initializer)}))
    g.initializer.extend(new_inits)
    del g.value_info[:]  # the teacher's inner shapes no longer all exist; keep the interface only
    _merge_opsets(out, students.values())
    out, _ = remove_unused(out)  # e.g. the teacher's shape arithmetic that only replaced nodes read
    if metadata:
        for key, value in metadata.items():
            prop = out.metadata_props.add()
            prop.key = f"ndonnx.{key}"
            prop.value = value if isinstance(value, str) else json.dumps(value)
    prop = out.metadata_props.add()
    prop.key, prop.value = "ndonnx.version", __version__
    return out


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is made before it is read, as close to the given order as
    possible: a student inserted where its neighbourhood ended may feed teacher nodes placed earlier
    (the shape arithmetic read from a boundary, a multi-tensor boundary's early output)."""
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(nodes)))
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    for k, n in enumerate(nodes):
        for name in node_inputs(n):
            if name in producer and name not in available:
                graph.add_edge(producer[name], k)
    try:
        order = nx.lexicographical_topological_sort(graph)
        return [nodes[k] for k in order]
    except nx.NetworkXUnfeasible as e:
        raise ValueError("splice: the spliced graph has a cycle") from e


def _at_opset(student: onnx.ModelProto, opset: int, nid: int) -> onnx.ModelProto:
    """The student at the teacher's default-domain opset: the spliced model keeps the teacher's, and
    raising it would change what the teacher's own nodes mean. A newer student is converted down
    with onnx's version converter, or refused."""
    if onnx_opset(student) <= opset:
        return student
    try:
        down = version_converter.convert_version(student, opset)
        onnx.checker.check_model(down)
    except Exception as e:
        raise NdonnxError(f"splice: the student of neighbourhood {nid} uses opset {onnx_opset(student)}, above the "
                          f"teacher's {opset}, and cannot be converted down ({type(e).__name__})") from e
    return down


def _merge_opsets(model: onnx.ModelProto, students) -> None:
    have = {o.domain: o for o in model.opset_import}
    for st in students:
        for o in st.opset_import:
            if o.domain not in have:
                new = model.opset_import.add()
                new.CopyFrom(o)
                have[o.domain] = new


def check(model: onnx.ModelProto) -> None:
    """onnx.checker in full mode (shape inference included)."""
    if model.ByteSize() < TWO_GB:
        onnx.checker.check_model(model, full_check=True)


def save_atomic(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write to a temporary file beside the target, then rename: the output never half exists.
    Models over 2 GB keep their weights in `<name>.data` beside them."""
    path = Path(path)
    data_name = f"{path.name}.data"
    with atomic_path(path) as tmp:
        if model.ByteSize() < TWO_GB:
            onnx.save(model, str(tmp))
            return path
        with atomic_path(path.with_name(data_name)) as data_tmp:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_tmp.name)
        # the model file names the data file; point it at the final name
        m = onnx.load(str(tmp), load_external_data=False)
        for t in onnx.external_data_helper._get_all_tensors(m):
            for e in t.external_data:
                if e.key == "location":
                    e.value = data_name
        onnx.save(m, str(tmp))
    return path


def write_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` with the named initializers replaced (same dtype as before)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in weights:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            init.CopyFrom(numpy_helper.from_array(np.asarray(weights[init.name]).astype(dtype), init.name))
    return out
