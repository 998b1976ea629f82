"""ScatterND-18 (``max``/``min`` reductions) and ScatterElements (all versions: onnx2torch has none).

onnx2torch's ScatterND refuses every reduction; this one handles none/add/mul/max/min. Indices may
be negative (counted from the end), as onnxruntime accepts. It replaces onnx2torch's ScatterND-16
(16 added add/mul, which onnx2torch refuses; its 11/13, without reductions, are kept).
"""

import torch
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node

from ._registry import register, replace

# ONNX reduction -> torch index_reduce_/scatter_reduce name (None = plain assignment)
_REDUCTIONS = {'none': None, 'add': 'sum', 'mul': 'prod', 'max': 'amax', 'min': 'amin'}


def _reduction(node: OnnxNode) -> str:
    reduction = node.attributes.get('reduction', 'none')
    if reduction not in _REDUCTIONS:
        raise NotImplementedError(f'{node.operation_type} reduction "{reduction}" is not implemented')
    return reduction


class ScatterND(nn.Module, OnnxToTorchModule):
    """ONNX ScatterND: rows of ``data`` (first k dims, k = indices.shape[-1]) get ``updates``."""

    def __init__(self, reduction: str = 'none'):
        super().__init__()
        self.reduction = _REDUCTIONS[reduction]

    def forward(self, data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        depth = indices.shape[-1]
        lead_shape = data.shape[:depth]
        tail_shape = data.shape[depth:]
        index = indices.reshape(-1, depth).to(torch.int64)
        sizes = torch.tensor(lead_shape, dtype=torch.int64, device=data.device)
        index = torch.where(index < 0, index + sizes, index)
        # row-major linear index into the flattened leading dims
        strides = [1] * depth
        for i in range(depth - 2, -1, -1):
            strides[i] = strides[i + 1] * lead_shape[i + 1]
        linear = (index * torch.tensor(strides, dtype=torch.int64, device=data.device)).sum(-1)

        flat = data.reshape(-1, *tail_shape).clone()
        rows = updates.reshape(-1, *tail_shape)
        if self.reduction is None:
            flat[linear] = rows
            return flat.reshape(data.shape)
        index = linear.reshape(-1, *([1] * len(tail_shape))).expand_as(rows)
        return flat.scatter_reduce_(0, index, rows, self.reduction, include_self=True).reshape(data.shape)


@replace('ScatterND', 16, reason='onnx2torch refuses reduction add/mul')
@register('ScatterND', 18)
def _scatter_nd(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    return OperationConverterResult(
        torch_module=ScatterND(_reduction(node)),
        onnx_mapping=onnx_mapping_from_node(node),
    )


class ScatterElements(nn.Module, OnnxToTorchModule):
    """ONNX ScatterElements (torch.scatter / scatter_reduce along ``axis``)."""

    def __init__(self, axis: int = 0, reduction: str = 'none'):
        super().__init__()
        self.axis = axis
        self.reduction = _REDUCTIONS[reduction]

    def forward(self, data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        axis = self.axis + data.dim() if self.axis < 0 else self.axis
        index = indices.to(torch.int64)
        index = torch.where(index < 0, index + data.shape[axis], index)
        if self.reduction is None:
            return torch.scatter(data, axis, index, updates)
        return torch.scatter_reduce(data, axis, index, updates, self.reduction, include_self=True)


@register('ScatterElements', 11, 13, 16, 18)
def _scatter_elements(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    return OperationConverterResult(
        torch_module=ScatterElements(axis=node.attributes.get('axis', 0), reduction=_reduction(node)),
        onnx_mapping=onnx_mapping_from_node(node),
    )
