"""Gelu-20, Mish-18/22 (onnx2torch has neither), Selu-22, Clip-11/12/13, and the opset-22 activation bumps.

Opset 22 only adds bfloat16 to Elu, HardSigmoid, HardSwish, Softplus and Softsign, so onnx2torch's
converters are reused. Selu gets its own module because onnx2torch's rejects non-default
``alpha``/``gamma``.

Clip-11/12/13 replace onnx2torch's, which refuses a ``min``/``max`` that is a computed tensor or an
absent ``min`` before a given ``max``, and makes integer inputs float.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node

from ._registry import alias, const_list, input_name, mapping, register, replace


class Gelu(nn.Module, OnnxToTorchModule):
    """ONNX Gelu: exact (erf) or ``approximate='tanh'``, same formulas as torch."""

    def __init__(self, approximate: str = 'none'):
        super().__init__()
        if approximate not in ('none', 'tanh'):
            raise NotImplementedError(f'Gelu approximate="{approximate}" is not implemented')
        self.approximate = approximate

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        return F.gelu(input_tensor, approximate=self.approximate)


@register('Gelu', 20)
def _gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    module = Gelu(approximate=node.attributes.get('approximate', 'none'))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


@register('Mish', 18, 22)
def _mish(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    # x * tanh(softplus(x)); torch's Mish is the same function
    return OperationConverterResult(torch_module=nn.Mish(), onnx_mapping=onnx_mapping_from_node(node))


class Selu(nn.Module, OnnxToTorchModule):
    """ONNX Selu with any ``alpha``/``gamma``: gamma * (x if x > 0 else alpha * (exp(x) - 1))."""

    def __init__(self, alpha: float, gamma: float):
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        negative = self.alpha * torch.expm1(input_tensor)
        return self.gamma * torch.where(input_tensor > 0, input_tensor, negative)


@register('Selu', 22)
def _selu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    module = Selu(
        alpha=node.attributes.get('alpha', 1.67326319217681884765625),
        gamma=node.attributes.get('gamma', 1.05070102214813232421875),
    )
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


class Clip(nn.Module, OnnxToTorchModule):
    """ONNX Clip-11+: bounds baked in when constant, else given to forward(); absent ones don't clip."""

    def __init__(self, min_val=None, max_val=None):
        super().__init__()
        self.min_val = min_val
        self.max_val = max_val

    def forward(
        self,
        input_tensor: torch.Tensor,
        min_val: Optional[torch.Tensor] = None,
        max_val: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        low = self.min_val if min_val is None else min_val
        high = self.max_val if max_val is None else max_val
        # clamp_min then clamp_max: each takes a scalar or a tensor (clamp wants both alike), and
        # min > max gives max everywhere, ONNX's rule
        out = input_tensor if low is None else torch.clamp_min(input_tensor, low)
        return out if high is None else torch.clamp_max(out, high)


@replace(
    'Clip', 11, 12, 13,
    reason='onnx2torch refuses a computed min/max and an absent min before a given max, and makes integer inputs float',
)
def _clip(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    inputs, bounds = [input_name(node, 0)], []
    for index in (1, 2):
        value = const_list(node, index, graph)
        bounds.append(None if value is None else value[0])
        inputs.append('' if value is not None else input_name(node, index))  # only runtime bounds are inputs
    return OperationConverterResult(torch_module=Clip(*bounds), onnx_mapping=mapping(node, inputs))


alias('Elu', (22,), 6)
alias('HardSigmoid', (22,), 6)
alias('HardSwish', (22,), 14)
alias('Softplus', (22,), 1)
alias('Softsign', (22,), 1)
