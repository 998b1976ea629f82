"""LSTM-7/14/22 and GRU-7/14/22 (onnx2torch has neither) on torch's own recurrent kernels.

W, R and B stay in ONNX's layout as module inputs: initializers become onnx2torch buffers, which
``ndonnx.trainable`` binds one to one (it turns them into parameters and writes them back by name),
so training needs no reverse mapping. Each forward reorders the gate blocks for torch (ONNX's LSTM
order is i, o, f, c and torch's i, f, c, o; GRU z, r, h and r, z, h) and runs ``torch.lstm`` /
``torch.gru``, the kernels behind ``nn.LSTM`` / ``nn.GRU``, once per direction ('reverse' runs
the flipped sequence). Gradients reach W, R and B through the reordering.

torch's GRU is ONNX's ``linear_before_reset=1``; ONNX's default 0 (the reset gate scales the hidden
state before its matmul) runs a per-step loop here. Layout 1 (batch first, opset 14) is transposed.

Refused at conversion: activations other than the defaults, ``clip``, ``input_forget``, peepholes
(LSTM's P) unless all zero, and constant ``sequence_lens`` that differ. A runtime ``sequence_lens``
shorter than the sequence is refused when the module runs (torch's kernels have no per-sequence
length outside packed sequences).
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult

from ._registry import const_list, input_name, mapping, register

_DEFAULT_ACTIVATIONS = {'LSTM': ['sigmoid', 'tanh', 'tanh'], 'GRU': ['sigmoid', 'tanh']}
# torch's gate blocks, as indices of ONNX's
_TORCH_GATES = {'LSTM': [0, 2, 3, 1], 'GRU': [1, 0, 2]}


def _gru_reset_before(x: torch.Tensor, h: torch.Tensor, params: List[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """GRU with ``linear_before_reset=0``, one direction, in torch's gate order (r, z, n)."""
    w_ih, w_hh, *biases = params
    hidden = w_hh.shape[1]
    b_ih, b_hh = biases or (None, None)
    b_rz, b_n = (None, None) if b_hh is None else (b_hh[: 2 * hidden], b_hh[2 * hidden :])
    projected = F.linear(x, w_ih, b_ih)  # every time step at once
    h = h[0]
    ys = []
    for step in projected:
        r, z = torch.sigmoid(step[:, : 2 * hidden] + F.linear(h, w_hh[: 2 * hidden], b_rz)).chunk(2, dim=1)
        n = torch.tanh(step[:, 2 * hidden :] + F.linear(r * h, w_hh[2 * hidden :], b_n))
        h = (1 - z) * n + z * h
        ys.append(h)
    return torch.stack(ys), h[None]


class Recurrent(nn.Module, OnnxToTorchModule):
    """ONNX LSTM or GRU: forward(X, W, R, B, sequence_lens, initial_h, initial_c) -> Y, Y_h, Y_c."""

    def __init__(self, op_type: str, direction: str, layout: int, outputs: int, linear_before_reset: int = 0):
        super().__init__()
        self.op_type = op_type
        self.reversed = {'forward': [False], 'reverse': [True], 'bidirectional': [False, True]}[direction]
        self.layout = layout
        self.outputs = outputs
        self.linear_before_reset = linear_before_reset

    def _to_torch(self, tensor: torch.Tensor) -> torch.Tensor:
        gates = _TORCH_GATES[self.op_type]
        return tensor.unflatten(0, (len(gates), -1))[gates].flatten(0, 1)

    def _run(self, x: torch.Tensor, states: List[torch.Tensor], params: List[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        has_biases = len(params) == 4
        # train only builds what the backward pass needs (cuDNN refuses backward otherwise); dropout is 0
        train = torch.is_grad_enabled()
        if self.op_type == 'LSTM':
            return torch.lstm(x, states, params, has_biases, 1, 0.0, train, False, False)
        if self.linear_before_reset:
            return torch.gru(x, states[0], params, has_biases, 1, 0.0, train, False, False)
        return _gru_reset_before(x, states[0], params)

    def forward(  # pylint: disable=too-many-arguments
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        r: torch.Tensor,
        b: Optional[torch.Tensor] = None,
        sequence_lens: Optional[torch.Tensor] = None,
        initial_h: Optional[torch.Tensor] = None,
        initial_c: Optional[torch.Tensor] = None,
    ):
        states = [initial_h, initial_c] if self.op_type == 'LSTM' else [initial_h]
        if self.layout:  # batch first: run sequence first
            x = x.transpose(0, 1)
            states = [None if s is None else s.transpose(0, 1) for s in states]
        if sequence_lens is not None and bool((sequence_lens != x.shape[0]).any()):
            raise NotImplementedError(f'{self.op_type} with sequence_lens shorter than the sequence is not implemented')
        zeros = x.new_zeros(len(self.reversed), x.shape[1], r.shape[-1])
        states = [zeros if s is None else s for s in states]

        ys, finals = [], []
        for d, backward in enumerate(self.reversed):
            biases = () if b is None else b[d].chunk(2)
            params = [self._to_torch(t) for t in (w[d], r[d], *biases)]
            y, *final = self._run(x.flip(0) if backward else x, [s[d : d + 1] for s in states], params)
            ys.append(y.flip(0) if backward else y)
            finals.append(final)
        y = torch.stack(ys, dim=1)  # [seq, num_directions, batch, hidden]
        finals = [torch.cat(f) for f in zip(*finals)]  # [num_directions, batch, hidden] each
        if self.layout:
            y = y.permute(2, 0, 1, 3)
            finals = [f.transpose(0, 1) for f in finals]
        out = (y, *finals)[: self.outputs]
        return out[0] if self.outputs == 1 else out


def _refuse_unsupported(node: OnnxNode, graph: OnnxGraph) -> None:
    attrs, op_type = node.attributes, node.operation_type
    default = _DEFAULT_ACTIVATIONS[op_type]
    activations = [a.lower() for a in attrs.get('activations', default)]
    if activations != default * (len(activations) // len(default)):  # the defaults, once per direction
        raise NotImplementedError(f'{op_type} activations {attrs["activations"]} are not implemented (defaults only)')
    if 'clip' in attrs:
        raise NotImplementedError(f'{op_type} clip is not implemented')
    if attrs.get('input_forget', 0):
        raise NotImplementedError('LSTM input_forget=1 is not implemented')
    peepholes = const_list(node, 7, graph)
    if input_name(node, 7) and (peepholes is None or any(peepholes)):
        raise NotImplementedError('LSTM peepholes (input P) are not implemented')
    lengths = const_list(node, 4, graph)
    if lengths and len(set(lengths)) > 1:
        raise NotImplementedError(f'{op_type} with sequence_lens shorter than the sequence is not implemented')


@register('LSTM', 7, 14, 22)
@register('GRU', 7, 14, 22)
def _recurrent(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    _refuse_unsupported(node, graph)
    attrs = node.attributes
    module = Recurrent(
        node.operation_type,
        attrs.get('direction', 'forward'),
        attrs.get('layout', 0),
        len(node.output_values),
        linear_before_reset=attrs.get('linear_before_reset', 0),  # GRU only
    )
    inputs = [input_name(node, i) for i in range(7)]  # P (7) is refused unless zero; GRU has 6
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping(node, inputs))
