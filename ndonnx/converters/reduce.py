"""Reduce*-18 (axes moved from attribute to optional input) and ReduceMax/ReduceMin-20 (bool).

One module serves all of them. It follows onnxruntime, including the corners onnx2torch's
attribute-based reducers get wrong or do not have:
- no/empty axes: reduce everything, or with ``noop_with_empty_axes`` apply the op over empty sets,
  i.e. the element-wise part only (ReduceL1 -> |x|, ReduceSumSquare -> x*x, ReduceLogSum -> log x);
- negative axes mixed with keepdims=0 for Max/Min/Prod;
- integer inputs keep their dtype (torch.sum/prod would promote to int64); ReduceMean truncates and
  ReduceL2/LogSum/LogSumExp are computed in floating point, then truncated, as ORT does.

The same converter replaces onnx2torch's for the earlier versions (axes as attribute before 18, as
input for ReduceSum-13): there ReduceMax/Min/Prod give the wrong shape for negative axes with
keepdims=0, ReduceSum-13 raises for empty axes with keepdims=0, and integer inputs either raise or
come back in another dtype (see ``_WHY``).
"""

from typing import List, Optional

import torch
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult

from ._registry import const_list, input_name, mapping, register, replace

REDUCE_OPS = (
    'ReduceL1',
    'ReduceL2',
    'ReduceLogSum',
    'ReduceLogSumExp',
    'ReduceMax',
    'ReduceMean',
    'ReduceMin',
    'ReduceProd',
    'ReduceSumSquare',
)
# versions of onnx2torch's converters (axes attribute; ReduceSum-13 takes axes as input)
_OLD_VERSIONS = {op_type: (1, 11, 13) for op_type in REDUCE_OPS}
_OLD_VERSIONS.update(ReduceMax=(1, 11, 12, 13), ReduceMin=(1, 11, 12, 13), ReduceSum=(1, 11, 13))


def _reduce(op_type: str, x: torch.Tensor, dims: List[int], keepdim: bool) -> torch.Tensor:
    """Reduce ``x`` over ``dims`` (non-negative, may be empty = element-wise part only)."""
    if op_type == 'ReduceMax':
        return torch.amax(x, dim=dims, keepdim=keepdim) if dims else x.clone()
    if op_type == 'ReduceMin':
        return torch.amin(x, dim=dims, keepdim=keepdim) if dims else x.clone()
    if op_type == 'ReduceProd':
        result = x.clone()
        for dim in dims:  # torch.prod reduces one dim at a time
            result = torch.prod(result, dim=dim, keepdim=True, dtype=x.dtype)
        return result.squeeze(dims) if dims and not keepdim else result

    def _sum(values: torch.Tensor) -> torch.Tensor:
        # an empty dim list means "all dims" to torch.sum, so skip the call instead
        return torch.sum(values, dim=dims, keepdim=keepdim, dtype=values.dtype) if dims else values

    if op_type == 'ReduceMean':
        if not dims:
            return x.clone()
        if x.is_floating_point() or x.is_complex():
            return torch.mean(x, dim=dims, keepdim=keepdim)
        count = 1
        for dim in dims:
            count *= x.shape[dim]
        return torch.div(torch.sum(x, dim=dims, keepdim=keepdim), count, rounding_mode='trunc').to(x.dtype)

    floating = x.is_floating_point() or x.is_complex()
    if op_type == 'ReduceSum':
        return _sum(x)
    if op_type == 'ReduceL1':
        return _sum(torch.abs(x))
    if op_type == 'ReduceSumSquare':
        return _sum(x * x)

    # the rest need a floating point intermediate
    values = x if floating else x.to(torch.float64)
    if op_type == 'ReduceL2':
        result = torch.sqrt(_sum(values * values))
    elif op_type == 'ReduceLogSum':
        result = torch.log(_sum(values))
    elif op_type == 'ReduceLogSumExp':
        if not dims:  # log(exp(x)) == x, without overflowing exp() for large x
            result = values.clone()
        elif floating:
            result = torch.logsumexp(values, dim=dims, keepdim=keepdim)
        else:  # ORT accumulates exp(x - max) in the integer type (each term truncated)
            peak = torch.amax(values, dim=dims, keepdim=True)
            total = torch.sum(torch.trunc(torch.exp(values - peak)), dim=dims, keepdim=keepdim)
            result = torch.log(total) + (peak if keepdim else peak.squeeze(dims))
    else:
        raise NotImplementedError(f'{op_type} is not implemented')
    return result if floating else result.to(x.dtype)


class Reduce(nn.Module, OnnxToTorchModule):
    """ONNX Reduce* of opset 18+: axes either baked in (constant input) or given at run time."""

    def __init__(
        self,
        op_type: str,
        axes: Optional[List[int]] = None,
        keepdims: int = 1,
        noop_with_empty_axes: int = 0,
    ):
        super().__init__()
        self.op_type = op_type
        self.axes = axes
        self.keepdim = bool(keepdims)
        self.noop_with_empty_axes = bool(noop_with_empty_axes)

    def forward(self, input_tensor: torch.Tensor, axes: Optional[torch.Tensor] = None) -> torch.Tensor:
        rank = input_tensor.dim()
        dims = self.axes if axes is None else axes.tolist()
        if not dims:
            dims = [] if self.noop_with_empty_axes else list(range(rank))
        dims = sorted({dim + rank if dim < 0 else dim for dim in dims})
        return _reduce(self.op_type, input_tensor, dims, self.keepdim)


def _convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    if 'axes' in node.attributes or len(node.input_values) < 2:  # attribute (before 18) or absent
        axes_name, axes = '', node.attributes.get('axes')
        axes = list(axes) if axes is not None else None
    else:
        axes_name, axes = input_name(node, 1), const_list(node, 1, graph)
    module = Reduce(
        op_type=node.operation_type,
        axes=axes,
        keepdims=node.attributes.get('keepdims', 1),
        noop_with_empty_axes=node.attributes.get('noop_with_empty_axes', 0),
    )
    inputs = [node.input_values[0], '' if axes is not None else axes_name]
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping(node, inputs))


for _op_type in REDUCE_OPS:
    register(_op_type, 18)(_convert)
register('ReduceMax', 20)(_convert)
register('ReduceMin', 20)(_convert)
_NEG_AXES = 'wrong shape for negative axes with keepdims=0'
_WHY = {  # what onnx2torch's converters for these keys get wrong
    'ReduceL1': 'onnx2torch raises on integer inputs (torch.norm)',
    'ReduceL2': 'onnx2torch raises on integer inputs (torch.norm)',
    'ReduceMean': 'onnx2torch raises on integer inputs (torch.mean)',
    'ReduceLogSum': 'onnx2torch returns float32 for integer inputs',
    'ReduceLogSumExp': 'onnx2torch returns float32 for integer inputs',
    'ReduceSumSquare': 'onnx2torch promotes integer inputs to int64',
    'ReduceMax': f'onnx2torch: {_NEG_AXES}',
    'ReduceMin': f'onnx2torch: {_NEG_AXES}',
    'ReduceProd': f'onnx2torch: {_NEG_AXES}; promotes integer inputs to int64',
    'ReduceSum': 'onnx2torch raises on empty axes with keepdims=0 (13); promotes integer inputs to int64',
}
for _op_type, _versions in _OLD_VERSIONS.items():
    replace(_op_type, *_versions, reason=_WHY[_op_type])(_convert)
