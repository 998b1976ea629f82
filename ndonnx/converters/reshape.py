"""Reshape-19/21/23, Flatten-21/23, Squeeze-23, Unsqueeze-21/23, Transpose-21/23.

Semantics are those of the previous versions (the bumps add tensor types), except that Reshape's
``allowzero`` is now implemented. Flatten, Squeeze and Unsqueeze get their own modules because
onnx2torch's are wrong for some valid attribute values: Flatten ``axis=0`` (rank-1 result instead of
``[1, N]``), Unsqueeze with negative axes mixed with others (they are relative to the *output* rank),
Squeeze with mixed-sign axes.

The same converters replace onnx2torch's for the earlier versions (see ``replace`` below): Reshape-14
refuses ``allowzero=1``, which torch's dynamo exporter writes at opset 18, and the Flatten, Squeeze and
Unsqueeze bugs above are onnx2torch's converters' bugs at every version. Squeeze/Unsqueeze before 13
take ``axes`` as an attribute; the converters read it when present.
"""

import math
from typing import List, Optional

import torch
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult

from ._registry import alias, const_list, input_name, mapping, register, replace


class Reshape(nn.Module, OnnxToTorchModule):
    """ONNX Reshape; a ``0`` copies the input dim unless ``allowzero`` (then it is a real 0)."""

    def __init__(self, allowzero: int = 0, shape: Optional[List[int]] = None):
        super().__init__()
        self.allowzero = bool(allowzero)
        self.shape = shape

    def forward(self, input_tensor: torch.Tensor, shape: Optional[torch.Tensor] = None) -> torch.Tensor:
        target = self.shape if shape is None else shape.tolist()
        if not self.allowzero:
            target = [input_tensor.shape[i] if dim == 0 else dim for i, dim in enumerate(target)]
        return torch.reshape(input_tensor, target)


@replace('Reshape', 5, 13, 14, reason='onnx2torch refuses allowzero=1 (torch dynamo exports write it)')
@register('Reshape', 19, 21, 23)
def _reshape(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    shape = const_list(node, 1, graph)
    module = Reshape(allowzero=node.attributes.get('allowzero', 0), shape=shape)
    inputs = [node.input_values[0], '' if shape is not None else node.input_values[1]]
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping(node, inputs))


class Flatten(nn.Module, OnnxToTorchModule):
    """ONNX Flatten: always 2-D ``[prod(d[:axis]), prod(d[axis:])]`` (axis may be 0 or negative)."""

    def __init__(self, axis: int = 1):
        super().__init__()
        self.axis = axis

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        axis = self.axis + input_tensor.dim() if self.axis < 0 else self.axis
        shape = input_tensor.shape
        # explicit sizes instead of -1: -1 is ambiguous for zero-sized tensors
        return input_tensor.reshape(math.prod(shape[:axis]), math.prod(shape[axis:]))


@replace('Flatten', 9, 11, 13, reason='onnx2torch gives a rank-1 result for axis=0')
@register('Flatten', 21, 23)
def _flatten(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    module = Flatten(axis=node.attributes.get('axis', 1))
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping(node, node.input_values[:1]))


class Squeeze(nn.Module, OnnxToTorchModule):
    """ONNX Squeeze-13+: axes as optional input; none/empty squeezes every size-1 dim."""

    def __init__(self, axes: Optional[List[int]] = None):
        super().__init__()
        self.axes = axes

    def forward(self, input_tensor: torch.Tensor, axes: Optional[torch.Tensor] = None) -> torch.Tensor:
        dims = self.axes if axes is None else axes.tolist()
        if not dims:
            return torch.squeeze(input_tensor)
        rank = input_tensor.dim()
        return torch.squeeze(input_tensor, dim=tuple(d + rank if d < 0 else d for d in dims))


@replace('Squeeze', 1, 11, 13, 21, reason='onnx2torch errs on mixed-sign axes')
@register('Squeeze', 23)
def _squeeze(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    if 'axes' in node.attributes:  # Squeeze-1/11
        axes, axes_name = list(node.attributes['axes']), ''
    else:
        axes, axes_name = const_list(node, 1, graph), input_name(node, 1)
    module = Squeeze(axes=axes)
    inputs = [node.input_values[0], '' if axes is not None else axes_name]
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping(node, inputs))


class Unsqueeze(nn.Module, OnnxToTorchModule):
    """ONNX Unsqueeze-13+: axes (input) index the output, so normalise by the output rank first."""

    def __init__(self, axes: Optional[List[int]] = None):
        super().__init__()
        self.axes = axes

    def forward(self, input_tensor: torch.Tensor, axes: Optional[torch.Tensor] = None) -> torch.Tensor:
        dims = self.axes if axes is None else axes.tolist()
        out_rank = input_tensor.dim() + len(dims)
        result = input_tensor
        # inserting in ascending order of the normalised position gives each axis its final place
        for dim in sorted(d + out_rank if d < 0 else d for d in dims):
            result = torch.unsqueeze(result, dim)
        return result


@replace('Unsqueeze', 1, 11, 13, reason='onnx2torch misplaces negative axes mixed with others')
@register('Unsqueeze', 21, 23)
def _unsqueeze(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    if 'axes' in node.attributes:  # Unsqueeze-1/11
        module = Unsqueeze(axes=list(node.attributes['axes']))
        return OperationConverterResult(torch_module=module, onnx_mapping=mapping(node, node.input_values[:1]))
    axes = const_list(node, 1, graph)
    module = Unsqueeze(axes=axes)
    inputs = [node.input_values[0], '' if axes is not None else node.input_values[1]]
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping(node, inputs))


# Transpose-21/23 only add types; onnx2torch's perm-attribute converter is exact.
alias('Transpose', (21, 23), 13)
