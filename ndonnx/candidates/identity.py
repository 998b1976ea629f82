"""identity: drop the residual branch f of a block whose output is x + f(x) or relu(x + f(x)).

x here is the skip operand of the final Add: the block input itself, or what the block computes
from it without any weighted op (the pre-activation ReLU of a basic block, SiLU of a stem, the
LayerNorm of a post-norm transformer layer). The student keeps the nodes that compute x (their
constants, e.g. LayerNorm's scale and shift, still count as parameters) and ends with
Identity(x) (Relu(x) when the block ends with one), so input and output names stay distinct.

Applies only when the output is exactly Add(x, f) or Relu(Add(x, f)) (a two-input Sum counts as Add), x has the output's shape and
dtype (no broadcasting), and f holds a weighted op. Not for stems, heads, downsampling blocks whose
shortcut is a projection, or several outputs.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ndonnx.candidates.base import CandidateSpec, NotApplicable, Student, register
from ndonnx.candidates.onnx_edit import (WEIGHTED_OPS, copy_model, finish, fold_batchnorm, names_in_use,
                                         param_count, producers, unique_name, value_infos)


def _ancestors(model: onnx.ModelProto, name: str, prod: dict[str, int]) -> set[int]:
    seen: set[int] = set()
    stack = [name]
    while stack:
        i = prod.get(stack.pop())
        if i is not None and i not in seen:
            seen.add(i)
            stack.extend(n for n in model.graph.node[i].input if n)
    return seen


def _type(model: onnx.ModelProto, name: str) -> tuple | None:
    """(elem type, dims) with every symbolic dim as None: exporters name the same batch dim
    differently on different tensors (unk__18, unk__156)."""
    vi = value_infos(model).get(name)
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    t = vi.type.tensor_type
    return t.elem_type, tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


def skip_student(sub: onnx.ModelProto) -> onnx.ModelProto:
    model = fold_batchnorm(sub)
    g = model.graph
    if len(g.output) != 1:
        raise NotApplicable("the block has several outputs")
    out = g.output[0].name
    main = g.input[0].name
    prod = producers(model)
    last = g.node[prod[out]] if out in prod else None
    relu = last is not None and last.op_type == "Relu"
    add = g.node[prod[last.input[0]]] if relu and last.input[0] in prod else last
    if add is None or add.op_type not in ("Add", "Sum") or len(add.input) != 2:  # Sum: Caffe2-era exports
        raise NotApplicable("the output is not Add(x, f(x)) or Relu(Add(x, f(x)))")
    branches = []
    for name in add.input:
        nodes = _ancestors(model, name, prod)
        weighted = any(g.node[i].op_type in WEIGHTED_OPS for i in nodes)
        reads_main = name == main or any(main in g.node[i].input for i in nodes)
        branches.append((name, nodes, weighted, reads_main))
    skips = [b for b in branches if not b[2] and b[3]]
    if len(skips) != 1 or not any(b[2] for b in branches if b is not skips[0]):
        raise NotApplicable("no residual Add of a weightless skip path and a weighted branch")
    skip, keep, _, _ = skips[0]
    if _type(model, skip) is None or _type(model, skip) != _type(model, add.output[0]):
        raise NotApplicable("the skip path's shape differs from the block output (no broadcasting allowed)")
    taken = names_in_use(model)
    tail = helper.make_node("Relu" if relu else "Identity", [skip], [out],
                            name=unique_name(taken, f"{add.name or 'residual'}/identity"))
    nodes = [n for i, n in enumerate(g.node) if i in keep] + [tail]
    del g.node[:]
    g.node.extend(nodes)
    return model


@register("identity")
def generate(sub: onnx.ModelProto, spec: CandidateSpec) -> Student:
    model = skip_student(copy_model(sub))
    model = finish(sub, model, str(spec))
    n = param_count(model)
    return Student(spec, model, n, n)
