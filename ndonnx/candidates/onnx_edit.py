"""Small graph helpers shared by the generators: consumers, initializer get/set, unique names,
value_info upkeep, BatchNormalization folding, and the final contract check of a student."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ndonnx.graph import WEIGHTED_OPS, attr, remove_unused, weight_counts  # noqa: F401  (candidates import them from here)
from ndonnx.metrics import precision_bound



def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def consumers(model: onnx.ModelProto) -> dict[str, list[tuple[int, int]]]:
    """tensor name -> [(node index, input slot)] of every node that reads it."""
    out: dict[str, list[tuple[int, int]]] = {}
    for i, node in enumerate(model.graph.node):
        for k, name in enumerate(node.input):
            if name:
                out.setdefault(name, []).append((i, k))
    return out


def producers(model: onnx.ModelProto) -> dict[str, int]:
    return {o: i for i, node in enumerate(model.graph.node) for o in node.output if o}


def initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in model.graph.initializer if t.name == name), None)


def get_array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    t = initializer(model, name) if name else None
    return None if t is None else numpy_helper.to_array(t)


def set_array(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    """Replace an existing initializer's value, keeping its name and place."""
    t = initializer(model, name)
    assert t is not None, name
    t.CopyFrom(numpy_helper.from_array(np.asarray(array, order="C"), name))


def names_in_use(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {i.name for i in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
    for node in g.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def unique_name(taken: set[str], base: str) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def add_array(model: onnx.ModelProto, base: str, array: np.ndarray, taken: set[str] | None = None) -> str:
    """A new initializer under a fresh name derived from `base`; returns the name."""
    name = unique_name(taken if taken is not None else names_in_use(model), base)
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
    return name


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for k, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[k]
            break
    node.attribute.append(helper.make_attribute(name, value))


def value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    g = model.graph
    return {vi.name: vi for vi in [*g.input, *g.value_info, *g.output]}


def shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Known dims of every tensor (ints, or strings for symbolic dims); initializers included."""
    out: dict[str, list] = {}
    for name, vi in value_infos(model).items():
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    for t in model.graph.initializer:
        out[t.name] = list(t.dims)
    return out


def set_dim(model: onnx.ModelProto, name: str, axis: int, size: int) -> None:
    vi = value_infos(model).get(name)
    if vi is not None and vi.type.tensor_type.HasField("shape"):
        dim = vi.type.tensor_type.shape.dim[axis]
        dim.Clear()
        dim.dim_value = size


def add_value_info(model: onnx.ModelProto, like: str, name: str, axis: int, size: int) -> None:
    """value_info for a new tensor shaped like `like` except `axis`, which becomes `size`."""
    vi = value_infos(model).get(like)
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return
    new = onnx.ValueInfoProto()
    new.CopyFrom(vi)
    new.name = name
    model.graph.value_info.append(new)
    set_dim(model, name, axis, size)


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold every BatchNormalization that directly follows a Conv or a one-group ConvTranspose (its
    only consumer, constant weights) into the convolution's weight and bias. Students carry no BN
    (the documented choice): the convolution then produces the BN's output name. Other BNs stay
    (width slices them channel-wise)."""
    model = copy_model(model)
    g = model.graph
    cons = consumers(model)
    prod = producers(model)
    outputs = {o.name for o in g.output}
    taken = names_in_use(model)
    drop: set[int] = set()
    for b, bn in enumerate(g.node):
        if bn.op_type != "BatchNormalization" or len([o for o in bn.output if o]) != 1 or attr(bn, "training_mode", 0):
            continue
        x = bn.input[0]
        if x not in prod or x in outputs or len(cons.get(x, [])) != 1:
            continue
        conv = g.node[prod[x]]
        # output channels: a Conv's weight axis 0, a ConvTranspose's axis 1 (with one group)
        out_axis = {"Conv": 0, "ConvTranspose": 1}.get(conv.op_type)
        if out_axis is None or (out_axis == 1 and attr(conv, "group", 1) != 1):
            continue
        w = get_array(model, conv.input[1])
        stats = [get_array(model, n) for n in bn.input[1:5]]
        bias_name = conv.input[2] if len(conv.input) > 2 else ""
        bias = get_array(model, bias_name) if bias_name else None
        if w is None or any(s is None for s in stats) or (bias_name and bias is None):
            continue
        scale, beta, mean, var = (np.asarray(s, np.float64).reshape(-1) for s in stats)
        s = scale / np.sqrt(var + attr(bn, "epsilon", 1e-5))
        shape = [1] * w.ndim
        shape[out_axis] = -1
        new_w = (w.astype(np.float64) * s.reshape(shape)).astype(w.dtype)
        b0 = bias.astype(np.float64) if bias is not None else np.zeros(w.shape[out_axis])
        new_b = ((b0 - mean) * s + beta).astype(w.dtype)
        conv.input[1] = _write(model, cons, conv.input[1], new_w, taken)
        if bias_name:
            conv.input[2] = _write(model, cons, bias_name, new_b, taken)
        elif len(conv.input) > 2:  # an empty optional slot
            conv.input[2] = add_array(model, f"{conv.input[1]}_bias", new_b, taken)
        else:
            conv.input.append(add_array(model, f"{conv.input[1]}_bias", new_b, taken))
        conv.output[0] = bn.output[0]
        drop.add(b)
    if drop:
        kept = [n for i, n in enumerate(g.node) if i not in drop]
        del g.node[:]
        g.node.extend(kept)
    return remove_unused(model)[0]


def _write(model, cons, name: str, array: np.ndarray, taken: set[str]) -> str:
    """Write `array` for a slot that read `name`: in place when only that slot reads it."""
    if len(cons.get(name, [])) == 1:
        set_array(model, name, array)
        return name
    return add_array(model, name, array, taken)


def io_signature(model: onnx.ModelProto) -> tuple:
    g = model.graph
    inits = {t.name for t in g.initializer}
    ins = tuple((vi.name, vi.type.SerializeToString()) for vi in g.input if vi.name not in inits)
    outs = tuple((vi.name, vi.type.SerializeToString()) for vi in g.output)
    return ins, outs


class ContractError(AssertionError):
    """A generator broke the student contract (a bug, not a property of the teacher)."""


def finish(teacher: onnx.ModelProto, student: onnx.ModelProto, what: str) -> onnx.ModelProto:
    """The student without unused parts, checked against the contract: same boundary as the
    teacher, valid ONNX. Returns a new model (like every whole-model rewrite)."""
    student, _ = remove_unused(student)
    if student.ir_version < 4:
        # IR < 4 wants every initializer listed as a graph input too; blocks extracted from such a
        # teacher (onnx's light models, upgraded to opset 13 but left at IR 3) already break that.
        student.ir_version = 4
    if io_signature(student) != io_signature(teacher):
        raise ContractError(f"{what}: the student's inputs/outputs differ from the teacher's")
    try:
        onnx.checker.check_model(student, full_check=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the stage named
        raise ContractError(f"{what}: the student is not a valid ONNX model: {e}") from e
    return student


CHECK_TOL = 1e-4  # relative to the largest output value: float sums in another order, nothing more


def differs(student: onnx.ModelProto, reference: onnx.ModelProto, *feeds: dict[str, np.ndarray]) -> str | None:
    """Why `student` does not compute what `reference` does on each of `feeds` (onnxruntime), or None.
    A model onnxruntime cannot load raises NdonnxError."""
    from ndonnx.sample import ort_session

    names = [o.name for o in reference.graph.output]
    a, b = ort_session(student), ort_session(reference)
    for f in feeds:
        for name, g, w in zip(names, a.run(names, f), b.run(names, f)):
            scale = max(1.0, float(np.abs(w).max(initial=0)))
            tol = precision_bound(CHECK_TOL, [np.finfo(w.dtype).eps] if np.issubdtype(w.dtype, np.floating) else [])
            if g.shape != w.shape or not np.allclose(g, w, rtol=tol, atol=tol * scale):
                err = float(np.abs(g - w).max()) / scale if g.shape == w.shape else float("inf")
                return f"output {name!r} differs from the teacher's with the dropped parts zeroed (error {err:.1e})"
    return None


def param_count(model: onnx.ModelProto) -> int:
    return sum(weight_counts(model).values())
