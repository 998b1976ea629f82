"""Equal-19, GreaterOrEqual-16, LessOrEqual-16, IsNaN-20, IsInf-20.

The comparison bumps only add types (bfloat16; strings for Equal, which torch has no tensor for), so
onnx2torch's comparison converter is reused. IsInf gets its own module: onnx2torch's ignores the
``detect_negative``/``detect_positive`` attributes.
"""

import torch
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node

from ._registry import alias, register

alias('Equal', (19,), 13)
alias('GreaterOrEqual', (16,), 12)
alias('LessOrEqual', (16,), 12)
alias('IsNaN', (20,), 13)


class IsInf(nn.Module, OnnxToTorchModule):
    """ONNX IsInf with optional detection of only +inf or only -inf."""

    def __init__(self, detect_negative: int = 1, detect_positive: int = 1):
        super().__init__()
        self.detect_negative = bool(detect_negative)
        self.detect_positive = bool(detect_positive)

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        if self.detect_negative and self.detect_positive:
            return torch.isinf(input_tensor)
        if self.detect_negative:
            return torch.isneginf(input_tensor)
        if self.detect_positive:
            return torch.isposinf(input_tensor)
        return torch.zeros_like(input_tensor, dtype=torch.bool)


@register('IsInf', 20)
def _is_inf(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    module = IsInf(
        detect_negative=node.attributes.get('detect_negative', 1),
        detect_positive=node.attributes.get('detect_positive', 1),
    )
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))
