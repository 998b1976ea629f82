"""Conv and ConvTranspose (1, 11, 22) with all of ONNX's padding rules, as onnxruntime applies them.

onnx2torch's converter (Conv/ConvTranspose-1/11, and -22 which only adds bfloat16) raises "not
implemented" for ``auto_pad`` SAME_UPPER/SAME_LOWER (paddle2onnx writes SAME_UPPER, e.g. PP-OCRv5/v6),
refuses asymmetric ConvTranspose pads, ignores ConvTranspose's ``output_shape``, and wraps asymmetric
Conv pads in an ``nn.Sequential`` (which ``ndonnx.trainable`` cannot bind the weight of). Here the
modules subclass ``nn.ConvNd`` / ``nn.ConvTransposeNd`` (weight and bias stay their parameters, so
binding is unchanged) and compute the padding from the input shape where auto_pad needs it:

- Conv SAME_*: output ``ceil(in / stride)``; total padding ``(out - 1) * stride + window - in``, the
  larger half at the end (UPPER) or the start (LOWER), halves rounded toward zero like ORT's C++. A
  stride larger than the window makes the total negative: the pads then crop, and onnxruntime (1.32,
  measured) starts the windows as if the total were one larger (e.g. total -3: UPPER crops 1 element
  at the start, LOWER none). ORT refuses SAME with dilation > 1; the window here is the dilated kernel
  (the spec's rule, the same for dilation 1).
- ConvTranspose: the full output is ``(in - 1) * stride + window + output_padding``. With
  ``output_shape`` the output has that size, cut from the full one with total padding
  ``max(0, full - out)`` (more at the start, except SAME_UPPER: more at the end) and zeros beyond
  it; SAME_* without it gives ``min(full, in * stride)`` the same way; VALID gives the full output;
  NOTSET crops by ``pads``. That is onnxruntime's rule (checked against it), and the spec's.

Symmetric pads go to torch's own ``padding`` argument; only the asymmetric rest is an explicit pad.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult, get_const_value

from ._registry import input_name, mapping, register, replace

_AUTO_PADS = ('NOTSET', 'VALID', 'SAME_UPPER', 'SAME_LOWER')


def _trunc_half(value: int) -> int:
    """C++ ``value / 2`` (rounds toward zero)."""
    return -((-value) // 2) if value < 0 else value // 2


def _torch_pad(begins: Sequence[int], ends: Sequence[int]) -> List[int]:
    """F.pad's order: last spatial dim first, (begin, end) each."""
    pads: List[int] = []
    for begin, end in zip(reversed(begins), reversed(ends)):
        pads.extend((begin, end))
    return pads


class _OnnxPadding:
    """Conv geometry shared by both module kinds; mixed into the nn.ConvNd subclasses below."""

    onnx_auto_pad: str
    onnx_pads: List[int]

    def _windows(self) -> List[int]:
        return [(k - 1) * d + 1 for k, d in zip(self.kernel_size, self.dilation)]


class _Conv(_OnnxPadding):
    def _conv_pads(self, spatial: Tuple[int, ...]) -> Tuple[List[int], List[int]]:
        """ORT's pad (begin, end) per spatial dim for this input size."""
        rank = len(spatial)
        if self.onnx_auto_pad == 'VALID':
            return [0] * rank, [0] * rank
        if self.onnx_auto_pad == 'NOTSET':
            return self.onnx_pads[:rank], self.onnx_pads[rank:]
        begins, ends = [], []
        for size, stride, window in zip(spatial, self.stride, self._windows()):
            needed = (-(-size // stride) - 1) * stride + window - size
            # ORT's pads are trunc(needed / 2) (UPPER) and trunc((needed + 1) / 2) (LOWER), but where the
            # total is negative (possible once stride > window) its kernel starts the windows half a step later
            begin = _trunc_half(needed + (self.onnx_auto_pad == 'SAME_LOWER') + (needed < 0))
            begins.append(begin)
            ends.append(needed - begin)
        return begins, ends

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-renamed
        begins, ends = self._conv_pads(tuple(input_tensor.shape[2:]))
        symmetric = [max(0, min(b, e)) for b, e in zip(begins, ends)]
        rest = _torch_pad([b - s for b, s in zip(begins, symmetric)], [e - s for e, s in zip(ends, symmetric)])
        if any(rest):
            input_tensor = F.pad(input_tensor, rest)  # zeros; negative values crop
        return self._conv(input_tensor, self.weight, self.bias, self.stride, symmetric, self.dilation, self.groups)


class Conv1d(_Conv, nn.Conv1d):
    _conv = staticmethod(F.conv1d)


class Conv2d(_Conv, nn.Conv2d):
    _conv = staticmethod(F.conv2d)


class Conv3d(_Conv, nn.Conv3d):
    _conv = staticmethod(F.conv3d)


class _ConvTranspose(_OnnxPadding):
    onnx_output_shape: Optional[List[int]]
    onnx_output_padding: List[int]

    def _crop(self, spatial: Tuple[int, ...]) -> Tuple[List[int], List[int]]:
        """Per spatial dim: where ORT's output starts in the full output and how long it is."""
        rank = len(spatial)
        starts, sizes = [], []
        for i, (size, stride, window) in enumerate(zip(spatial, self.stride, self._windows())):
            full = (size - 1) * stride + window + self.onnx_output_padding[i]
            if self.onnx_output_shape is not None or self.onnx_auto_pad in ('SAME_UPPER', 'SAME_LOWER'):
                out = self.onnx_output_shape[i] if self.onnx_output_shape is not None else min(full, size * stride)
                total = max(0, full - out)
                starts.append(total // 2 if self.onnx_auto_pad == 'SAME_UPPER' else total - total // 2)
            elif self.onnx_auto_pad == 'VALID':
                out = full
                starts.append(0)
            else:
                begin, end = self.onnx_pads[i], self.onnx_pads[i + rank]
                out = full - begin - end
                starts.append(begin)
            sizes.append(out)
        return starts, sizes

    def _native(self) -> bool:
        """Whether torch's own padding/output_padding give ORT's output (the usual, symmetric case)."""
        rank = len(self.kernel_size)
        begins, ends = self.onnx_pads[:rank], self.onnx_pads[rank:]
        return (
            self.onnx_output_shape is None
            and self.onnx_auto_pad in ('NOTSET', 'VALID')
            and (self.onnx_auto_pad == 'VALID' or begins == ends)
            and all(a < max(s, d) for a, s, d in zip(self.onnx_output_padding, self.stride, self.dilation))
        )

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-renamed
        rank = len(self.kernel_size)
        if self._native():
            padding = [0] * rank if self.onnx_auto_pad == 'VALID' else self.onnx_pads[:rank]
            return self._conv(
                input_tensor, self.weight, self.bias, self.stride, padding, self.onnx_output_padding, self.groups,
                self.dilation,
            )
        full = self._conv(input_tensor, self.weight, None, self.stride, 0, 0, self.groups, self.dilation)
        starts, sizes = self._crop(tuple(input_tensor.shape[2:]))
        # crop (negative pads) to [start, start + size), zeros where that runs past the computed part
        ends = [start + size - length for start, size, length in zip(starts, sizes, full.shape[2:])]
        out = F.pad(full, _torch_pad([-s for s in starts], ends))
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, *[1] * rank)
        return out


class ConvTranspose1d(_ConvTranspose, nn.ConvTranspose1d):
    _conv = staticmethod(F.conv_transpose1d)


class ConvTranspose2d(_ConvTranspose, nn.ConvTranspose2d):
    _conv = staticmethod(F.conv_transpose2d)


class ConvTranspose3d(_ConvTranspose, nn.ConvTranspose3d):
    _conv = staticmethod(F.conv_transpose3d)


_MODULES = {
    'Conv': {1: Conv1d, 2: Conv2d, 3: Conv3d},
    'ConvTranspose': {1: ConvTranspose1d, 2: ConvTranspose2d, 3: ConvTranspose3d},
}


def _initializer(node: OnnxNode, index: int, graph: OnnxGraph) -> Optional[torch.Tensor]:
    name = input_name(node, index)
    if not name:
        return None
    try:
        value = get_const_value(name, graph)
    except KeyError as exc:
        raise NotImplementedError(f'{node.operation_type} with a computed input {index} is not implemented') from exc
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


@replace(
    'Conv', 1, 11,
    reason='onnx2torch refuses auto_pad SAME_UPPER/SAME_LOWER and wraps asymmetric pads in a Sequential '
    '(the weight then is not bound for training)',
)
@replace(
    'ConvTranspose', 1, 11,
    reason='onnx2torch refuses auto_pad SAME_UPPER/SAME_LOWER and asymmetric pads, and ignores output_shape',
)
@register('Conv', 22)
@register('ConvTranspose', 22)
def _conv(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    op_type, attrs = node.operation_type, node.attributes
    weight = _initializer(node, 1, graph)
    bias = _initializer(node, 2, graph)
    rank = weight.dim() - 2
    if rank not in _MODULES[op_type]:
        raise NotImplementedError(f'{op_type} with {rank} spatial dims is not implemented')
    auto_pad = attrs.get('auto_pad', 'NOTSET')
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in _AUTO_PADS:
        raise ValueError(f'Unexpected auto_pad "{auto_pad}"')
    groups = attrs.get('group', 1)
    if op_type == 'Conv':
        channels_in, channels_out = weight.shape[1] * groups, weight.shape[0]
    else:
        channels_in, channels_out = weight.shape[0], weight.shape[1] * groups
    module = _MODULES[op_type][rank](
        channels_in,
        channels_out,
        kernel_size=tuple(weight.shape[2:]),
        stride=tuple(attrs.get('strides', [1] * rank)),
        dilation=tuple(attrs.get('dilations', [1] * rank)),
        groups=groups,
        bias=bias is not None,
    )
    module.onnx_auto_pad = auto_pad
    module.onnx_pads = list(attrs.get('pads', [0] * 2 * rank))
    if op_type == 'ConvTranspose':
        output_shape = attrs.get('output_shape')
        module.onnx_output_shape = None if output_shape is None else list(output_shape)[-rank:]
        module.onnx_output_padding = list(attrs.get('output_padding', [0] * rank))
    with torch.no_grad():
        module.weight.data = weight
        if bias is not None:
            module.bias.data = bias
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping(node, node.input_values[:1]))
