"""sparse:s - the teacher's graph (BatchNormalization folded into the Conv before it, as in every
student) with a target sparsity s: the fraction of zeros each weight of a weighted op (Conv,
ConvTranspose, Gemm, MatMul; more than one element; biases and other constants excluded) ends with.

The student starts from the dense teacher weights; the trainer ramps the sparsity up with the
Zhu & Gupta (2017) schedule `zhu_gupta` and applies per-tensor magnitude masks `magnitude_masks`
(the paper, appendix A: polynomial ramp for half of the steps, then held).
`params` counts dense weights; `nonzero` the non-zeros the weights will hold at the target.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from ndonnx.candidates.base import CandidateSpec, NotApplicable, Student, register
from ndonnx.candidates.onnx_edit import WEIGHTED_OPS, finish, fold_batchnorm
from ndonnx.graph import weight_counts


def zhu_gupta(step: int, total_steps: int, s_final: float, s_init: float = 0.0, begin: int = 0,
              end: int | None = None) -> float:
    """Sparsity at `step`: s_init before `begin`, then the cubic ramp
    s_f + (s_i - s_f) * (1 - (step - begin) / (end - begin))**3, s_final from `end` (default
    total_steps) on."""
    end = total_steps if end is None else end
    if step <= begin:
        return float(s_init)
    if step >= end or end <= begin:
        return float(s_final)
    frac = (step - begin) / (end - begin)
    return float(s_final + (s_init - s_final) * (1.0 - frac) ** 3)


def pruned_count(n: int, sparsity: float) -> int:
    """How many of n weights a tensor at `sparsity` has zeroed (rounded half up)."""
    return min(n, max(0, int(math.floor(sparsity * n + 0.5 + 1e-9))))


def magnitude_masks(weights: dict, sparsity: float) -> dict:
    """Per-tensor magnitude pruning: for each tensor, a bool mask (True = keep) that zeroes the
    pruned_count(size, sparsity) smallest |w| (ties: the lower flat index goes first). Masks are
    numpy arrays for numpy weights, torch tensors on the weight's device for torch weights."""
    masks = {}
    for name, w in weights.items():
        if isinstance(w, np.ndarray):
            k = pruned_count(w.size, sparsity)
            order = np.argsort(np.abs(w).reshape(-1), kind="stable")
            mask = np.ones(w.size, dtype=bool)
            mask[order[:k]] = False
            masks[name] = mask.reshape(w.shape)
        else:
            import torch

            k = pruned_count(w.numel(), sparsity)
            order = torch.argsort(w.detach().abs().reshape(-1), stable=True)
            mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
            mask[order[:k]] = False
            masks[name] = mask.reshape(w.shape)
    return masks


def prunable_weights(model: onnx.ModelProto) -> list[str]:
    """Initializers read as the weight of a weighted op (MatMul: either constant operand)."""
    counts = weight_counts(model)
    out: list[str] = []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or node.domain not in ("", "ai.onnx"):
            continue
        slots = node.input[:2] if node.op_type == "MatMul" else node.input[1:2]
        out += [n for n in slots if n in counts and n not in out]
    return out


@register("sparse", values=(0.0, 1.0, True, False))
def generate(sub: onnx.ModelProto, spec: CandidateSpec) -> Student:
    s = float(spec.value)
    model = fold_batchnorm(sub)
    model = finish(sub, model, str(spec))
    counts = weight_counts(model)
    prunable = prunable_weights(model)
    if not prunable:
        raise NotApplicable("no Conv/Gemm/MatMul weight to sparsify")
    params = sum(counts.values())
    nonzero = params - sum(pruned_count(counts[n], s) for n in prunable)
    return Student(spec, model, params, nonzero, sparsity=s, prunable=tuple(prunable))
