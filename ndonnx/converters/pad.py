"""Pad-18 (optional ``axes`` input), Pad-19 (``wrap`` mode), Pad-21/23 (more types).

onnx2torch's Pad maps reflect/edge onto ``F.pad``, which only pads the last 1-3 dims of a batched
tensor. Here non-constant modes gather along each padded axis with computed indices, which works for
any axis set, any rank and negative pads (= cropping); constant mode uses ``F.pad`` (any rank).
The same converter replaces onnx2torch's Pad-11/13 (inputs data, pads, constant_value), which fails
on reflect/edge padding of the batch/channel dims and on negative pads in those modes.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult

from ._registry import const_list, input_name, mapping, register, replace

_MODES = ('constant', 'reflect', 'edge', 'wrap')


def _source_index(mode: str, begin: int, end: int, size: int, device: torch.device) -> torch.Tensor:
    """Input positions feeding each output position of one axis.

    Negative pads crop first and the rest pads the cropped range (as ORT does; it matters for wrap,
    whose period is the cropped length).
    """
    start = max(0, -begin)
    size = size - start - max(0, -end)
    begin, end = max(0, begin), max(0, end)
    index = torch.arange(-begin, size + end, device=device)
    if mode == 'edge' or (mode == 'reflect' and size == 1):
        index = index.clamp(0, size - 1)
    elif mode == 'wrap':
        index = torch.remainder(index, size)
    else:  # reflect without repeating the border: period 2*(size-1), folded back into [0, size-1]
        period = 2 * (size - 1)
        index = torch.remainder(index, period)
        index = torch.where(index >= size, period - index, index)
    return index + start


class Pad(nn.Module, OnnxToTorchModule):
    """ONNX Pad-18+: pads/axes baked in when constant, else read at run time."""

    def __init__(self, mode: str = 'constant', pads: Optional[List[int]] = None, axes: Optional[List[int]] = None):
        super().__init__()
        if mode not in _MODES:
            raise NotImplementedError(f'Pad mode "{mode}" is not implemented')
        self.mode = mode
        self.pads = pads
        self.axes = axes

    def forward(
        self,
        input_tensor: torch.Tensor,
        pads: Optional[torch.Tensor] = None,
        constant_value: Optional[torch.Tensor] = None,
        axes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        pad_list = self.pads if pads is None else pads.tolist()
        axis_list = self.axes if axes is None else axes.tolist()
        rank = input_tensor.dim()
        if axis_list is None:
            axis_list = list(range(rank))
        axis_list = [axis + rank if axis < 0 else axis for axis in axis_list]
        count = len(axis_list)
        begins, ends = pad_list[:count], pad_list[count:]

        if self.mode == 'constant':
            per_axis = [[0, 0] for _ in range(rank)]
            for axis, begin, end in zip(axis_list, begins, ends):
                per_axis[axis] = [begin, end]
            torch_pads: List[int] = []
            for begin, end in reversed(per_axis):  # F.pad lists the last dim first
                torch_pads.extend((begin, end))
            value = 0
            if constant_value is not None and constant_value.numel() > 0:
                value = constant_value.reshape(-1)[0].item()
            return F.pad(input_tensor, torch_pads, mode='constant', value=value)

        result = input_tensor
        for axis, begin, end in zip(axis_list, begins, ends):
            if begin == 0 and end == 0:
                continue
            index = _source_index(self.mode, begin, end, result.shape[axis], result.device)
            result = torch.index_select(result, axis, index)
        return result


@replace('Pad', 11, 13, reason='onnx2torch pads only the last dims in reflect/edge mode')
@register('Pad', 18, 19, 21, 23)
def _pad(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    pads = const_list(node, 1, graph)
    axes_name = input_name(node, 3)
    axes = const_list(node, 3, graph)
    module = Pad(mode=node.attributes.get('mode', 'constant'), pads=pads, axes=axes)
    inputs = [
        node.input_values[0],
        '' if pads is not None else node.input_values[1],
        input_name(node, 2),
        '' if axes is not None else axes_name,
    ]
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping(node, inputs))
