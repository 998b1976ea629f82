"""Loading a teacher: safe external data, opset upgrade, constant folding (reads of dims the weights
fix included), dead-code removal, parameter counting. Everything downstream sees weights as initializers only.

The rule for rewrites, here and everywhere: a function that rewrites a whole model returns a new
one and leaves its argument as it was (`fold_constants`, `remove_unused`, `dynamic_dims`,
`fold_batchnorm`, `finish`, `splice`); only the editing primitives of `candidates.onnx_edit`
(`set_array`, `set_dim`, ...) change the model in hand, a copy its generator made first."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper, version_converter
from onnx.reference import ReferenceEvaluator

from ndonnx import light
from ndonnx.errors import NdonnxError
from ndonnx.memory import release_freed_memory

log = logging.getLogger(__name__)

ONNX_DOMAINS = ("", "ai.onnx")
# Half-precision float types -> their machine epsilon (float16 trains and is checked as float32 would not be).
HALF_EPS = {TensorProto.FLOAT16: float(np.finfo(np.float16).eps), TensorProto.BFLOAT16: 2.0 ** -7}
MIN_OPSET = 9
# Below this opset onnx2torch lacks converters for common ops; onnx's version converter upgrades.
UPGRADE_BELOW = 11
UPGRADE_TO = 13

QUANT_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulInteger", "ConvInteger", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention",
}
# Where a quantized model keeps its integer weights: op -> {input slot of a weight: slot of its zero
# point (None: the zero is 0)}. An int8 Gather table is an embedding quantized by onnxruntime's
# dynamic quantizer (its zero point is that of the DequantizeLinear reading the gathered rows).
QUANT_WEIGHT_SLOTS = {
    "DequantizeLinear": {0: 2}, "MatMulInteger": {0: 2, 1: 3}, "ConvInteger": {0: 2, 1: 3},
    "QLinearConv": {0: 2, 3: 5, 8: None}, "QLinearMatMul": {0: 2, 3: 5}, "DynamicQuantizeMatMul": {1: 3},
    "MatMulIntegerToFloat": {0: 4, 1: 5}, "Gather": {0: None},
}
# Inputs that hold scales and zero points: never parameters.
QUANT_PARAM_SLOTS = {
    "QuantizeLinear": {1, 2}, "DequantizeLinear": {1, 2}, "MatMulInteger": {2, 3}, "ConvInteger": {2, 3},
    "QLinearConv": {1, 2, 4, 5, 6, 7}, "QLinearMatMul": {1, 2, 4, 5, 6, 7}, "DynamicQuantizeMatMul": {2, 3},
    "MatMulIntegerToFloat": {2, 3, 4, 5},
}
QUANT_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT4,
               TensorProto.UINT4, TensorProto.INT32}  # INT32: a QDQ bias; only ever at a weight slot
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
NONDETERMINISTIC_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Bernoulli", "Multinomial", "Dropout"}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
# Float inputs that configure an op rather than weigh it (not parameters).
NON_WEIGHT_SLOTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1), ("Pad", 2), ("Clip", 1), ("Clip", 2)}


@dataclass
class Teacher:
    """A loaded, normalised teacher graph. `model` is the one every later stage reads."""

    path: Path
    model: onnx.ModelProto
    opset: int
    weights: dict[str, int]  # initializer name -> parameter count (float weights only)

    @property
    def params(self) -> int:
        return sum(self.weights.values())

    @property
    def input_names(self) -> list[str]:
        return graph_inputs(self.model)


def graph_inputs(model: onnx.ModelProto) -> list[str]:
    """Real inputs: old IR versions also list initializers as inputs."""
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of a node's attribute, or `default` when it is not set."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def onnx_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ONNX_DOMAINS:
            return o.version
    return 1


def load_teacher(path: str | os.PathLike, quantized: bool = False) -> Teacher:
    """Read, check and normalise a teacher model; raises NdonnxError on anything a user can fix.
    A quantized model is refused (there is nothing to distil) unless `quantized` (what `ndonnx check`
    and `validate` gate): it is then loaded as stored, its quantization nodes never folded away."""
    path = Path(path)
    model = _read(path)
    if not quantized:
        _refuse_quantized(model)
    model, _ = dynamic_dims(model)
    opset = onnx_opset(model)
    if opset < UPGRADE_BELOW:
        model = _upgrade_opset(model, path)
    model = fold_constants(model, keep_ops=QUANT_OPS if quantized else ())  # dead code goes with it
    if not quantized:
        model, folded = fold_weight_dims(model)
        if folded:
            model = fold_constants(model)
    release_freed_memory()  # the rewrites' copies
    return Teacher(path=path, model=model, opset=onnx_opset(model), weights=weight_counts(model))


def _read(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise NdonnxError(f"{path}: no such file")
    if not path.is_file():
        raise NdonnxError(f"{path}: not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several types for garbage input
        raise NdonnxError(f"{path}: not a readable ONNX model ({type(e).__name__})") from e
    if not model.graph.node or not model.graph.output:
        raise NdonnxError(f"{path}: not an ONNX model (no graph nodes or outputs)")
    base = path.resolve().parent
    for tensor in _all_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            _check_external(tensor, base, path)
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as e:
        raise NdonnxError(f"{path}: cannot read its external data ({e})") from e
    try:  # by path: the checker reads the file itself (from memory it would serialize the model again)
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NdonnxError(f"{path}: invalid ONNX model: {first}") from e
    except ValueError as e:  # > 2 GB protos cannot be checked in memory
        log.warning("skipped onnx.checker: %s", e)
    return model


def _all_tensors(model: onnx.ModelProto):
    yield from external_data_helper._get_all_tensors(model)


def _check_external(tensor: TensorProto, base: Path, path: Path) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    target = (base / location).resolve()
    if not location or os.path.isabs(location) or not target.is_relative_to(base):
        raise NdonnxError(f"{path}: external data location {location!r} of {tensor.name!r} "
                          f"is outside the model's folder; refused")
    if not target.is_file():
        raise NdonnxError(f"{path}: external data file {location!r} of {tensor.name!r} is missing")
    end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
    if end > target.stat().st_size:
        raise NdonnxError(f"{path}: external data file {location!r} is truncated "
                          f"({tensor.name!r} needs {end} bytes)")


def is_quantized(model: onnx.ModelProto) -> bool:
    return bool({n.op_type for n in model.graph.node} & QUANT_OPS)


def _refuse_quantized(model: onnx.ModelProto) -> None:
    ops = {n.op_type for n in model.graph.node}
    if ops & QUANT_OPS:
        raise NdonnxError(f"quantized models are not supported (found {', '.join(sorted(ops & QUANT_OPS))}); "
                          f"compress the float model, then quantize the student")
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS:
            for name in node.input[1:2]:
                if name in inits and inits[name].data_type in (TensorProto.INT8, TensorProto.UINT8):
                    raise NdonnxError(f"quantized models are not supported ({node.op_type} "
                                      f"{node.name!r} has integer weights)")


def dynamic_dims(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Dims declared as `dim_value <= 0` (paddle2onnx and others write -1 for a dynamic dim) made
    symbolic, as onnxruntime reads them: the new model, and how many changed."""
    model = _copy(model)
    changed = 0
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for j, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.dim_param = f"{vi.name}_dim{j}"
                changed += 1
    return model, changed


def _upgrade_opset(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    old = onnx_opset(model)
    try:
        upgraded = version_converter.convert_version(model, UPGRADE_TO)
        # the converter keeps the old IR version, which the new opset does not allow in sub-models
        upgraded.ir_version = max(upgraded.ir_version, helper.find_min_ir_version_for(upgraded.opset_import))
        onnx.checker.check_model(upgraded)
        return upgraded
    except Exception as e:
        if old < MIN_OPSET:
            raise NdonnxError(f"{path}: opset {old} is older than {MIN_OPSET} and could not be "
                              f"upgraded ({type(e).__name__})") from e
        log.warning("kept opset %d: the version converter failed (%s)", old, e)
        return model


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _subgraph_names(model: onnx.ModelProto) -> set[str]:
    """Names read from the outer scope by If/Loop/Scan bodies: these must keep their names."""
    return set().union(*(subgraph_reads(n) for n in model.graph.node))


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every name the node's If/Loop/Scan bodies read (outer-scope names among them)."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for n in g.node:
                names.update(n.input)
                names |= subgraph_reads(n)
    return names


def fold_constants(model: onnx.ModelProto, keep_ops=()) -> onnx.ModelProto:
    """Turn every subgraph whose inputs are all constant into initializers.

    Constant nodes become initializers; Identity of an initializer becomes an alias (the legacy
    exporter's deduplication: copying would count the weight twice); the rest of the constant
    subgraph (ConstantOfShape, Cast, Reshape, ...) is evaluated in one onnxruntime session.
    Nodes of the op types `keep_ops` stay (a quantized model's DequantizeLinear of its weights).
    """
    model = _copy(model)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    graph_outputs = {o.name for o in g.output}
    keep_names = graph_outputs | _subgraph_names(model)
    alias: dict[str, str] = {}
    constant = set(inits)  # tensor names known constant
    foldable: list[onnx.NodeProto] = []
    kept: list[onnx.NodeProto] = []
    for node in g.node:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
        if node.op_type == "Constant" and node.domain in ONNX_DOMAINS and node.output[0] not in keep_names:
            tensor = _constant_value(node)
            if tensor is not None:
                g.initializer.append(tensor)
                inits[tensor.name] = tensor
                constant.add(tensor.name)
                continue
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in keep_names:
            alias[node.output[0]] = node.input[0]
            continue
        inputs = [n for n in node.input if n]
        if (inputs and all(n in constant for n in inputs) and node.domain in ONNX_DOMAINS
                and node.op_type not in NONDETERMINISTIC_OPS and node.op_type not in keep_ops
                and not _has_subgraph(node)
                and not set(node.output) & keep_names):
            foldable.append(node)
            constant.update(node.output)
        else:
            kept.append(node)
    for o in g.output:  # an output that was an alias keeps its name through an Identity
        if o.name in alias:
            kept.append(helper.make_node("Identity", [alias[o.name]], [o.name]))
    if foldable:
        needed = {n for node in kept for n in node.input} | graph_outputs
        produced = [o for node in foldable for o in node.output if o in needed]
        values = _evaluate(model, foldable, produced)
        for name, value in values.items():
            g.initializer.append(numpy_helper.from_array(value, name))
    del g.node[:]
    g.node.extend(kept)
    return remove_unused(model)[0]


def fold_weight_dims(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Reads of a dim the weights fix, as constants: `Shape` (with its start/end), and `Gather` or
    `Slice` of a `Shape` at constant indices or bounds, where every dim read stays static when every
    input dim is made symbolic (channels, hidden sizes, heads: never the batch or a spatial size).
    torch's legacy exporter writes `chunk` this way (`Shape -> Gather(1) -> Div -> Slice`), GPT-2's
    Conv1D `x.size(-1)` as `Shape -> Slice(-1:)`; as constants they fold on, and a Slice's bounds or
    a Reshape's target become constants a width student can rewrite. Exact wherever onnx's inference
    is (the static value is implied by the graph for every input); the loaded graph is checked
    against the file after. Returns the new model and how many nodes became constants."""
    inputs = {i.name for i in model.graph.input}

    def free(probe: onnx.ModelProto) -> None:  # every dim of every declared input symbolic
        for vi in probe.graph.input:
            for j, d in enumerate(vi.type.tensor_type.shape.dim if vi.name in inputs else ()):
                d.Clear()
                d.dim_param = f"{vi.name}_free{j}"

    try:  # data_prop follows shapes through the Shape -> Concat -> Reshape arithmetic of legacy exports
        g = light.infer_shapes(model, data_prop=True, edit=free).graph
    except Exception:  # inference is a help: without it nothing is folded
        return model, 0
    fixed = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
             for vi in [*g.input, *g.value_info, *g.output] if vi.type.tensor_type.HasField("shape")}
    model = _copy(model)
    nodes = model.graph.node
    inits = {i.name: i for i in model.graph.initializer}
    keep = {o.name for o in model.graph.output} | _subgraph_names(model)
    shape_of: dict[str, list] = {}  # Shape output -> the dims it reads (None where not fixed)
    for node in nodes:
        if node.op_type == "Shape" and node.domain in ONNX_DOMAINS and node.input[0] in fixed:
            dims = fixed[node.input[0]]
            shape_of[node.output[0]] = dims[slice(attr(node, "start", 0), attr(node, "end", None))]
    folded = 0
    for k, node in enumerate(nodes):
        value = None
        if node.op_type == "Shape" and node.output[0] in shape_of:
            dims = shape_of[node.output[0]]
            value = np.array(dims, np.int64) if None not in dims else None
        elif (node.op_type == "Gather" and node.domain in ONNX_DOMAINS and node.input[0] in shape_of
              and node.input[1] in inits and attr(node, "axis", 0) == 0):
            dims = shape_of[node.input[0]]
            idx = numpy_helper.to_array(inits[node.input[1]])
            picked = [dims[int(i)] if -len(dims) <= int(i) < len(dims) else None for i in idx.reshape(-1)]
            value = np.array(picked, np.int64).reshape(idx.shape) if None not in picked else None
        elif (node.op_type == "Slice" and node.domain in ONNX_DOMAINS and node.input[0] in shape_of
              and all(n in inits for n in node.input[1:] if n)):  # x.size(-1) as GPT-2's legacy export reads it
            start, end, *rest = [int(numpy_helper.to_array(inits[n]).reshape(-1)[0]) if n else None
                                 for n in [*node.input[1:], "", ""][:4]]
            if rest[0] in (None, 0, -1) and rest[1] != 0:  # axis 0 of a 1-D shape; a step of 0 is invalid
                picked = shape_of[node.input[0]][slice(start, end, rest[1])]
                shape_of[node.output[0]] = picked
                value = np.array(picked, np.int64) if None not in picked else None
        if value is not None and node.output[0] not in keep:
            nodes[k].CopyFrom(helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                               value=numpy_helper.from_array(value)))
            folded += 1
    return model, folded


def _constant_value(node: onnx.NodeProto) -> TensorProto | None:
    try:
        value = ReferenceEvaluator(
            helper.make_model(helper.make_graph([node], "c", [], [helper.make_empty_tensor_value_info(node.output[0])]))
        ).run(None, {})[0]
    except Exception:  # sparse_value or an attribute the evaluator does not know: leave the node
        return None
    return numpy_helper.from_array(np.asarray(value), node.output[0])


def _evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto], outputs: list[str]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    inits = {i.name: i for i in model.graph.initializer}
    reads = {n for node in nodes for n in node.input if n in inits}
    graph = helper.make_graph(nodes, "fold", [], [onnx.ValueInfoProto(name=o) for o in outputs],
                              [inits[n] for n in sorted(reads)])
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip(outputs, sess.run(outputs, {})))


@dataclass(frozen=True)
class Removed:
    """What `remove_unused` took out."""

    nodes: int = 0
    outputs: int = 0  # unread trailing optional outputs (Dropout's mask, BatchNormalization's statistics)
    initializers: int = 0
    value_info: int = 0

    def __bool__(self) -> bool:
        return any((self.nodes, self.outputs, self.initializers, self.value_info))


def remove_unused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Removed]:
    """The one dead-code routine (teacher loading, splicing, every student): returns a copy without
    nodes none of whose outputs reach a graph output, unread trailing outputs the op's schema marks
    optional, initializers nothing reads, and value_info of tensors no node makes. Reads inside
    If/Loop/Scan bodies count. Postcondition: the graph outputs are made exactly as before."""
    out = _copy(model)
    g = out.graph
    graph_outputs = {o.name for o in g.output}
    live = set(graph_outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(g.node):
        if set(node.output) & live:
            keep.append(node)
            live.update(node_inputs(node))
    keep.reverse()
    opsets = {o.domain: o.version for o in out.opset_import}
    outputs = 0
    for node in keep:
        optional = _optional_outputs(node, opsets)
        while len(node.output) > 1 and len(node.output) - 1 in optional and node.output[-1] not in live:
            node.output.pop()
            outputs += 1
    dropped = {i.name for i in g.initializer if i.name not in live}
    made = {o for node in keep for o in node.output}
    vis = [vi for vi in g.value_info if vi.name in made and vi.name not in graph_outputs]
    removed = Removed(len(g.node) - len(keep), outputs, len(dropped), len(g.value_info) - len(vis))
    if not removed:
        return out, removed
    for field, items in (("node", keep), ("initializer", [i for i in g.initializer if i.name not in dropped]),
                         ("value_info", vis), ("input", [i for i in g.input if i.name not in dropped])):
        del getattr(g, field)[:]  # old IR versions list initializers as graph inputs too
        getattr(g, field).extend(items)
    lost = graph_outputs - {o for node in g.node for o in node.output} - {i.name for i in g.input} - \
        {i.name for i in g.initializer}
    if lost:
        raise AssertionError(f"remove_unused lost graph outputs {sorted(lost)}")
    return out, removed


def _optional_outputs(node: onnx.NodeProto, opsets: dict[str, int]) -> set[int]:
    """Indices of the outputs the op's schema marks optional (none for ops onnx does not know)."""
    domain = "" if node.domain in ONNX_DOMAINS else node.domain
    try:
        schema = onnx.defs.get_schema(node.op_type, opsets.get(node.domain, opsets.get(domain, 1)), domain)
    except onnx.defs.SchemaError:
        return set()
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    return {k for k, o in enumerate(schema.outputs) if o.option == optional}


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Everything a node reads, its If/Loop/Scan bodies included."""
    return [n for n in node.input if n] + sorted(subgraph_reads(node))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def weight_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Parameters per initializer: float tensors of more than one element that some op reads as a
    weight. Shape/index constants (integers), scalars and op settings (Resize scales) are not weights.
    In a quantized model the integer weights count too, once each (`QUANT_WEIGHT_SLOTS`: int8/uint8
    weights, int32 QDQ biases), and scales and zero points do not (`QUANT_PARAM_SLOTS`, and the
    weight scales onnxruntime's dynamic quantizer multiplies into the output): a quantized student
    has the parameters of its float model."""
    slots: dict[str, set[tuple[str, int]]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            slots.setdefault(name, set()).add((node.op_type, k))
    scales = _dynamic_scales(model)
    out = {}
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        uses = slots.get(init.name, set())
        if n <= 1 or init.name in scales:
            continue
        if init.data_type in FLOAT_TYPES:
            settings = {(op, k) for op, k in uses if k in QUANT_PARAM_SLOTS.get(op, ())} | (uses & NON_WEIGHT_SLOTS)
            if not (uses and uses <= settings):
                out[init.name] = n
        elif init.data_type in QUANT_TYPES and _quant_weight(init, uses):
            out[init.name] = n
    return out


def _quant_weight(init: TensorProto, uses: set[tuple[str, int]]) -> bool:
    """An integer initializer read where a quantized op takes its weight (an int8 Gather table only)."""
    for op, k in uses:
        if k in QUANT_WEIGHT_SLOTS.get(op, {}) and (op != "Gather" or init.data_type in (TensorProto.INT8,
                                                                                       TensorProto.UINT8)):
            return True
    return False


def _dynamic_scales(model: onnx.ModelProto) -> set[str]:
    """Float initializers that scale an integer product back to floats: onnxruntime's dynamic
    quantizer writes Mul(Cast(MatMulInteger(...)), Mul(input scale, weight scale)); the weight scale
    (per channel, so more than one element) is not a parameter."""
    made = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    found: set[str] = set()

    def collect(name: str, depth: int) -> None:
        if name in inits:
            found.add(name)
        elif depth and name in made and made[name].op_type == "Mul":
            for i in made[name].input:
                collect(i, depth - 1)

    for node in model.graph.node:
        if node.op_type != "Mul":
            continue
        for a, b in (node.input[:2], node.input[1::-1]):
            cast = made.get(a)
            if cast is not None and cast.op_type == "Cast" and cast.input[0] in made \
                    and made[cast.input[0]].op_type in ("MatMulInteger", "ConvInteger"):
                collect(b, 2)
    return found


def weight_nonzeros(model: onnx.ModelProto) -> dict[str, int]:
    """Non-zero values per weight (the weights of `weight_counts`). An integer weight's zero is its
    zero point: a stored value equal to it dequantizes to 0 (a per-axis or blocked zero point is
    broadcast along the axis the reading op gives it)."""
    inits = {i.name: i for i in model.graph.initializer}
    zero_points: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        for k in QUANT_WEIGHT_SLOTS.get(node.op_type, {}):
            name = node.input[k] if k < len(node.input) else ""
            if name in inits and name not in zero_points:
                shape = tuple(inits[name].dims)
                zp = _zero_point(model, inits, node, k, shape)
                if zp is not None:
                    zero_points[name] = zp
    out = {}
    for name in weight_counts(model):
        w = numpy_helper.to_array(inits[name])
        out[name] = int(np.count_nonzero(w if name not in zero_points else w != zero_points[name]))
    return out


def _zero_point(model: onnx.ModelProto, inits: dict, node: onnx.NodeProto, k: int, shape: tuple):
    """The zero point of input `k` of a quantized op, broadcastable to `shape`; None when it is 0."""
    if node.op_type == "Gather":  # the zero point of the DequantizeLinear that reads the gathered rows
        reader = next((r for r in model.graph.node if r.op_type == "DequantizeLinear" and r.input[0] == node.output[0]),
                      None)
        zp = None if reader is None else _zero_point(model, inits, reader, 0, ())
        return None if zp is None or zp.size > 1 else zp.reshape(())  # a per-axis one belongs to the rows
    slot = QUANT_WEIGHT_SLOTS[node.op_type][k]
    if slot is None or slot >= len(node.input) or node.input[slot] not in inits:
        return None
    zp = numpy_helper.to_array(inits[node.input[slot]])
    if zp.size <= 1 or not shape:
        return zp.reshape(()) if zp.size == 1 else zp
    if node.op_type == "DequantizeLinear":
        axis = attr(node, "axis", 1) % len(shape)
        block = attr(node, "block_size", 0) or 0
        if block and zp.ndim == len(shape):  # blocked: each zero point covers `block` values along the axis
            return np.repeat(zp, block, axis=axis)[tuple(slice(0, d) for d in shape)]
    elif node.op_type in ("ConvInteger", "QLinearConv"):
        axis = 0  # per output channel
    else:  # MatMul-like: B per column (its last axis), A per row
        axis = len(shape) - 1 if k == max(QUANT_WEIGHT_SLOTS[node.op_type]) else 0
    return zp.reshape([-1 if j == axis else 1 for j in range(len(shape))])


def restore_interface(model: onnx.ModelProto, like: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the input/output declarations of `like` (same names), e.g. a fixed batch."""
    out = _copy(model)
    for field in ("input", "output"):
        decl = {vi.name: vi for vi in getattr(like.graph, field)}
        for vi in getattr(out.graph, field):
            if vi.name in decl:
                vi.CopyFrom(decl[vi.name])
    return out
