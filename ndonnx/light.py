"""Light graphs: how a large model reaches onnxruntime without serialized copies of its weights.

A session made from `model.SerializeToString()` holds, at its peak, the caller's model, the bytes,
onnxruntime's parse of them and its own initializers (BERT-base, 435 MB: 1.2 GiB over the loaded
model at the peak, 1.0 GiB held after). Instead, a model above LIGHT_BYTES is written as a graph
without weights plus one file of its initializers and the session is made from that path: 0.8 GiB
at the peak, 0.34 GiB held (onnxruntime's pre-packed MatMul weights). Offsets are page-aligned, which
onnxruntime needs to map a tensor instead of reading it (it maps them with pre-packing off). The
folder is removed once the session exists: onnxruntime has read or mapped what it needs by then (a
mapping outlives the file's name on POSIX systems).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator

import onnx
from onnx import TensorProto

LIGHT_BYTES = 64 << 20  # models larger than this reach onnxruntime as a light graph
EXTERNAL_BYTES = 1024  # initializers from this size on go to the weights file (onnx's own default threshold)
ALIGN = 4096  # offsets in the weights file: a page, what mapping a tensor needs
WEIGHTS = "weights.bin"
FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def is_large(model: onnx.ModelProto) -> bool:
    """Whether the model's initializers hold more than LIGHT_BYTES, counted from their dims (protobuf's
    ByteSize serializes the whole model to count)."""
    total = 0
    for t in model.graph.initializer:
        total += _nbytes(t)
        if total > LIGHT_BYTES:
            return True
    return False


def _nbytes(t: TensorProto) -> int:
    """From the dims (`t.ByteSize()` would serialize it)."""
    n = math.prod(t.dims)
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError):  # strings and types numpy lacks: counted as 8 bytes
        return n * 8


@contextlib.contextmanager
def light_path(model: onnx.ModelProto, outputs: Iterable[str] = (),
               nodes: Iterable[onnx.NodeProto] = ()) -> Iterator[str]:
    """`model` with `nodes` appended, also giving `outputs`, saved in a temporary folder as a graph
    without recorded inner shapes (they pin sample sizes in onnxruntime) whose large initializers
    are in WEIGHTS beside it; yields the graph's path and removes the folder on exit."""
    folder = tempfile.mkdtemp(prefix="ndonnx-light-")
    try:
        light = extend(skeleton(model), outputs, nodes)
        with open(os.path.join(folder, WEIGHTS), "wb") as f:
            for t in model.graph.initializer:
                raw = t.raw_data if t.data_location != TensorProto.EXTERNAL else b""  # (a copy: read once)
                if len(raw) < EXTERNAL_BYTES:
                    light.graph.initializer.add().CopyFrom(t)
                    continue
                f.write(b"\0" * (-f.tell() % ALIGN))
                light.graph.initializer.append(_pointer(t, f.tell(), len(raw)))
                f.write(raw)
        path = os.path.join(folder, "model.onnx")
        onnx.save(light, path)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def shape_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` for shape inference: a large model's large float initializers (weights)
    become typed graph inputs without data (inference reads their types only; serializing the weights for it cost
    three copies of them). A small model is copied whole."""
    if not is_large(model):
        return _copy(model)
    view = _copy_except(model, {"initializer"})
    declared = {i.name for i in view.graph.input}
    for t in model.graph.initializer:
        if t.data_type not in FLOATS or (t.data_location != TensorProto.EXTERNAL and _nbytes(t) < EXTERNAL_BYTES):
            view.graph.initializer.add().CopyFrom(t)  # integers may be shapes, which inference reads
        elif t.name not in declared:
            view.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return view


def infer_shapes(model: onnx.ModelProto, data_prop: bool = False,
                 edit: Callable[[onnx.ModelProto], None] | None = None) -> onnx.ModelProto:
    """onnx's shape inference of `model` (changed first by `edit`, on a copy), on its `shape_view`.
    The result has the model's own inputs, outputs and inferred value_info; of a large model, its
    small initializers only."""
    if not is_large(model) and edit is None:
        return onnx.shape_inference.infer_shapes(model, data_prop=data_prop)
    view = shape_view(model)
    if edit is not None:
        edit(view)
    out = onnx.shape_inference.infer_shapes(view, data_prop=data_prop)
    declared = {i.name for i in model.graph.input}
    inputs = [i for i in out.graph.input if i.name in declared]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    return out


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def extend(model: onnx.ModelProto, outputs: Iterable[str], nodes: Iterable[onnx.NodeProto] = ()) -> onnx.ModelProto:
    """`model` (changed in place) with `nodes` appended, also giving the tensors `outputs` (those it
    gives already once)."""
    model.graph.node.extend(nodes)
    given = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(outputs) if n not in given)
    return model


def _pointer(t: TensorProto, offset: int, length: int) -> TensorProto:
    """`t` without its bytes, pointing to its `length` bytes in WEIGHTS at `offset`."""
    out = TensorProto(name=t.name, dims=t.dims, data_type=t.data_type, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", WEIGHTS), ("offset", str(offset)), ("length", str(length))):
        out.external_data.add(key=key, value=value)
    return out


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without its initializers and recorded inner shapes (copied field by field:
    `CopyFrom` would copy the weights too)."""
    return _copy_except(model, {"initializer", "value_info"})


def _copy_except(model: onnx.ModelProto, graph_fields: set[str]) -> onnx.ModelProto:
    """A copy of `model` without the graph fields `graph_fields`, copied field by field."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip={"graph"})
    _copy_fields(model.graph, out.graph, skip=graph_fields)
    return out


def _copy_fields(src, dst, skip: set[str]) -> None:
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)
