"""Attention-23 (new op): torch's exporter emits it for scaled_dot_product_attention at opset 23.

Follows the operator's reference pattern: optional KV cache concatenation, grouped/multi-query heads
(K/V heads repeated), 3-D inputs split into heads, ``scale``, ``softcap``, boolean or additive
``attn_mask`` plus causal masking offset by the KV-cache length (query i sees key j <= i + past),
``softmax_precision``, fully-masked query rows giving zeros (spec errata, as onnxruntime), and the
optional present_key/present_value/qk_matmul_output outputs.
"""

import math
from typing import Optional

import torch
from torch import nn

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult

from ._registry import mapping, register
from .cast import ONNX_TO_TORCH_DTYPE


class Attention(nn.Module, OnnxToTorchModule):
    """ONNX Attention-23."""

    def __init__(  # pylint: disable=too-many-arguments
        self,
        outputs: tuple,
        is_causal: int = 0,
        q_num_heads: Optional[int] = None,
        kv_num_heads: Optional[int] = None,
        qk_matmul_output_mode: int = 0,
        scale: Optional[float] = None,
        softcap: float = 0.0,
        softmax_precision: Optional[int] = None,
    ):
        super().__init__()
        self.present = tuple(bool(name) for name in outputs)  # which of the 4 outputs the node uses
        self.is_causal = bool(is_causal)
        self.q_num_heads = q_num_heads
        self.kv_num_heads = kv_num_heads
        self.qk_mode = qk_matmul_output_mode
        self.scale = scale
        self.softcap = softcap
        self.softmax_dtype = None if softmax_precision is None else ONNX_TO_TORCH_DTYPE[softmax_precision]

    def forward(  # pylint: disable=too-many-arguments, too-many-locals
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        past_key: Optional[torch.Tensor] = None,
        past_value: Optional[torch.Tensor] = None,
    ):
        three_d = query.dim() == 3
        if three_d:  # (B, S, H*D) -> (B, H, S, D)
            batch, q_len = query.shape[:2]
            query = query.reshape(batch, q_len, self.q_num_heads, -1).transpose(1, 2)
            key = key.reshape(batch, key.shape[1], self.kv_num_heads, -1).transpose(1, 2)
            value = value.reshape(batch, value.shape[1], self.kv_num_heads, -1).transpose(1, 2)
        past_len = 0
        if past_key is not None:
            past_len = past_key.shape[2]
            key = torch.cat([past_key, key], dim=2)
            value = torch.cat([past_value, value], dim=2)
        present_key, present_value = key, value

        q_heads, kv_heads = query.shape[1], key.shape[1]
        if q_heads != kv_heads:  # GQA / MQA: each K/V head serves q_heads // kv_heads query heads
            key = key.repeat_interleave(q_heads // kv_heads, dim=1)
            value = value.repeat_interleave(q_heads // kv_heads, dim=1)

        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(query.shape[-1])
        root = math.sqrt(scale)
        scores = torch.matmul(query * root, (key * root).transpose(-1, -2))
        qk_outputs = [scores]
        if self.softcap > 0:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        qk_outputs.append(scores)

        q_len, total_len = scores.shape[-2], scores.shape[-1]
        if self.is_causal:
            allowed = torch.ones(q_len, total_len, dtype=torch.bool, device=scores.device)
            # query i sees key j iff j <= i + past_len (offset by the cache, not by total - q_len)
            allowed = torch.tril(allowed, diagonal=past_len)
            scores = scores.masked_fill(~allowed, float('-inf'))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float('-inf'))
            else:
                scores = scores + attn_mask
        qk_outputs.append(scores)

        logits = scores if self.softmax_dtype is None else scores.to(self.softmax_dtype)
        probs = torch.softmax(logits, dim=-1)
        # a row with every key masked is -inf everywhere: softmax gives NaN, the spec wants zeros
        fully_masked = torch.isneginf(logits).all(dim=-1, keepdim=True)
        probs = torch.where(fully_masked, torch.zeros_like(probs), probs).to(value.dtype)
        qk_outputs.append(probs)

        output = torch.matmul(probs, value)
        if three_d:
            output = output.transpose(1, 2).reshape(output.shape[0], output.shape[2], -1)

        results = (output, present_key, present_value, qk_outputs[self.qk_mode].to(query.dtype))
        selected = tuple(r if used else None for r, used in zip(results, self.present))
        return selected[0] if len(self.present) == 1 else selected


@register('Attention', 23)
def _attention(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # pylint: disable=unused-argument
    attrs = node.attributes
    if attrs.get('qk_matmul_output_mode', 0) not in (0, 1, 2, 3):
        raise NotImplementedError('Attention qk_matmul_output_mode must be 0..3')
    module = Attention(
        outputs=node.output_values,
        is_causal=attrs.get('is_causal', 0),
        q_num_heads=attrs.get('q_num_heads'),
        kv_num_heads=attrs.get('kv_num_heads'),
        qk_matmul_output_mode=attrs.get('qk_matmul_output_mode', 0),
        scale=attrs.get('scale'),
        softcap=attrs.get('softcap', 0.0),
        softmax_precision=attrs.get('softmax_precision'),
    )
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping(node, node.input_values))
