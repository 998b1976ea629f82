"""Trilu-14 (torch.triu/tril export to it; onnx2torch has none), Dropout-22 and EyeLike-22 (types only)."""

from typing import Optional

import torch
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult

from ._registry import alias, const_list, input_name, mapping, register


class Trilu(nn.Module, OnnxToTorchModule):
    """ONNX Trilu: keep the upper (triu) or lower (tril) triangle of the last two dims from diagonal k."""

    def __init__(self, upper: int = 1, k: Optional[int] = None):
        super().__init__()
        self.upper = bool(upper)
        self.k = k

    def forward(self, input_tensor: torch.Tensor, k: Optional[torch.Tensor] = None) -> torch.Tensor:
        diagonal = (self.k or 0) if k is None else int(k.item())
        if self.upper:
            return torch.triu(input_tensor, diagonal=diagonal)
        return torch.tril(input_tensor, diagonal=diagonal)


@register('Trilu', 14)
def _trilu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    k = const_list(node, 1, graph)
    module = Trilu(upper=node.attributes.get('upper', 1), k=k[0] if k else None)
    inputs = [node.input_values[0], '' if k is not None else input_name(node, 1)]
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping(node, inputs))


alias('Dropout', (22,), 13)
alias('EyeLike', (22,), 9)
