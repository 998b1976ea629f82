"""Trilu-14 (torch.triu/tril export to it; onnx2torch has none), Dropout-22 and EyeLike-22 (types only),
NonZero-9/13 (onnx2torch returns torch.nonzero's [count, rank], transposed from ONNX's [rank, count])."""

from typing import Optional

import torch
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult

from ._registry import alias, const_list, input_name, mapping, register, replace


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


class NonZero(nn.Module, OnnxToTorchModule):
    """ONNX NonZero: the indices of the non-zero elements as [rank, count], row-major order."""

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(input_tensor).transpose(0, 1)


# tf2onnx writes NonZero -> Transpose for tf.where (the TFJS sentence encoder's sparse batches)
@replace('NonZero', 13, reason="onnx2torch returns [count, rank]; ONNX's NonZero gives [rank, count]")
@register('NonZero', 9)
def _nonzero(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    return OperationConverterResult(torch_module=NonZero(), onnx_mapping=mapping(node, node.input_values[:1]))
