"""Resize-18 (``axes``, ``keep_aspect_ratio_policy``, ``antialias``) and Resize-19 (``half_pixel_symmetric``).

onnx2torch maps Resize onto ``F.interpolate`` and only warns when the coordinate transformation or
nearest rounding differ from torch's, which they do for ONNX's defaults (half_pixel +
round_prefer_floor). This implementation instead follows the ONNX formulas per resized axis: map each
output position to a source coordinate (in float32, the way onnxruntime does), then pick (nearest) or
blend (linear: 2 taps, cubic: 4 taps) input positions along that axis. Applying the axes one after
the other is exactly multilinear/bicubic interpolation since the kernels are separable.

The module replaces onnx2torch's Resize-11/13 too: those map onto ``F.interpolate`` and are inexact
for ONNX's defaults (half_pixel + round_prefer_floor nearest) and most other settings. Resize-11 also
has ``tf_half_pixel_for_nn``. Resize-10 (asymmetric, scales only; opset-10 models are upgraded to 13
on loading) keeps onnx2torch's converter.

Not implemented (raises): ``antialias=1`` for linear/cubic.
"""

import math
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult

from ._registry import const_list, input_name, mapping, register, replace

_F32 = np.float32
_TIE_EPS = 1e-6
_COORDINATE_MODES = (
    'half_pixel',
    'tf_half_pixel_for_nn',  # Resize-11 only
    'half_pixel_symmetric',
    'pytorch_half_pixel',
    'align_corners',
    'asymmetric',
    'tf_crop_and_resize',
)
_NEAREST_MODES = ('round_prefer_floor', 'round_prefer_ceil', 'floor', 'ceil')


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's std::round (torch.round is half-to-even)."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


class Resize(nn.Module, OnnxToTorchModule):
    """ONNX Resize-18/19 for nearest, linear and cubic modes on any set of axes."""

    def __init__(  # pylint: disable=too-many-arguments
        self,
        mode: str = 'nearest',
        coordinate_transformation_mode: str = 'half_pixel',
        nearest_mode: str = 'round_prefer_floor',
        cubic_coeff_a: float = -0.75,
        exclude_outside: int = 0,
        extrapolation_value: float = 0.0,
        keep_aspect_ratio_policy: str = 'stretch',
        axes: Optional[List[int]] = None,
        roi: Optional[List[float]] = None,
        scales: Optional[List[float]] = None,
        sizes: Optional[List[int]] = None,
    ):
        super().__init__()
        if mode not in ('nearest', 'linear', 'cubic'):
            raise NotImplementedError(f'Resize mode "{mode}" is not implemented')
        if coordinate_transformation_mode not in _COORDINATE_MODES:
            raise NotImplementedError(f'coordinate_transformation_mode "{coordinate_transformation_mode}"')
        if nearest_mode not in _NEAREST_MODES:
            raise NotImplementedError(f'nearest_mode "{nearest_mode}" is not implemented')
        if keep_aspect_ratio_policy not in ('stretch', 'not_larger', 'not_smaller'):
            raise NotImplementedError(f'keep_aspect_ratio_policy "{keep_aspect_ratio_policy}"')
        self.mode = mode
        self.coordinate_mode = coordinate_transformation_mode
        self.nearest_mode = nearest_mode
        self.cubic_coeff_a = float(cubic_coeff_a)
        self.exclude_outside = bool(exclude_outside)
        self.extrapolation_value = float(extrapolation_value)
        self.policy = keep_aspect_ratio_policy
        self.axes = axes
        self.roi = roi
        self.scales = scales
        self.sizes = sizes

    # ---- output geometry -------------------------------------------------------------------
    def _geometry(
        self, shape: Tuple[int, ...], axes: List[int], scales: Optional[List[float]], sizes: Optional[List[int]]
    ) -> Tuple[List[int], List[np.float32]]:
        """Output length and float32 scale per entry of ``axes``, computed as onnxruntime does."""
        in_sizes = [shape[axis] for axis in axes]
        if sizes:
            out_sizes = [int(size) for size in sizes]
            ratios = [_F32(out) / _F32(inp) for out, inp in zip(out_sizes, in_sizes)]
            if self.policy == 'stretch':
                return out_sizes, ratios
            scale = min(ratios) if self.policy == 'not_larger' else max(ratios)
            out_sizes = [int(math.floor(float(scale * _F32(inp)) + 0.5)) for inp in in_sizes]  # std::round
            return out_sizes, [scale] * len(axes)
        if not scales:
            raise ValueError('Resize needs either scales or sizes')
        f32_scales = [_F32(scale) for scale in scales]
        return [int(math.floor(scale * _F32(inp))) for scale, inp in zip(f32_scales, in_sizes)], f32_scales

    def _coordinates(self, out_len: int, in_len: int, scale: np.float32, start: float, end: float) -> torch.Tensor:
        """Source coordinate of every output position along one axis (float32, ORT's expressions)."""
        x = torch.arange(out_len, dtype=torch.float32)
        scale_t = torch.tensor(scale, dtype=torch.float32)
        in_f, out_f = float(in_len), float(out_len)
        mode = self.coordinate_mode
        if mode == 'asymmetric':
            return x / scale_t
        if mode == 'half_pixel':
            return (x + 0.5) / scale_t - 0.5
        if mode == 'tf_half_pixel_for_nn':
            return (x + 0.5) / scale_t
        if mode == 'pytorch_half_pixel':
            return (x + 0.5) / scale_t - 0.5 if out_len > 1 else torch.zeros_like(x)
        if mode == 'half_pixel_symmetric':
            # ORT: float offset, then the rest in double (its 0.5 literals are doubles), cast to float
            adjustment = _F32(out_f) / (scale * _F32(in_f))
            offset = _F32(in_f) / _F32(2) * (_F32(1) - adjustment)
            x64 = torch.arange(out_len, dtype=torch.float64)
            return ((float(offset) + (x64 + 0.5) / float(scale)) - 0.5).to(torch.float32)
        if mode == 'align_corners':
            if out_len == 1:
                return torch.zeros_like(x)
            return x * torch.tensor(in_f - 1, dtype=torch.float32) / torch.tensor(out_f - 1, dtype=torch.float32)
        # tf_crop_and_resize
        start_t = torch.tensor(start, dtype=torch.float32)
        end_t = torch.tensor(end, dtype=torch.float32)
        if out_len == 1:  # computed in double by ORT
            return torch.full_like(x, 0.5 * (float(start_t) + float(end_t)) * (in_f - 1))
        return start_t * (in_f - 1) + (x * (end_t - start_t) * (in_f - 1)) / (out_f - 1)

    # ---- one axis --------------------------------------------------------------------------
    @staticmethod
    def _along(values: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
        """Shape a per-output-position vector to broadcast along ``axis``."""
        shape = [1] * rank
        shape[axis] = -1
        return values.reshape(shape)

    def _nearest(self, x: torch.Tensor, axis: int, coords: torch.Tensor) -> torch.Tensor:
        if self.nearest_mode == 'floor':
            index = torch.floor(coords)
        elif self.nearest_mode == 'ceil':
            index = torch.ceil(coords)
        else:
            # onnxruntime treats coordinates within 1e-6 of a .5 tie as the tie (measured on ORT 1.32;
            # it absorbs float error such as 2 / (4/7) = 3.4999998), then breaks it per the mode
            tie = torch.abs(coords - torch.floor(coords) - 0.5) < _TIE_EPS
            broken = torch.floor(coords) if self.nearest_mode == 'round_prefer_floor' else torch.ceil(coords)
            index = torch.where(tie, broken, _round_half_away(coords))
        index = index.to(torch.int64).clamp(0, x.shape[axis] - 1).to(x.device)
        return torch.index_select(x, axis, index)

    def _linear(self, x: torch.Tensor, axis: int, coords: torch.Tensor) -> torch.Tensor:
        in_len = x.shape[axis]
        coords = coords.clamp(0, in_len - 1)
        low = coords.to(torch.int64).clamp(max=in_len - 1)
        high = (low + 1).clamp(max=in_len - 1)
        weight_high = torch.abs(coords - low.to(coords.dtype))  # dx1 in ORT: weight of the upper tap
        weight_low = torch.abs(coords - high.to(coords.dtype))
        same = low == high
        weight_high = torch.where(same, 0.5, weight_high)
        weight_low = torch.where(same, 0.5, weight_low)
        rank = x.dim()
        weight_low = self._along(weight_low.to(x.dtype).to(x.device), axis, rank)
        weight_high = self._along(weight_high.to(x.dtype).to(x.device), axis, rank)
        return (
            torch.index_select(x, axis, low.to(x.device)) * weight_low
            + torch.index_select(x, axis, high.to(x.device)) * weight_high
        )

    def _cubic(self, x: torch.Tensor, axis: int, coords: torch.Tensor) -> torch.Tensor:
        in_len = x.shape[axis]
        a = self.cubic_coeff_a
        base = torch.floor(coords)
        s = coords - base
        coeffs = [
            ((a * (s + 1) - 5 * a) * (s + 1) + 8 * a) * (s + 1) - 4 * a,
            ((a + 2) * s - (a + 3)) * s * s + 1,
            ((a + 2) * (1 - s) - (a + 3)) * (1 - s) * (1 - s) + 1,
            ((a * (2 - s) - 5 * a) * (2 - s) + 8 * a) * (2 - s) - 4 * a,
        ]
        taps = [base.to(torch.int64) + offset for offset in (-1, 0, 1, 2)]
        if self.exclude_outside:
            coeffs = [torch.where((tap >= 0) & (tap < in_len), c, 0.0) for c, tap in zip(coeffs, taps)]
            total = coeffs[0] + coeffs[1] + coeffs[2] + coeffs[3]
            coeffs = [c / total for c in coeffs]
        rank = x.dim()
        result = None
        for coeff, tap in zip(coeffs, taps):
            picked = torch.index_select(x, axis, tap.clamp(0, in_len - 1).to(x.device))
            term = picked * self._along(coeff.to(x.dtype).to(x.device), axis, rank)
            result = term if result is None else result + term
        return result

    def forward(
        self,
        input_tensor: torch.Tensor,
        roi: Optional[torch.Tensor] = None,
        scales: Optional[torch.Tensor] = None,
        sizes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        rank = input_tensor.dim()
        axes = list(range(rank)) if self.axes is None else [a + rank if a < 0 else a for a in self.axes]
        roi_list = self.roi if roi is None else roi.reshape(-1).tolist()
        scale_list = self.scales if scales is None else scales.reshape(-1).tolist()
        size_list = self.sizes if sizes is None else sizes.reshape(-1).tolist()
        out_sizes, axis_scales = self._geometry(tuple(input_tensor.shape), axes, scale_list, size_list)

        crop = self.coordinate_mode == 'tf_crop_and_resize'
        out_shape = list(input_tensor.shape)
        for axis, size in zip(axes, out_sizes):
            out_shape[axis] = size
        if out_shape == list(input_tensor.shape):
            return input_tensor.clone()  # ORT copies when the shape is unchanged, whatever the scales
        result = input_tensor
        compute_dtype = input_tensor.dtype
        if self.mode != 'nearest' and not input_tensor.is_floating_point():
            result = result.to(torch.float32)  # blend in float, cast back at the end
        for i, axis in enumerate(axes):
            in_len, out_len, scale = input_tensor.shape[axis], out_sizes[i], axis_scales[i]
            start, end = (roi_list[i], roi_list[i + len(axes)]) if crop and roi_list else (0.0, 1.0)
            # ORT maps an axis with scale exactly 1 one-to-one (no transform, roi ignored)
            if scale == 1:
                continue
            coords = self._coordinates(out_len, in_len, scale, start, end)
            if self.mode == 'nearest':
                result = self._nearest(result, axis, coords)
            elif self.mode == 'linear':
                result = self._linear(result, axis, coords)
            else:
                result = self._cubic(result, axis, coords)
            if crop:
                outside = (coords < 0) | (coords > in_len - 1)
                outside = self._along(outside.to(result.device), axis, rank)
                result = torch.where(outside, result.new_tensor(self.extrapolation_value), result)
        return result.to(compute_dtype)


@replace('Resize', 11, 13, reason='onnx2torch maps onto F.interpolate: inexact for most settings')
@register('Resize', 18, 19)
def _resize(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    attrs = node.attributes
    mode = attrs.get('mode', 'nearest')
    if attrs.get('antialias', 0) and mode != 'nearest':
        raise NotImplementedError('Resize with antialias=1 is not implemented')
    roi, scales, sizes = (const_list(node, i, graph) for i in (1, 2, 3))
    module = Resize(
        mode=mode,
        coordinate_transformation_mode=attrs.get('coordinate_transformation_mode', 'half_pixel'),
        nearest_mode=attrs.get('nearest_mode', 'round_prefer_floor'),
        cubic_coeff_a=attrs.get('cubic_coeff_a', -0.75),
        exclude_outside=attrs.get('exclude_outside', 0),
        extrapolation_value=attrs.get('extrapolation_value', 0.0),
        keep_aspect_ratio_policy=attrs.get('keep_aspect_ratio_policy', 'stretch'),
        axes=attrs.get('axes'),
        roi=roi,
        scales=scales,
        sizes=sizes,
    )
    inputs = [node.input_values[0]] + ['' if const is not None else input_name(node, i) for i, const in
                                        ((1, roi), (2, scales), (3, sizes))]
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping(node, inputs))
