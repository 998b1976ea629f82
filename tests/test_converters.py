"""ndonnx.converters: every added onnx2torch converter must give onnxruntime's numbers.

Each case is a one-node ONNX model at the opset the converter serves. Constant-able inputs are tested
both as initializers (baked into the torch module) and as graph inputs (read at run time).
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import ndonnx.converters
import onnx2torch
from ndonnx.converters._registry import ORIGINALS, replace
from onnx2torch.node_converters import get_converter
from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription

@dataclass
class Init:
    """An input given as an initializer (constant) instead of a graph input."""

    value: np.ndarray


@dataclass
class Case:
    op: str
    opset: int
    inputs: List[Any]  # np.ndarray (graph input), Init (initializer) or None (absent optional input)
    attrs: Dict[str, Any] = field(default_factory=dict)
    outputs: int = 1
    name: str = ''

    @property
    def key(self):
        return self.op, onnx.defs.get_schema(self.op, max_inclusive_version=self.opset).since_version


class CaseBook:
    """One test file's cases, drawn from its own seed: `add` registers a node at each opset, `broken`
    also marks the cases onnx2torch's own converter gets wrong, for the keys ndonnx replaces (see REPLACED)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.cases: List[Case] = []
        self.broken_cases: List[Case] = []

    def add(self, op, opsets, inputs, outputs=1, name='', **attrs) -> List[Case]:
        added = [Case(op, opset, inputs, attrs, outputs, name) for opset in opsets]
        self.cases.extend(added)
        return added

    def broken(self, op, opsets, inputs, outputs=1, name='', **attrs) -> None:
        self.broken_cases.extend(self.add(op, opsets, inputs, outputs, name, **attrs))

    def f32(self, *shape, scale=1.0):
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)


BOOK = CaseBook(20240607)
RNG, CASES, BROKEN, add, broken, f32 = BOOK.rng, BOOK.cases, BOOK.broken_cases, BOOK.add, BOOK.broken, BOOK.f32


def i64(*values):
    return np.array(values, dtype=np.int64)


def ints(low, high, *shape, dtype=np.int64):
    return RNG.integers(low, high, size=shape).astype(dtype)


# ---- reshape family ----------------------------------------------------------------------------
for v in (19, 21, 23):
    x = f32(2, 3, 4)
    add('Reshape', [v], [x, Init(i64(4, -1))], name='init')
    add('Reshape', [v], [x, Init(i64(0, -1))], name='zero_copies')
    add('Reshape', [v], [x, i64(0, 12)], name='runtime_shape')
    add('Reshape', [v], [x, Init(i64(3, 8))], name='allowzero_plain', allowzero=1)
    add('Reshape', [v], [f32(0, 3), Init(i64(0, 5))], name='allowzero_empty', allowzero=1)
    add('Shape', [v], [x], name='all')
    add('Shape', [v], [x], name='start', start=1)
    add('Shape', [v], [x], name='neg', start=-2, end=-1)
    add('Shape', [v], [x], name='empty', start=2, end=1)
    add('Size', [v], [x], name='3d')
    add('Identity', [v], [x], name='f32')
    add('Identity', [v], [ints(0, 9, 4)], name='i64')
add('Size', [1, 13], [f32(5, 2)], name='old')
for v in (21, 23):
    x = f32(2, 3, 4)
    for axis in (0, 1, 2, 3, -1, -3):
        add('Flatten', [v], [x], name=f'axis{axis}', axis=axis)
    add('Unsqueeze', [v], [f32(2, 3), Init(i64(0))], name='front')
    add('Unsqueeze', [v], [f32(2, 3), Init(i64(-1, -3))], name='negative')
    add('Unsqueeze', [v], [f32(2, 3), i64(1, -1)], name='runtime_mixed')
    add('Transpose', [v], [x], name='perm', perm=[2, 0, 1])
    add('Transpose', [v], [x], name='reverse')
add('Squeeze', [23], [f32(1, 3, 1), Init(i64(0, -1))], name='init')
add('Squeeze', [23], [f32(1, 3, 1)], name='all')
add('Squeeze', [23], [f32(1, 3, 1), i64(-3, 2)], name='runtime_mixed')

# ---- cast --------------------------------------------------------------------------------------
for v in (19, 21, 23):
    x = f32(3, 4, scale=50.0)
    add('Cast', [v], [x], name='to_int32', to=TensorProto.INT32)
    add('Cast', [v], [x], name='to_f16', to=TensorProto.FLOAT16)
    add('Cast', [v], [x], name='to_f64', to=TensorProto.DOUBLE)
    add('Cast', [v], [np.array([0.0, -0.0, 1.5, np.nan], np.float32)], name='to_bool', to=TensorProto.BOOL)
    add('Cast', [v], [ints(-100, 100, 5)], name='i64_to_f32', to=TensorProto.FLOAT)
    add('Cast', [v], [ints(0, 255, 5, dtype=np.int32)], name='i32_to_u8', to=TensorProto.UINT8)
for v in (15, 19, 21, 23):
    add('CastLike', [v], [f32(3, 4, scale=50.0), Init(i64(1))], name='f32_like_i64')
    add('CastLike', [v], [ints(-9, 9, 4, dtype=np.int32), np.zeros(1, np.float32)], name='i32_like_f32')

# ---- comparisons / predicates ------------------------------------------------------------------
add('Equal', [19], [ints(0, 3, 3, 4), ints(0, 3, 4)], name='int')
add('Equal', [19], [np.array([1.0, 2.0, np.nan], np.float32), np.array([1.0, 3.0, np.nan], np.float32)], name='float')
for op in ('GreaterOrEqual', 'LessOrEqual'):
    add(op, [16], [ints(0, 3, 3, 4), ints(0, 3, 4)], name='int_broadcast')
    add(op, [16], [f32(2, 3), f32(2, 3)], name='float')
special = np.array([1.0, np.inf, -np.inf, np.nan, 0.0, -3.0], np.float32)
add('IsNaN', [20], [special], name='mix')
add('IsInf', [20], [special], name='both')
add('IsInf', [20], [special], name='positive_only', detect_negative=0)
add('IsInf', [20], [special], name='negative_only', detect_positive=0)

# ---- constants ---------------------------------------------------------------------------------
for v in (19, 21, 23):
    add('Constant', [v], [], name='tensor', value=numpy_helper.from_array(f32(2, 3)))
    add('Constant', [v], [], name='int_tensor', value=numpy_helper.from_array(i64(4, 5, 6)))
    add('Constant', [v], [], name='float', value_float=2.5)
    add('Constant', [v], [], name='ints', value_ints=[1, 2, 3])
for v in (20, 21, 23):
    add('ConstantOfShape', [v], [i64(2, 3)], name='default')
    add('ConstantOfShape', [v], [Init(i64(2, 3))], name='int_value', value=numpy_helper.from_array(i64(7)))
    add('ConstantOfShape', [v], [i64(4)], name='float_value',
        value=numpy_helper.from_array(np.array([1.5], np.float32)))

# ---- convolution / pooling ---------------------------------------------------------------------
add('Conv', [22], [f32(1, 2, 6, 6), Init(f32(3, 2, 3, 3)), Init(f32(3))], name='pads_strides',
    pads=[1, 1, 1, 1], strides=[2, 1])
add('Conv', [22], [f32(1, 4, 5, 5), Init(f32(4, 2, 3, 3))], name='group_dilation', group=2, dilations=[2, 1])
add('ConvTranspose', [22], [f32(1, 2, 4, 4), Init(f32(2, 3, 3, 3)), Init(f32(3))], name='stride2', strides=[2, 2])
for v in (19, 22):
    x = f32(2, 3, 7, 8)
    add('AveragePool', [v], [x], name='plain', kernel_shape=[3, 3])
    add('AveragePool', [v], [x], name='pad_include', kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    add('AveragePool', [v], [x], name='pad_exclude', kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)
    add('AveragePool', [v], [x], name='ceil', kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    add('AveragePool', [v], [x], name='ceil_pad_include', kernel_shape=[3, 2], strides=[2, 3], pads=[1, 1, 1, 1],
        ceil_mode=1, count_include_pad=1)
    add('AveragePool', [v], [x], name='ceil_pad_exclude', kernel_shape=[3, 2], strides=[2, 3], pads=[1, 1, 1, 1],
        ceil_mode=1, count_include_pad=0)
    add('AveragePool', [v], [x], name='dilated', kernel_shape=[2, 3], dilations=[2, 2])
    add('AveragePool', [v], [x], name='dilated_pad_ceil_include', kernel_shape=[3, 2], dilations=[2, 3],
        pads=[1, 0, 2, 1], strides=[2, 2], ceil_mode=1, count_include_pad=1)
    add('AveragePool', [v], [x], name='dilated_pad_exclude', kernel_shape=[3, 2], dilations=[2, 2],
        pads=[2, 1, 0, 1], count_include_pad=0)
    add('AveragePool', [v], [x], name='asymmetric', kernel_shape=[3, 3], pads=[0, 1, 2, 1], count_include_pad=1)
    add('AveragePool', [v], [x], name='same_upper', kernel_shape=[3, 4], strides=[2, 2], auto_pad='SAME_UPPER')
    add('AveragePool', [v], [x], name='same_lower', kernel_shape=[2, 4], auto_pad='SAME_LOWER', count_include_pad=1)
    add('AveragePool', [v], [x], name='valid', kernel_shape=[3, 3], strides=[2, 2], auto_pad='VALID')
    add('AveragePool', [v], [f32(2, 3, 9)], name='1d', kernel_shape=[3], strides=[2], pads=[1, 1])
    add('AveragePool', [v], [f32(1, 2, 5, 6, 7)], name='3d', kernel_shape=[2, 3, 2], dilations=[1, 2, 1])
    # SAME pads come from the undilated kernel and go negative when stride > kernel (ORT's rule)
    add('AveragePool', [v], [f32(1, 2, 6, 7)], name='same_dilated_stride', kernel_shape=[2, 2], strides=[3, 3],
        dilations=[2, 2], auto_pad='SAME_UPPER', ceil_mode=1)
    add('AveragePool', [v], [f32(1, 2, 8, 7)], name='valid_dilated_ceil', kernel_shape=[3, 2], strides=[2, 3],
        dilations=[2, 1], auto_pad='VALID', ceil_mode=1)
add('MaxPool', [22], [f32(2, 3, 7, 8)], name='k2s2', kernel_shape=[2, 2], strides=[2, 2])
add('MaxPool', [22], [f32(2, 3, 7, 8)], name='pad_ceil', kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
    ceil_mode=1)
add('GlobalAveragePool', [22], [f32(2, 3, 5, 4)], name='2d')

# ---- element-wise / activations ----------------------------------------------------------------
for op in ('Acos', 'Asin', 'Atan', 'Cos', 'Sin', 'Tan'):
    add(op, [22], [(RNG.uniform(-0.9, 0.9, (3, 4))).astype(np.float32)], name='unit')
add('Round', [22], [np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 2.51], np.float32)], name='ties')
add('Gelu', [20], [f32(4, 5, scale=3.0)], name='exact')
add('Gelu', [20], [f32(4, 5, scale=3.0)], name='tanh', approximate='tanh')
add('Mish', [18, 22], [f32(4, 5, scale=5.0)], name='plain')
add('Selu', [22], [f32(4, 5, scale=3.0)], name='default')
add('Selu', [22], [f32(4, 5, scale=3.0)], name='custom', alpha=1.5, gamma=0.5)
add('Elu', [22], [f32(4, 5, scale=3.0)], name='alpha', alpha=0.5)
add('HardSigmoid', [22], [f32(4, 5, scale=4.0)], name='alpha_beta', alpha=0.3, beta=0.4)
add('HardSwish', [22], [f32(4, 5, scale=4.0)], name='plain')
add('Softplus', [22], [f32(4, 5, scale=5.0)], name='plain')
add('Softsign', [22], [f32(4, 5, scale=5.0)], name='plain')

# ---- misc --------------------------------------------------------------------------------------
add('Trilu', [14], [f32(2, 4, 5)], name='upper')
add('Trilu', [14], [f32(2, 4, 5), Init(i64(-1))], name='lower_k_init', upper=0)
add('Trilu', [14], [f32(4, 5), np.array(2, np.int64)], name='upper_k_runtime')
add('Dropout', [22], [f32(3, 4)], name='inference')
add('EyeLike', [22], [f32(3, 4)], name='k1', k=1)

# ---- normalization -----------------------------------------------------------------------------
add('GroupNormalization', [18], [f32(2, 4, 3, 3), Init(f32(2)), Init(f32(2))], name='per_group', num_groups=2)
add('GroupNormalization', [21], [f32(2, 6, 3, 3), Init(f32(6)), Init(f32(6))], name='per_channel', num_groups=3)
add('GroupNormalization', [21], [f32(2, 4, 5), f32(4), f32(4)], name='runtime_affine', num_groups=2,
    epsilon=1e-3)
add('RMSNormalization', [23], [f32(2, 3, 8), Init(f32(8))], name='last')
add('RMSNormalization', [23], [f32(2, 3, 8), f32(3, 8)], name='axis1', axis=1, epsilon=1e-3)
add('InstanceNormalization', [22], [f32(2, 3, 4, 4), Init(f32(3)), Init(f32(3))], name='init')
add('InstanceNormalization', [22], [f32(2, 3, 4, 4), f32(3), f32(3)], name='runtime', epsilon=1e-3)

# ---- pad ---------------------------------------------------------------------------------------
for v in (18, 19, 21, 23):
    x = f32(2, 3, 4, 5)
    add('Pad', [v], [x, Init(i64(1, 0, 2, 1, 2, 0, 1, 3))], name='constant_all')
    add('Pad', [v], [x, Init(i64(1, 2, 0, 3)), Init(np.array(1.5, np.float32)), Init(i64(1, -1))],
        name='constant_axes_value')
    add('Pad', [v], [x, i64(2, -1, 1, -2), np.array(-4.0, np.float32), i64(0, 3)], name='constant_runtime_crop')
    add('Pad', [v], [x, Init(i64(0, 0, 2, 3, 0, 0, 1, 4))], name='reflect_all', mode='reflect')
    add('Pad', [v], [x, Init(i64(1, 2, 1, 1)), None, Init(i64(0, 2))], name='reflect_batch_axis', mode='reflect')
    add('Pad', [v], [x, Init(i64(2, 0, 1, 3)), None, Init(i64(-3, 0))], name='edge_axes', mode='edge')
    add('Pad', [v], [x, i64(0, 1, -1, 2, 0, 1, 2, -2)], name='edge_runtime_crop', mode='edge')
    add('Pad', [v], [ints(-5, 5, 3, 4), Init(i64(1, 2, 2, 1)), Init(np.array(7, np.int64))], name='int_constant')
for v in (19, 21, 23):
    add('Pad', [v], [f32(2, 3, 4), Init(i64(0, 2, 5, 0, 3, 1))], name='wrap', mode='wrap')
    # negative pads crop first; wrap then repeats the cropped range
    add('Pad', [v], [f32(3, 6), Init(i64(2, -2, -1, 4))], name='wrap_crop', mode='wrap')

# ---- reduce ------------------------------------------------------------------------------------
REDUCE_FLOAT_OPS = ('ReduceL1', 'ReduceL2', 'ReduceLogSum', 'ReduceLogSumExp', 'ReduceMax', 'ReduceMean',
                    'ReduceMin', 'ReduceProd', 'ReduceSumSquare')
for op in REDUCE_FLOAT_OPS:
    x = f32(3, 4, 5)
    if op == 'ReduceLogSum':
        x = np.abs(x) + 0.1
    if op == 'ReduceProd':
        x = (np.sign(x) * (0.5 + np.abs(x) / 2)).astype(np.float32)
    add(op, [18], [x, Init(i64(1))], name='axis_keep')
    add(op, [18], [x, Init(i64(-1, 0))], name='mixed_axes_drop', keepdims=0)
    add(op, [18], [x, i64(2, -2)], name='runtime_axes_drop', keepdims=0)
    add(op, [18], [x], name='all_keep')
    add(op, [18], [x], name='all_drop', keepdims=0)
    add(op, [18], [x, Init(np.zeros(0, np.int64))], name='empty_axes_all', keepdims=0)
    add(op, [18], [x], name='noop', noop_with_empty_axes=1)
    add(op, [18], [x, Init(i64(0, 2))], name='axes_with_noop_flag', noop_with_empty_axes=1)
for op in ('ReduceMean', 'ReduceL1', 'ReduceL2', 'ReduceSumSquare', 'ReduceProd', 'ReduceMax', 'ReduceLogSum'):
    add(op, [18], [ints(1, 7, 3, 4, dtype=np.int32), Init(i64(1))], name='int32', keepdims=0)
add('ReduceMean', [18], [ints(-9, 9, 3, 4, dtype=np.int64), Init(i64(0))], name='int64_negative_trunc')
add('ReduceLogSumExp', [18], [ints(-5, 6, 6, 4, dtype=np.int32), Init(i64(1))], name='int32', keepdims=0)
for op in ('ReduceMax', 'ReduceMin'):
    add(op, [20], [f32(3, 4, 5), Init(i64(-1, 0))], name='float', keepdims=0)
    add(op, [20], [RNG.random((3, 4)) > 0.5, Init(i64(1))], name='bool', keepdims=0)
    add(op, [20], [RNG.random((3, 4)) > 0.3], name='bool_all')

# ---- resize ------------------------------------------------------------------------------------
for v in (18, 19):
    x = f32(1, 2, 5, 6)
    scales2 = Init(np.array([1, 1, 2, 2], np.float32))
    add('Resize', [v], [x, None, scales2], name='nearest_default')
    add('Resize', [v], [x, None, Init(np.array([1, 1, 0.5, 0.7], np.float32))], name='nearest_asym_floor_down',
        coordinate_transformation_mode='asymmetric', nearest_mode='floor')
    add('Resize', [v], [x, None, None, Init(i64(1, 2, 7, 9))], name='nearest_align_prefer_ceil',
        coordinate_transformation_mode='align_corners', nearest_mode='round_prefer_ceil')
    add('Resize', [v], [x, None, Init(np.array([1, 1, 1.5, 2.5], np.float32))], name='nearest_pytorch_ceil',
        coordinate_transformation_mode='pytorch_half_pixel', nearest_mode='ceil')
    add('Resize', [v], [x, None, np.array([1, 1, 3, 1.5], np.float32)], name='nearest_runtime_scales')
    add('Resize', [v], [x, None, scales2], name='linear_half_pixel', mode='linear')
    add('Resize', [v], [x, None, None, Init(i64(1, 2, 3, 11))], name='linear_pytorch_sizes', mode='linear',
        coordinate_transformation_mode='pytorch_half_pixel')
    add('Resize', [v], [x, None, None, Init(i64(1, 2, 9, 4))], name='linear_align', mode='linear',
        coordinate_transformation_mode='align_corners')
    add('Resize', [v], [x, None, Init(np.array([1, 1, 0.6, 1.7], np.float32))], name='linear_asym', mode='linear',
        coordinate_transformation_mode='asymmetric')
    add('Resize', [v], [x, None, None, i64(1, 2, 10, 3)], name='linear_runtime_sizes', mode='linear')
    add('Resize', [v], [x, None, scales2], name='cubic_half_pixel', mode='cubic')
    add('Resize', [v], [x, None, None, Init(i64(1, 2, 8, 4))], name='cubic_exclude_a', mode='cubic',
        cubic_coeff_a=-0.5, exclude_outside=1)
    add('Resize', [v], [x, None, Init(np.array([1, 1, 1.5, 0.5], np.float32))], name='cubic_align', mode='cubic',
        coordinate_transformation_mode='align_corners')
    add('Resize', [v], [x, None, None, Init(i64(7, 4))], name='axes_sizes', mode='linear', axes=[2, 3])
    add('Resize', [v], [x, None, Init(np.array([2.0, 0.5], np.float32))], name='axes_scales_negative',
        axes=[-1, -2])
    add('Resize', [v], [x, None, None, Init(i64(10, 10))], name='not_larger', mode='linear', axes=[2, 3],
        keep_aspect_ratio_policy='not_larger')
    add('Resize', [v], [x, None, None, Init(i64(10, 10))], name='not_smaller', axes=[2, 3],
        keep_aspect_ratio_policy='not_smaller')
    add('Resize', [v], [x, Init(np.array([0, 0, 0.2, -0.1, 1, 1, 0.9, 1.3], np.float32)), None,
                        Init(i64(1, 2, 4, 7))], name='crop_linear', mode='linear',
        coordinate_transformation_mode='tf_crop_and_resize', extrapolation_value=-2.0)
    add('Resize', [v], [x, Init(np.array([0.1, 0.3, 0.8, 1.2], np.float32)), None, Init(i64(6, 3))],
        name='crop_nearest_axes', axes=[2, 3], coordinate_transformation_mode='tf_crop_and_resize')
    add('Resize', [v], [ints(0, 255, 1, 1, 3, 4, dtype=np.uint8), None, scales2], name='nearest_uint8')
    # 2 / (4/7) = 3.4999998 in float32: ORT still rounds it as the .5 tie it is
    add('Resize', [v], [f32(1, 1, 3, 7), None, None, Init(i64(1, 1, 3, 4))], name='nearest_tie_tolerance',
        coordinate_transformation_mode='asymmetric', nearest_mode='round_prefer_ceil')
    # output shape == input shape: ORT copies even though the scale is not 1
    add('Resize', [v], [f32(1, 1, 9, 4), None, Init(np.array([1, 1, 1.09, 1.1], np.float32))], name='same_shape')
    # an axis with scale 1 is not cropped by roi
    add('Resize', [v], [x, Init(np.array([0, 0, 0.2, 0.1, 1, 1, 0.7, 0.9], np.float32)), None,
                        Init(i64(1, 2, 5, 9))], name='crop_unscaled_axis', mode='linear',
        coordinate_transformation_mode='tf_crop_and_resize')
add('Resize', [19], [f32(1, 2, 3, 3), None, None, Init(i64(1, 2, 2, 11))], name='symmetric_nearest_sizes',
    coordinate_transformation_mode='half_pixel_symmetric', nearest_mode='floor')
for mode in ('nearest', 'linear', 'cubic'):
    add('Resize', [19], [f32(1, 2, 5, 6), None, Init(np.array([1, 1, 1.7, 0.45], np.float32))],
        name=f'symmetric_{mode}', mode=mode, coordinate_transformation_mode='half_pixel_symmetric')

# ---- scatter -----------------------------------------------------------------------------------
data = f32(4, 3, 2)
nd_indices = i64(0, 2, -1, 2)[:, None].reshape(4, 1)  # duplicate row 2 (and -1 == 3)
for reduction in ('none', 'add', 'mul', 'max', 'min'):
    indices = i64(0, 2, -1) .reshape(3, 1) if reduction == 'none' else nd_indices
    add('ScatterND', [18], [data, indices, f32(indices.shape[0], 3, 2)], name=f'rows_{reduction}',
        reduction=reduction)
add('ScatterND', [18], [data, i64(1, 2, -1, 0, 1, 2).reshape(3, 2), f32(3, 2)], name='depth2_add', reduction='add')
element_indices = np.array([[0, 2, -1], [1, 1, 0]], np.int64)
for v, reductions in ((11, ('none',)), (13, ('none',)), (16, ('none', 'add', 'mul')),
                      (18, ('none', 'add', 'mul', 'max', 'min'))):
    for reduction in reductions:
        attrs = {} if v < 16 else {'reduction': reduction}
        add('ScatterElements', [v], [f32(3, 4), element_indices, f32(2, 3)], name=f'axis1_{reduction}', axis=1,
            **attrs)
add('ScatterElements', [18], [f32(3, 4), np.array([[2, 0, 1, 2]], np.int64), f32(1, 4)], name='axis0')

# ---- split -------------------------------------------------------------------------------------
x = f32(2, 7, 3)
add('Split', [18], [x], outputs=3, name='num_outputs_uneven', axis=1, num_outputs=3)
add('Split', [18], [f32(6, 2)], outputs=2, name='num_outputs_even', num_outputs=2)
add('Split', [18], [x, Init(i64(2, 5))], outputs=2, name='split_init', axis=1)
add('Split', [18], [x, i64(1, 2, 4)], outputs=3, name='split_runtime', axis=-2)
add('Split', [18], [x], outputs=1, name='single_output', axis=1, num_outputs=1)


# ---- replaced onnx2torch converters (ndonnx.converters.REPLACED), at the opsets they serve --------
# Reshape-5 (opsets 5-12), -13, -14 (14-18; torch's dynamo exporter writes allowzero=1 at 18)
for v in (11, 13, 14, 18):
    x = f32(2, 3, 4)
    add('Reshape', [v], [x, Init(i64(0, -1))], name='old_zero_copies')
    add('Reshape', [v], [x, i64(4, 0, -1)], name='old_runtime_shape')
for v in (14, 18):
    broken('Reshape', [v], [f32(2, 3, 4), Init(i64(3, 8))], name='old_allowzero', allowzero=1)
    broken('Reshape', [v], [f32(0, 3), Init(i64(0, 5))], name='old_allowzero_empty', allowzero=1)
# Flatten-9 (opsets 9-10), -11, -13
for v in (9, 11, 13):
    broken('Flatten', [v], [f32(2, 3, 4)], name='old_axis0', axis=0)
    add('Flatten', [v], [f32(2, 3, 4)], name='old_axis2', axis=2)
for v in (11, 13):
    add('Flatten', [v], [f32(2, 3, 4)], name='old_axis_neg', axis=-1)
# Squeeze-1 (axes attribute, no negatives), -11 (attribute), -13/-21 (input)
add('Squeeze', [10], [f32(1, 3, 1)], name='old_attr', axes=[0, 2])
add('Squeeze', [10, 11], [f32(1, 3, 1)], name='old_all')
broken('Squeeze', [11], [f32(1, 3, 1)], name='old_attr_mixed', axes=[2, -3])
for v in (13, 21):
    broken('Squeeze', [v], [f32(1, 3, 1), Init(i64(2, -3))], name='old_mixed')
    add('Squeeze', [v], [f32(1, 3, 1), i64(-1, 0)], name='old_runtime')
    add('Squeeze', [v], [f32(1, 3, 1)], name='old_all')
# Unsqueeze-1 (attribute, no negatives), -11 (attribute), -13 (input)
add('Unsqueeze', [10], [f32(2, 3)], name='old_attr', axes=[0, 3])
broken('Unsqueeze', [11], [f32(2, 3)], name='old_attr_negative', axes=[-1, -3])
broken('Unsqueeze', [13], [f32(2, 3), Init(i64(-1, -3))], name='old_negative')
add('Unsqueeze', [13], [f32(2, 3), i64(0, -1)], name='old_runtime')
# Reduce*-1 (opsets 1-10), -11, -12 (Max/Min), -13: axes attribute; ReduceSum-13: axes input
_OLD_REDUCE = {op: (10, 11, 13) for op in REDUCE_FLOAT_OPS}
_OLD_REDUCE.update(ReduceMax=(10, 11, 12, 13), ReduceMin=(10, 11, 12, 13))
for op, opsets in _OLD_REDUCE.items():
    x = f32(3, 4, 5)
    if op == 'ReduceLogSum':
        x = np.abs(x) + 0.1
    if op == 'ReduceProd':
        x = (np.sign(x) * (0.5 + np.abs(x) / 2)).astype(np.float32)
    negative_axes = broken if op in ('ReduceMax', 'ReduceMin', 'ReduceProd') else add
    negative_axes(op, opsets, [x], name='old_mixed_axes_drop', axes=[-1, 0], keepdims=0)
    add(op, opsets, [x], name='old_all_keep')
    add(op, (11, 13), [x], name='old_all_drop', keepdims=0)
    int_input = add if op in ('ReduceMax', 'ReduceMin') else broken
    int_input(op, (11, 13), [ints(1, 7, 3, 4, dtype=np.int32)], name='old_int32', axes=[1], keepdims=0)
add('ReduceSum', [10, 11], [f32(3, 4, 5)], name='old_attr_axes', axes=[-1, 0], keepdims=0)
add('ReduceSum', [10, 11], [f32(3, 4, 5)], name='old_all', keepdims=0)
broken('ReduceSum', [11], [ints(1, 7, 3, 4, dtype=np.int32)], name='old_int32', axes=[1])
add('ReduceSum', [13], [f32(3, 4, 5), Init(i64(-1, 0))], name='old_axes_drop', keepdims=0)
add('ReduceSum', [13], [f32(3, 4, 5), i64(2, -2)], name='old_runtime_axes')
add('ReduceSum', [13], [f32(3, 4, 5)], name='old_no_axes')
broken('ReduceSum', [13], [f32(3, 4, 5), Init(np.zeros(0, np.int64))], name='old_empty_axes_drop', keepdims=0)
add('ReduceSum', [13], [f32(3, 4, 5), Init(np.zeros(0, np.int64))], name='old_noop', noop_with_empty_axes=1)
broken('ReduceSum', [13], [ints(1, 7, 3, 4, dtype=np.int32), Init(i64(1))], name='old_int32', keepdims=0)
# Shape-1 (opsets 1-12), -13, -15 (start/end)
for v in (11, 13, 15):
    add('Shape', [v], [f32(2, 3, 4)], name='old_all')
    broken('Shape', [v], [np.array(1.5, np.float32)], name='old_scalar')
broken('Shape', [15], [f32(2, 3, 4)], name='old_empty_slice', start=2, end=1)
add('Shape', [15], [f32(2, 3, 4)], name='old_neg', start=-2, end=-1)
# AveragePool-7 (opsets 7-9), -10 (ceil_mode), -11; onnx's inception_v1 has asymmetric pads
for v in (9, 10, 11):
    x = f32(2, 3, 7, 8)
    add('AveragePool', [v], [x], name='old_pad_exclude', kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    add('AveragePool', [v], [x], name='old_pad_include', kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
        count_include_pad=1)
    broken('AveragePool', [v], [x], name='old_asymmetric', kernel_shape=[3, 3], pads=[0, 0, 1, 1])
    broken('AveragePool', [v], [x], name='old_asymmetric_include', kernel_shape=[3, 3], pads=[0, 1, 2, 1],
           count_include_pad=1)
    broken('AveragePool', [v], [x], name='old_same_upper', kernel_shape=[3, 4], strides=[2, 2], auto_pad='SAME_UPPER')
    add('AveragePool', [v], [x], name='old_valid', kernel_shape=[3, 3], strides=[2, 2], auto_pad='VALID')
for v in (10, 11):
    add('AveragePool', [v], [f32(2, 3, 7, 8)], name='old_ceil_pad', kernel_shape=[3, 2], strides=[2, 3],
        pads=[1, 1, 1, 1], ceil_mode=1)
# Pad-11, -13: pads (and constant_value) as inputs
for v in (11, 13):
    x = f32(2, 3, 4, 5)
    add('Pad', [v], [x, Init(i64(1, 0, 2, 1, 2, 0, 1, 3))], name='old_constant')
    add('Pad', [v], [x, i64(0, 1, -1, 2, 0, 1, 2, -2), np.array(-4.0, np.float32)], name='old_constant_runtime')
    add('Pad', [v], [x, Init(i64(0, 0, 2, 3, 0, 0, 1, 4))], name='old_reflect_last', mode='reflect')
    broken('Pad', [v], [x, Init(i64(1, 0, 1, 1, 1, 0, 2, 0))], name='old_reflect_batch', mode='reflect')
    broken('Pad', [v], [x, Init(i64(0, 2, 0, 1, 0, 1, 3, 0))], name='old_edge_channel', mode='edge')
    add('Pad', [v], [x, Init(i64(0, 0, 2, 1, 0, 0, 1, 3))], name='old_edge_last', mode='edge')
# Resize-11 (roi and scales required, tf_half_pixel_for_nn), -13
no_roi = Init(np.zeros(0, np.float32))
for v in (11, 13):
    x = f32(1, 2, 5, 6)
    no_scales = Init(np.zeros(0, np.float32)) if v == 11 else None
    roi = no_roi if v == 11 else None
    scales2 = Init(np.array([1, 1, 2, 2], np.float32))
    add('Resize', [v], [x, roi, scales2], name='old_nearest_default')
    broken('Resize', [v], [x, roi, Init(np.array([1, 1, 0.6, 1.7], np.float32))], name='old_nearest_half_pixel')
    add('Resize', [v], [x, roi, Init(np.array([1, 1, 0.5, 0.7], np.float32))], name='old_nearest_asym_floor',
        coordinate_transformation_mode='asymmetric', nearest_mode='floor')
    add('Resize', [v], [x, roi, scales2], name='old_linear_half_pixel', mode='linear')
    add('Resize', [v], [x, roi, no_scales, Init(i64(1, 2, 9, 4))], name='old_linear_align_sizes', mode='linear',
        coordinate_transformation_mode='align_corners')
    broken('Resize', [v], [x, roi, Init(np.array([1, 1, 0.6, 1.7], np.float32))], name='old_linear_asym',
           mode='linear', coordinate_transformation_mode='asymmetric')
    add('Resize', [v], [x, roi, scales2], name='old_cubic', mode='cubic')
    broken('Resize', [v], [x, roi, no_scales, Init(i64(1, 2, 8, 4))], name='old_cubic_exclude', mode='cubic',
           exclude_outside=1, cubic_coeff_a=-0.5)
    add('Resize', [v], [x, roi, np.array([1, 1, 3, 1.5], np.float32)], name='old_runtime_scales')
broken('Resize', [11], [f32(1, 2, 5, 6), no_roi, Init(np.array([1, 1, 1.5, 0.5], np.float32))],
       name='old_tf_half_pixel_for_nn', coordinate_transformation_mode='tf_half_pixel_for_nn')
# ScatterND-16: add/mul reductions
for reduction in ('none', 'add', 'mul'):
    indices = i64(0, 2, -1).reshape(3, 1) if reduction == 'none' else nd_indices
    (add if reduction == 'none' else broken)(
        'ScatterND', [16], [data, indices, f32(indices.shape[0], 3, 2)], name=f'old_rows_{reduction}',
        reduction=reduction)


# ---- attention ---------------------------------------------------------------------------------
q4, k4, v4 = f32(2, 2, 3, 4), f32(2, 2, 5, 4), f32(2, 2, 5, 6)
add('Attention', [23], [q4, k4, v4], name='cross_4d')
add('Attention', [23], [f32(2, 2, 4, 4), f32(2, 2, 4, 4), f32(2, 2, 4, 4)], name='causal_4d', is_causal=1)
add('Attention', [23], [f32(2, 3, 8), f32(2, 5, 4), f32(2, 5, 6)], name='gqa_3d_causal', q_num_heads=4,
    kv_num_heads=2, is_causal=1)
mask_bool = RNG.random((3, 5)) > 0.3
mask_bool[1] = False  # a fully masked query row must give zeros
add('Attention', [23], [q4, k4, v4, mask_bool], name='bool_mask_fully_masked_row')
add('Attention', [23], [q4, k4, v4, f32(2, 1, 3, 5)], name='float_mask_scale_softcap', scale=0.3, softcap=2.0)
add('Attention', [23], [q4, k4, v4, None, f32(2, 2, 2, 4), f32(2, 2, 2, 6)], outputs=3, name='past_kv_causal',
    is_causal=1)
add('Attention', [23], [q4, k4, v4, Init(mask_bool)], outputs=4, name='qk_out_mode0')
for qk_mode in (1, 2, 3):
    add('Attention', [23], [q4, k4, v4, f32(3, 5)], outputs=4, name=f'qk_out_mode{qk_mode}',
        qk_matmul_output_mode=qk_mode, softcap=1.5, softmax_precision=TensorProto.FLOAT)

# ---- harness -----------------------------------------------------------------------------------
def _build(case: Case):
    input_names, graph_inputs, initializers, feeds = [], [], [], {}
    for index, value in enumerate(case.inputs):
        if value is None:
            input_names.append('')
            continue
        name = f'in{index}'
        input_names.append(name)
        if isinstance(value, Init):
            initializers.append(numpy_helper.from_array(value.value, name=name))
        else:
            array = np.asarray(value)
            graph_inputs.append(
                helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
            )
            feeds[name] = array
    while input_names and not input_names[-1]:
        input_names.pop()
    outputs = [f'out{i}' for i in range(case.outputs)]
    node = helper.make_node(case.op, input_names, outputs, **case.attrs)
    graph = helper.make_graph(
        [node], 'g', graph_inputs, [helper.make_empty_tensor_value_info(o) for o in outputs], initializer=initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', case.opset)])
    model.ir_version = 10
    return model, feeds


def _case_id(case: Case) -> str:
    return f'{case.op}-{case.opset}-{case.name}'


def _run_onnxruntime(model, feeds) -> List[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # thread-pool start-up dominates for one-node models
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # opset-1 Size model and shape-inference mismatch notes
    session = ort.InferenceSession(model.SerializeToString(), options, providers=['CPUExecutionProvider'])
    return session.run(None, feeds)


def _assert_torch_matches(model, feeds, expected: List[np.ndarray]) -> None:
    torch_model = onnx2torch.convert(model).eval()
    with torch.no_grad():
        got = torch_model(*[torch.from_numpy(a.copy()) for a in feeds.values()])  # copy() keeps 0-d arrays 0-d
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    assert len(got) == len(expected)

    for want, have in zip(expected, got):
        have = have.numpy()
        assert have.dtype == want.dtype, (have.dtype, want.dtype)
        assert have.shape == want.shape, (have.shape, want.shape)
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(have, want)


@pytest.mark.parametrize('case', CASES, ids=[_case_id(c) for c in CASES])
def test_matches_onnxruntime(case: Case):
    model, feeds = _build(case)
    _assert_torch_matches(model, feeds, _run_onnxruntime(model, feeds))


@pytest.mark.filterwarnings('ignore')  # onnx2torch's Resize warns that it may be inexact
@pytest.mark.parametrize('case', BROKEN, ids=[_case_id(c) for c in BROKEN])
def test_replaced_converter_was_broken(case: Case, monkeypatch):
    """onnx2torch's own converter fails these cases (the reason for replacing it). If one starts to
    pass, a newer onnx2torch fixed it, and the replacement may be dropped."""
    assert_original_broken(case, monkeypatch)


def assert_original_broken(case: Case, monkeypatch) -> None:
    """onnx2torch's own converter, put back for this case, disagrees with onnxruntime or fails."""
    model, feeds = _build(case)
    expected = _run_onnxruntime(model, feeds)
    key = OperationDescription(onnx.defs.ONNX_DOMAIN, *case.key)
    monkeypatch.setitem(_CONVERTER_REGISTRY, key, ORIGINALS[case.key])
    with pytest.raises(Exception):
        _assert_torch_matches(model, feeds, expected)


def test_registered_keys_resolve():
    assert ndonnx.converters.REGISTERED, 'nothing registered'
    assert len(set(ndonnx.converters.REGISTERED)) == len(ndonnx.converters.REGISTERED)
    for op_type, version in ndonnx.converters.REGISTERED:
        assert callable(get_converter(op_type, version))
        # a key is only reachable if it is the version in which the op last changed
        assert onnx.defs.get_schema(op_type, max_inclusive_version=version).since_version == version


def test_every_registered_key_is_exercised():
    from test_converters_quirks import CASES as QUIRK_CASES  # they import this module's helpers
    from test_converters_rnn import CASES as RNN_CASES

    tested = {case.key for case in CASES + RNN_CASES + QUIRK_CASES}
    missing = [key for key in ndonnx.converters.REGISTERED if key not in tested]
    assert not missing, f'no parity case for {missing}'


def test_replaced_keys_are_onnx2torch_keys():
    replaced = [(r.op_type, r.version) for r in ndonnx.converters.REPLACED]
    assert replaced, 'nothing replaced'
    assert len(set(replaced)) == len(replaced)
    assert not set(replaced) & set(ndonnx.converters.REGISTERED)
    for replacement in ndonnx.converters.REPLACED:
        key = (replacement.op_type, replacement.version)
        assert replacement.reason
        assert key in ORIGINALS  # onnx2torch had a converter for it
        assert onnx.defs.get_schema(key[0], max_inclusive_version=key[1]).since_version == key[1]
        assert get_converter(*key) is not ORIGINALS[key]


def test_every_replaced_key_is_exercised():
    from test_converters_quirks import BROKEN as QUIRK_BROKEN, CASES as QUIRK_CASES  # they import this module's helpers
    from test_converters_rnn import BROKEN as RNN_BROKEN, CASES as RNN_CASES

    tested = {case.key for case in CASES + RNN_CASES + QUIRK_CASES}
    missing = [(r.op_type, r.version) for r in ndonnx.converters.REPLACED if (r.op_type, r.version) not in tested]
    assert not missing, f'no parity case for {missing}'
    shown_broken = {case.key[0] for case in BROKEN + RNN_BROKEN + QUIRK_BROKEN}
    assert not {r.op_type for r in ndonnx.converters.REPLACED} - shown_broken


def test_replace_refuses_unknown_keys():
    with pytest.raises(KeyError):
        replace('NoSuchOp', 1, reason='test')(lambda node, graph: None)


def test_import_is_idempotent():
    import importlib

    before = ndonnx.converters.REGISTERED, ndonnx.converters.REPLACED
    importlib.import_module('ndonnx.converters')
    assert (ndonnx.converters.REGISTERED, ndonnx.converters.REPLACED) == before
