"""Split-18: adds the ``num_outputs`` attribute (uneven split, last chunk smaller).

Also returns a plain tensor for a single-output Split (onnx2torch passes a one-element tuple on).
"""

from typing import List, Optional

import torch
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult

from ._registry import const_list, input_name, mapping, register


class Split(nn.Module, OnnxToTorchModule):
    """ONNX Split-18: explicit ``split`` sizes, else ``num_outputs`` ceil-sized chunks, else equal parts."""

    def __init__(self, axis: int, outputs: int, num_outputs: Optional[int] = None, split: Optional[List[int]] = None):
        super().__init__()
        self.axis = axis
        self.outputs = outputs
        self.num_outputs = num_outputs
        self.split = split

    def forward(self, input_tensor: torch.Tensor, split: Optional[torch.Tensor] = None):
        sizes = self.split if split is None else split.tolist()
        if sizes is None:
            length = input_tensor.shape[self.axis]
            if self.num_outputs is not None:
                chunk = -(-length // self.num_outputs)  # ceil
            else:
                chunk = length // self.outputs
            sizes = [min(chunk, max(0, length - i * chunk)) for i in range(self.outputs)]
        parts = torch.split(input_tensor, sizes, dim=self.axis)
        return parts if self.outputs > 1 else parts[0]


@register('Split', 18)
def _split(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    split = const_list(node, 1, graph)
    module = Split(
        axis=node.attributes.get('axis', 0),
        outputs=len(node.output_values),
        num_outputs=node.attributes.get('num_outputs', None),
        split=split,
    )
    inputs = [node.input_values[0], '' if split is not None else input_name(node, 1)]
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping(node, inputs))
