"""Shape-19/21/23, Size (all versions: onnx2torch has none), Identity-19/21/23.

Shape gets its own module because onnx2torch's builds the result with ``torch.tensor(list)``, which
is float32 (not int64) when the slice is empty (rank-0 input, or start >= end); the same module
replaces onnx2torch's Shape-1/13/15 for that reason.
"""

from typing import Optional

import torch
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node

from ._registry import alias, register, replace


class Shape(nn.Module, OnnxToTorchModule):
    """ONNX Shape with ``start``/``end``; Python slicing clamps exactly like the spec."""

    def __init__(self, start: int = 0, end: Optional[int] = None):
        super().__init__()
        self.start = start
        self.end = end

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        dims = list(input_tensor.shape)[self.start : self.end]
        return torch.tensor(dims, dtype=torch.int64, device=input_tensor.device)


@replace('Shape', 1, 13, 15, reason='onnx2torch returns float32 for an empty slice (rank-0 input, start >= end)')
@register('Shape', 19, 21, 23)
def _shape(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    module = Shape(start=node.attributes.get('start', 0), end=node.attributes.get('end', None))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


class Size(nn.Module, OnnxToTorchModule):
    """ONNX Size: number of elements as an int64 scalar."""

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        return torch.tensor(input_tensor.numel(), dtype=torch.int64, device=input_tensor.device)


@register('Size', 1, 13, 19, 21, 23)
def _size(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    return OperationConverterResult(torch_module=Size(), onnx_mapping=onnx_mapping_from_node(node))


# Identity-19/21/23 only add types; onnx2torch's copying Identity is exact.
alias('Identity', (19, 21, 23), 16)
