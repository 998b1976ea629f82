"""Conv-22 and ConvTranspose-22: bfloat16 added, semantics unchanged, onnx2torch's converter reused."""

from ._registry import alias

alias('Conv', (22,), 11)
alias('ConvTranspose', (22,), 11)
