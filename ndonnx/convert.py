"""Neighbourhood -> standalone ONNX sub-model -> torch module, and the numeric check between them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper

import ndonnx.converters  # noqa: F401  (registers converters onnx2torch lacks)
from ndonnx.converters._registry import missing as missing_converters
from ndonnx.graph import HALF_EPS, Teacher
from ndonnx.metrics import precision_bound, rel_err  # noqa: F401  (moved: callers import it from here)
from ndonnx.partition import Neighbourhood
from ndonnx.sample import Sample

# rel_err = ||torch - onnxruntime|| / ||onnxruntime|| at or below this counts as exact (float32).
EXACT_REL_ERR = 1e-4


def exact_rel_err(sub: onnx.ModelProto) -> float:
    """The exactness bound for a sub-model: `metrics.precision_bound` of the half-precision types
    among its weights and tensors, whatever type its outputs are cast to."""
    g = sub.graph
    types = {i.data_type for i in g.initializer}
    types |= {v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    return precision_bound(EXACT_REL_ERR, (HALF_EPS[t] for t in types if t in HALF_EPS))


@dataclass(frozen=True)
class RoundTrip:
    convertible: bool
    reason: str | None
    rel_err: float | None


def _value_info(name: str, sample: Sample) -> onnx.ValueInfoProto:
    """Real dims from the sample run where the teacher's are unknown, its symbolic dims (batch,
    sequence) kept: converters read these (onnx2torch takes LayerNormalization's normalized_shape
    from them), and the data's sequence length need not be the sample's."""
    value, declared = sample.values[name], sample.shapes[name]
    shape = [d if isinstance(d, str) and d != "?" else r for d, r in zip(declared, value.shape)]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), shape)


def extract(teacher: Teacher, nbh: Neighbourhood, sample: Sample) -> onnx.ModelProto:
    """The neighbourhood as its own model: boundary inputs (main, then side), its nodes in
    teacher order, every initializer they read, and recorded shapes for the tensors inside."""
    model = teacher.model
    nodes = [model.graph.node[i] for i in sorted({*nbh.nodes, *nbh.shape_nodes})]
    inits = {i.name: i for i in model.graph.initializer}
    reads = {n for node in nodes for n in node.input if n}
    produced = {o for node in nodes for o in node.output}
    io = list(nbh.feeds)
    inner = sorted(n for n in produced if n in sample.values and n not in nbh.outputs)
    graph = helper.make_graph(
        nodes, f"neighbourhood_{nbh.id}",
        [_value_info(n, sample) for n in io],
        [_value_info(n, sample) for n in nbh.outputs],
        [inits[n] for n in sorted(reads & inits.keys())],
        value_info=[_value_info(n, sample) for n in inner],
    )
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    return sub


def to_torch(sub: onnx.ModelProto) -> torch.fx.GraphModule:
    """onnx2torch conversion, in eval mode: its modules come in training mode (BatchNormalization
    would use batch statistics)."""
    from onnx2torch import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(sub).eval()


def run_torch(module: torch.nn.Module, sub: onnx.ModelProto, values: dict[str, np.ndarray]) -> list[np.ndarray]:
    names = [i.name for i in sub.graph.input]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = module(*[torch.as_tensor(np.array(values[n])) for n in names])
    out = out if isinstance(out, (tuple, list)) else [out]
    return [o.detach().cpu().numpy() for o in out]


def _reason(e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"conversion failed: {type(e).__name__}: {first}".rstrip(": ")


def round_trip(teacher: Teacher, nbh: Neighbourhood, sample: Sample) -> RoundTrip:
    """Convert the neighbourhood and compare torch with the teacher's onnxruntime activations."""
    try:
        sub = extract(teacher, nbh, sample)
    except Exception as e:  # any failure here means "keep this neighbourhood as the teacher"
        return RoundTrip(False, _reason(e), None)
    absent = missing_converters(sub)
    if absent:  # asked of the registry up front, not read from an exception's text
        return RoundTrip(False, f"no torch converter for {', '.join(absent)}", None)
    try:
        module = to_torch(sub)
        outs = run_torch(module, sub, sample.values)
    except Exception as e:  # any failure here means "keep this neighbourhood as the teacher"
        return RoundTrip(False, _reason(e), None)
    errs = []
    for name, got in zip(nbh.outputs, outs):
        want = sample.values[name]
        if np.issubdtype(want.dtype, np.floating):
            errs.append(rel_err(got, want))
        else:
            errs.append(0.0 if np.array_equal(got, want) else float("inf"))
    err = max(errs) if len(outs) == len(nbh.outputs) else float("inf")
    if err <= exact_rel_err(sub):
        return RoundTrip(True, None, err)
    reason = "output count differs" if len(outs) != len(nbh.outputs) else f"inexact: rel_err {err:.2e}"
    return RoundTrip(False, reason, None if not np.isfinite(err) else err)
