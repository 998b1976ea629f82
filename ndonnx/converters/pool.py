"""AveragePool-19/22 (adds ``dilations``), MaxPool, GlobalMaxPool-1/22 and GlobalAveragePool-22 (types only).

torch's avg_pool has no dilation, and onnx2torch's AveragePool also refuses asymmetric pads and
SAME auto_pad. The general path here sums each window with a depthwise all-ones convolution (which
has dilation) over the explicitly padded input and divides by a count obtained the same way from a
mask, so ``count_include_pad``, ``ceil_mode`` overhang and asymmetric pads follow ORT. Plain cases
(no dilation, symmetric pads torch accepts) use ``F.avg_pool*d``, whose rules are the same.

The module also replaces onnx2torch's AveragePool-7/10/11, which refuses asymmetric pads (onnx's
inception_v1 has them) and SAME_* auto_pad. Version 7 has no ``ceil_mode`` and before 19 there are
no ``dilations``: absent attributes take their defaults.

MaxPool-8/10/11/12 replace onnx2torch's, which refuses SAME_* auto_pad and pads over half the kernel
(ORT allows any pad below the kernel), lets a ceil_mode window start in asymmetric end padding, and
fails where the output is empty or ORT's size formula (truncation toward zero) keeps a window that
overhangs a small input. The general path pads with the dtype's lowest value (ORT's initial maximum)
and pools without torch's padding or ceil_mode.
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node

from ._registry import alias, register, replace


def _trunc_div(numerator: int, denominator: int) -> int:
    """C++ integer division (truncates toward zero)."""
    quotient = abs(numerator) // abs(denominator)
    return quotient if (numerator >= 0) == (denominator > 0) else -quotient


_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _Pool(nn.Module, OnnxToTorchModule):
    """ONNX pooling geometry (attributes and ORT's output size) for 1-3 spatial dims."""

    def __init__(
        self,
        kernel_shape: List[int],
        strides: Optional[List[int]] = None,
        dilations: Optional[List[int]] = None,
        pads: Optional[List[int]] = None,
        auto_pad: str = 'NOTSET',
        ceil_mode: int = 0,
    ):
        super().__init__()
        rank = len(kernel_shape)
        if rank not in _CONV:
            raise NotImplementedError(f'{type(self).__name__} with {rank} spatial dims is not implemented')
        if auto_pad not in ('NOTSET', 'VALID', 'SAME_UPPER', 'SAME_LOWER'):
            raise ValueError(f'Unexpected auto_pad "{auto_pad}"')
        self.kernel = list(kernel_shape)
        self.strides = list(strides or [1] * rank)
        self.dilations = list(dilations or [1] * rank)
        self.pads = list(pads or [0] * 2 * rank)
        self.auto_pad = auto_pad
        self.ceil_mode = bool(ceil_mode)

    def _geometry(self, spatial: Tuple[int, ...]) -> Tuple[List[int], List[int], List[int], List[int]]:
        """Per spatial dim: pad before, pad after, extra zeros after (ceil_mode overhang), output size.

        Mirrors onnxruntime's PoolAttributes::ComputeSizePadDilations: SAME_* size the padding from
        the undilated kernel, VALID is zero padding with the same (ceil_mode aware) formula, and a
        ceil_mode window may not start in the end padding.
        """
        begins, ends, extras, outs = [], [], [], []
        rank = len(self.kernel)
        for i in range(rank):
            size, stride, kernel, dilation = spatial[i], self.strides[i], self.kernel[i], self.dilations[i]
            if self.auto_pad in ('SAME_UPPER', 'SAME_LOWER'):
                needed = (-(-size // stride) - 1) * stride + kernel - size
                begin = _trunc_div(needed + 1 if self.auto_pad == 'SAME_LOWER' else needed, 2)
                end = needed - begin
            elif self.auto_pad == 'VALID':
                begin = end = 0
            else:
                begin, end = self.pads[i], self.pads[i + rank]
            numerator = size + begin + end - dilation * (kernel - 1) - 1
            out = _trunc_div(numerator, stride) + 1
            if self.ceil_mode:
                out = math.ceil(numerator / stride) + 1
                if (out - 1) * stride >= size + begin:
                    out -= 1
            window = (kernel - 1) * dilation + 1
            begins.append(begin)
            ends.append(end)
            extras.append(max(0, (out - 1) * stride + window - (size + begin + end)))
            outs.append(out)
        return begins, ends, extras, outs

    def _fast_path(self, spatial: Tuple[int, ...]) -> bool:
        """Whether torch's own padding and ceil_mode give ORT's result: symmetric pads of at most half the
        window (torch's limit) and an input that holds a whole window (ORT's size formula truncates
        toward zero, torch's floors, so they differ where the window overhangs the padded input)."""
        rank = len(self.kernel)
        begins, ends = self.pads[:rank], self.pads[rank:]
        windows = [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations)]
        return (
            self.auto_pad == 'NOTSET'
            and begins == ends
            and all(2 * p <= w <= size + 2 * p for p, w, size in zip(begins, windows, spatial))
        )


def _empty(input_tensor: torch.Tensor, outs: List[int]) -> torch.Tensor:
    """ORT's result where a window is longer than the padded input: an empty tensor."""
    return input_tensor.new_zeros((*input_tensor.shape[:2], *[max(0, o) for o in outs]))


class AveragePool(_Pool):
    """ONNX AveragePool-19+ for 1-3 spatial dims."""

    def __init__(self, kernel_shape: List[int], count_include_pad: int = 0, **kwargs):
        super().__init__(kernel_shape, **kwargs)
        self.count_include_pad = bool(count_include_pad)

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        rank = len(self.kernel)
        if all(d == 1 for d in self.dilations) and self._fast_path(tuple(input_tensor.shape[2:])):
            return _AVG_POOL[rank](
                input_tensor,
                kernel_size=self.kernel,
                stride=self.strides,
                padding=self.pads[:rank],
                ceil_mode=self.ceil_mode,
                count_include_pad=self.count_include_pad,
            )

        x = input_tensor if input_tensor.dtype in (torch.float32, torch.float64) else input_tensor.float()
        spatial = tuple(x.shape[2:])
        begins, ends, extras, outs = self._geometry(spatial)
        if min(outs) <= 0:
            return _empty(input_tensor, outs)

        def _torch_pads(before: List[int], after: List[int]) -> List[int]:
            pads: List[int] = []
            for b, a in zip(reversed(before), reversed(after)):
                pads.extend((b, a))
            return pads

        onnx_pads = _torch_pads(begins, ends)  # negative (SAME_* with stride > kernel) crops
        overhang = _torch_pads([0] * rank, extras)
        padded = F.pad(F.pad(x, onnx_pads), overhang)
        channels = x.shape[1]
        weight = torch.ones((channels, 1, *self.kernel), dtype=x.dtype, device=x.device)
        conv = _CONV[rank]
        sums = conv(padded, weight, stride=self.strides, dilation=self.dilations, groups=channels)

        # count of taps per window that ORT divides by: real elements (+ ONNX padding if included),
        # never the ceil_mode overhang
        mask = torch.ones((1, 1, *spatial), dtype=x.dtype, device=x.device)
        mask = F.pad(F.pad(mask, onnx_pads, value=1.0 if self.count_include_pad else 0.0), overhang)
        counts = conv(mask, weight[:1], stride=self.strides, dilation=self.dilations)
        return (sums / counts).to(input_tensor.dtype)


def _window(attrs: dict) -> dict:
    """The pooling window's attributes, shared by AveragePool and MaxPool."""
    return dict(kernel_shape=attrs['kernel_shape'], strides=attrs.get('strides'), dilations=attrs.get('dilations'),
                pads=attrs.get('pads'), auto_pad=attrs.get('auto_pad', 'NOTSET'), ceil_mode=attrs.get('ceil_mode', 0))


@replace('AveragePool', 7, 10, 11, reason='onnx2torch refuses asymmetric pads and SAME_* auto_pad')
@register('AveragePool', 19, 22)
def _average_pool(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    attrs = node.attributes
    module = AveragePool(**_window(attrs), count_include_pad=attrs.get('count_include_pad', 0))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


class MaxPool(_Pool):
    """ONNX MaxPool-8+ (the ``Values`` output) for 1-3 spatial dims."""

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        rank = len(self.kernel)
        spatial = tuple(input_tensor.shape[2:])
        if self._fast_path(spatial):
            return _MAX_POOL[rank](
                input_tensor,
                kernel_size=self.kernel,
                stride=self.strides,
                padding=self.pads[:rank],
                dilation=self.dilations,
                ceil_mode=self.ceil_mode,
            )
        begins, _, _, outs = self._geometry(spatial)
        if min(outs) <= 0:
            return _empty(input_tensor, outs)
        # ORT clamps each window to the input, so padding never wins: pad the begin side (a negative
        # SAME_LOWER pad crops) and the end up to the last window, then pool without torch's padding
        pads: List[int] = []
        for i in reversed(range(rank)):
            window = (self.kernel[i] - 1) * self.dilations[i] + 1
            pads.extend((begins[i], (outs[i] - 1) * self.strides[i] + window - spatial[i] - begins[i]))
        dtype = input_tensor.dtype
        lowest = torch.finfo(dtype).min if dtype.is_floating_point else torch.iinfo(dtype).min
        padded = F.pad(input_tensor, pads, value=lowest)
        return _MAX_POOL[rank](padded, kernel_size=self.kernel, stride=self.strides, dilation=self.dilations)


@replace(
    'MaxPool', 8, 10, 11, 12,
    reason='onnx2torch refuses SAME_* auto_pad and pads over half the kernel, lets a ceil_mode window start in '
    'asymmetric end padding, and fails on small inputs where ORT keeps an overhanging window or returns empty',
)
@register('MaxPool', 22)
def _max_pool(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    if len(node.output_values) > 1:  # even an unnamed one: onnx2torch would then index the module's output
        raise NotImplementedError('MaxPool with an Indices output is not implemented')
    module = MaxPool(**_window(node.attributes))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


class GlobalMaxPool(nn.Module, OnnxToTorchModule):
    """ONNX GlobalMaxPool: the maximum over every spatial dim, kept as size 1."""

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        return input_tensor.amax(dim=tuple(range(2, input_tensor.dim())), keepdim=True)


@register('GlobalMaxPool', 1, 22)
def _global_max_pool(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    return OperationConverterResult(torch_module=GlobalMaxPool(), onnx_mapping=onnx_mapping_from_node(node))


# opset 22 only adds bfloat16
alias('GlobalAveragePool', (22,), 1)
