"""Opset-22 bumps of element-wise math ops (Acos, Asin, Atan, Cos, Sin, Tan, Round).

They only add bfloat16, so onnx2torch's converters are reused unchanged.
"""

from ._registry import alias

for _op_type in ('Acos', 'Asin', 'Atan', 'Cos', 'Sin', 'Tan'):
    alias(_op_type, (22,), 7)
alias('Round', (22,), 11)  # half-to-even in both ONNX and torch
