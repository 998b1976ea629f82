"""onnx2torch converters for ONNX op versions that onnx2torch 1.5.15 lacks.

onnx2torch's last release predates opsets 18-23, and its registry is keyed by the exact version in
which an op last changed, so e.g. any opset-19 model fails on Constant-19 and any opset-18 model on
ReduceMean-18, even where nothing relevant changed. torch's dynamo exporter (opset 18 and up)
produces such versions all the time. Importing this package registers converters for the missing
keys in onnx2torch's own registry, so ``onnx2torch.convert`` just works afterwards. Registration
happens once (module import).

``REGISTERED`` lists the (op_type, version) keys added here. A few of onnx2torch's own converters are
wrong or refuse valid attributes that real exports use (Reshape-14 ``allowzero=1`` from torch's dynamo
exporter, AveragePool-11 asymmetric pads, ...); those keys are overridden, only through
``_registry.replace``, and ``REPLACED`` lists them as (op_type, version, reason). ``outputs`` also
wraps ``onnx2torch.convert`` so that graph outputs made by multi-output nodes (LSTM's Y alone, one
output of a Split) come back one by one, as the graph lists them.
"""

from . import (  # noqa: F401  (imported for their registration side effect)
    activation,
    attention,
    cast,
    compare,
    constant,
    conv,
    elementwise,
    misc,
    norm,
    outputs,
    pad,
    pool,
    reduce,
    reshape,
    resize,
    rnn,
    scatter,
    shape,
    split,
)
from ._registry import ADDED, REPLACED_KEYS, Replacement

REGISTERED = tuple(ADDED)
REPLACED = tuple(REPLACED_KEYS)

__all__ = ['REGISTERED', 'REPLACED', 'Replacement']
