"""Cast-19/21/23 and CastLike (all versions: onnx2torch has none).

The bumps add float8/int4/float4 types and Cast's ``saturate`` (which only affects float8). We map
every type torch represents exactly and refuse the rest, so a model never silently computes in the
wrong type. onnx2torch's own table also lacks bfloat16 and the unsigned 16/32/64-bit types.
"""

import torch
from onnx import TensorProto
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node

from ._registry import register

ONNX_TO_TORCH_DTYPE = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
    TensorProto.COMPLEX64: torch.complex64,
    TensorProto.COMPLEX128: torch.complex128,
}
# torch >= 2.3 has (limited) uint16/32/64 tensors; enough for Cast
for _onnx_type, _name in ((TensorProto.UINT16, 'uint16'), (TensorProto.UINT32, 'uint32'), (TensorProto.UINT64, 'uint64')):
    if hasattr(torch, _name):
        ONNX_TO_TORCH_DTYPE[_onnx_type] = getattr(torch, _name)


class Cast(nn.Module, OnnxToTorchModule):
    """ONNX Cast: ``Tensor.to`` truncates float->int toward zero and rounds to nearest-even, as ORT."""

    def __init__(self, onnx_dtype: int):
        super().__init__()
        try:
            self.dtype = ONNX_TO_TORCH_DTYPE[onnx_dtype]
        except KeyError as exc:
            name = TensorProto.DataType.Name(onnx_dtype) if onnx_dtype in TensorProto.DataType.values() else onnx_dtype
            raise NotImplementedError(f'Cast to {name} is not implemented') from exc

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        return input_tensor.to(self.dtype)


@register('Cast', 19, 21, 23)
def _cast(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    return OperationConverterResult(
        torch_module=Cast(node.attributes['to']),
        onnx_mapping=onnx_mapping_from_node(node),
    )


class CastLike(nn.Module, OnnxToTorchModule):
    """ONNX CastLike: cast the first input to the dtype of the second."""

    def forward(self, input_tensor: torch.Tensor, target_type: torch.Tensor) -> torch.Tensor:
        return input_tensor.to(target_type.dtype)


@register('CastLike', 15, 19, 21, 23)
def _cast_like(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    return OperationConverterResult(torch_module=CastLike(), onnx_mapping=onnx_mapping_from_node(node))
