"""GroupNormalization-18/21 and RMSNormalization-23 (onnx2torch has neither); InstanceNormalization-22.

GroupNormalization changed meaning at 21: scale/bias were per group (18), now per channel, and the
statistics are computed in ``stash_type`` (float32 by default). torch's group_norm wants per-channel
weights, so 18's per-group ones are repeated over each group's channels. InstanceNormalization-22
only adds bfloat16, so onnx2torch's converter is reused.
"""

from typing import List

import torch
import torch.nn.functional as F
from onnx import TensorProto
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node

from ._registry import alias, register


def _stash_dtype(stash_type: int, x: torch.Tensor) -> torch.dtype:
    if stash_type == TensorProto.FLOAT:
        return torch.float32 if x.dtype != torch.float64 else torch.float64
    if stash_type == TensorProto.DOUBLE:
        return torch.float64
    return x.dtype


class GroupNorm(nn.Module, OnnxToTorchModule):
    """ONNX GroupNormalization; ``per_group_affine`` selects the opset-18 scale/bias layout."""

    def __init__(self, num_groups: int, epsilon: float, per_group_affine: bool, stash_type: int = TensorProto.FLOAT):
        super().__init__()
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.per_group_affine = per_group_affine
        self.stash_type = stash_type

    def forward(self, input_tensor: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        channels = input_tensor.shape[1]
        if self.per_group_affine:
            scale = scale.repeat_interleave(channels // self.num_groups)
            bias = bias.repeat_interleave(channels // self.num_groups)
        stash = _stash_dtype(self.stash_type, input_tensor)
        normalized = F.group_norm(input_tensor.to(stash), self.num_groups, eps=self.epsilon).to(input_tensor.dtype)
        shape = [1, channels] + [1] * (input_tensor.dim() - 2)
        return normalized * scale.reshape(shape) + bias.reshape(shape)


@register('GroupNormalization', 18)
def _group_norm_18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    attrs = node.attributes
    module = GroupNorm(attrs['num_groups'], attrs.get('epsilon', 1e-5), per_group_affine=True)
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


@register('GroupNormalization', 21)
def _group_norm_21(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    attrs = node.attributes
    module = GroupNorm(
        attrs['num_groups'],
        attrs.get('epsilon', 1e-5),
        per_group_affine=False,
        stash_type=attrs.get('stash_type', TensorProto.FLOAT),
    )
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


class RMSNorm(nn.Module, OnnxToTorchModule):
    """ONNX RMSNormalization: x / sqrt(mean(x^2 over dims axis..) + eps) * scale, stats in stash_type."""

    def __init__(self, axis: int = -1, epsilon: float = 1e-5, stash_type: int = TensorProto.FLOAT):
        super().__init__()
        self.axis = axis
        self.epsilon = epsilon
        self.stash_type = stash_type

    def forward(self, input_tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rank = input_tensor.dim()
        axis = self.axis + rank if self.axis < 0 else self.axis
        dims: List[int] = list(range(axis, rank))
        x = input_tensor.to(_stash_dtype(self.stash_type, input_tensor))
        rms = torch.sqrt(torch.mean(x * x, dim=dims, keepdim=True) + self.epsilon)
        return (x / rms).to(input_tensor.dtype) * scale


@register('RMSNormalization', 23)
def _rms_norm(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    attrs = node.attributes
    module = RMSNorm(
        axis=attrs.get('axis', -1),
        epsilon=attrs.get('epsilon', 1e-5),
        stash_type=attrs.get('stash_type', TensorProto.FLOAT),
    )
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


alias('InstanceNormalization', (22,), 6)
