"""Shared helpers: registration into onnx2torch's registry and constant-input lookup."""

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from onnx import defs
from onnx2torch.node_converters.registry import (
    _CONVERTER_REGISTRY,
    OperationDescription,
    TConverter,
    add_converter,
)
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, get_const_value

# (op_type, version) keys this package added, in registration order.
ADDED: List[Tuple[str, int]] = []


class Replacement(NamedTuple):
    """One of onnx2torch's own converters that ndonnx overrides, and why."""

    op_type: str
    version: int
    reason: str


# onnx2torch keys whose converter this package replaced, in replacement order.
REPLACED_KEYS: List[Replacement] = []
# onnx2torch's own converters that were replaced (tests show what they got wrong)
ORIGINALS: Dict[Tuple[str, int], TConverter] = {}


def _key(op_type: str, version: int) -> OperationDescription:
    return OperationDescription(domain=defs.ONNX_DOMAIN, operation_type=op_type, version=version)


def register(op_type: str, *versions: int) -> Callable[[TConverter], TConverter]:
    """Like onnx2torch's ``add_converter`` for several versions, but skips keys onnx2torch already has.

    Skipping (rather than raising) keeps ``import ndonnx.converters`` working if a later onnx2torch
    release ships its own converter for one of these versions; its converter then wins.
    """

    def deco(converter: TConverter) -> TConverter:
        for version in versions:
            if _key(op_type, version) in _CONVERTER_REGISTRY:
                continue
            add_converter(operation_type=op_type, version=version)(converter)
            ADDED.append((op_type, version))
        return converter

    return deco


def replace(op_type: str, *versions: int, reason: str) -> Callable[[TConverter], TConverter]:
    """Replace onnx2torch's own converter for existing keys (the only place ndonnx overrides one).

    For onnx2torch converters that are wrong or refuse valid attributes for models we meet (e.g.
    Reshape-14 ``allowzero=1``, which torch's dynamo exporter writes). Every key must exist in
    onnx2torch's registry: replacing is never a silent way to add one (that is ``register``).
    Each replacement is recorded with its ``reason`` in ``REPLACED`` (``ndonnx.converters``).
    """

    def deco(converter: TConverter) -> TConverter:
        for version in versions:
            key = _key(op_type, version)
            if key not in _CONVERTER_REGISTRY:
                raise KeyError(f'onnx2torch has no converter for {op_type}-{version} to replace')
            if any(r.op_type == op_type and r.version == version for r in REPLACED_KEYS):
                raise ValueError(f'{op_type}-{version} is replaced twice')
            ORIGINALS[(op_type, version)] = _CONVERTER_REGISTRY[key]
            _CONVERTER_REGISTRY[key] = converter
            REPLACED_KEYS.append(Replacement(op_type, version, reason))
        return converter

    return deco


def missing(model) -> List[str]:
    """``op-version`` of every node in ``model`` (an ``onnx.ModelProto``) that no registered converter
    covers, looked up as onnx2torch's ``get_converter`` does (the schema version in force at the
    model's opset); sorted, each once."""
    opsets = {o.domain: o.version for o in model.opset_import}
    out = set()
    for node in model.graph.node:
        domain = '' if node.domain == 'ai.onnx' else node.domain
        version = opsets.get(node.domain, opsets.get(domain, 1))
        try:
            version = defs.get_schema(node.op_type, domain=domain, max_inclusive_version=version).since_version
        except (RuntimeError, defs.SchemaError):
            pass
        key = OperationDescription(domain=domain, operation_type=node.op_type, version=version)
        if key not in _CONVERTER_REGISTRY:
            out.add(f'{node.op_type}-{version}' if not domain else f'{domain}.{node.op_type}-{version}')
    return sorted(out)


def alias(op_type: str, versions: Sequence[int], existing_version: int) -> None:
    """Register ``versions`` with onnx2torch's own converter for ``existing_version``.

    Only for version bumps that add tensor types (bfloat16, float8, int4, ...) and keep the semantics.
    """
    register(op_type, *versions)(_CONVERTER_REGISTRY[_key(op_type, existing_version)])


def input_name(node: OnnxNode, index: int) -> str:
    """Name of the ``index``-th input, '' when the optional input is absent."""
    values = node.input_values
    return values[index] if index < len(values) else ''


def const_list(node: OnnxNode, index: int, graph: OnnxGraph) -> Optional[list]:
    """Value of input ``index`` as a Python list when it is an initializer/Constant, else None.

    Converters use this to bake axes/pads/shapes into the module (traceable, no ``.tolist()`` at run
    time); a computed input stays a runtime argument.
    """
    name = input_name(node, index)
    if not name:
        return None
    try:
        value = get_const_value(name, graph)
    except KeyError:
        return None
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def mapping(node: OnnxNode, inputs: Sequence[str]) -> OnnxMapping:
    """Mapping with ``inputs`` in forward()-argument order; '' skips one (converter passes it by name)."""
    inputs = list(inputs)
    while inputs and not inputs[-1]:
        inputs.pop()
    return OnnxMapping(inputs=tuple(inputs), outputs=node.output_values)
