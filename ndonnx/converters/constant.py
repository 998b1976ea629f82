"""Constant-19/21/23 and ConstantOfShape-20/21/23.

These bumps only add tensor types (float8, int4, ...), so onnx2torch's converters for the previous
versions are exact. Constant matters more than it looks: every exported graph has Constant nodes,
so without Constant-19 no opset-19+ model converts at all.
"""

from ._registry import alias

alias('Constant', (19, 21, 23), 13)
alias('ConstantOfShape', (20, 21, 23), 9)
