"""lowrank:r - factor each weighted op (and embedding table) into two of rank
R = max(1, round(r * min(out, in*k*k))), rounded as `scaled` rounds (to a multiple with `@N`).

- Conv (group 1, any kernel) -> Conv with the same kernel, strides, pads and dilations to R
  channels, then a 1x1 Conv back to `out` channels carrying the bias.
- Gemm -> MatMul (or Gemm with transA) to R, then Gemm with the original C, alpha and beta.
- MatMul with a constant 2-D weight -> two MatMuls.
- Gather of a constant 2-D float table [V, D] on axis 0 (an embedding lookup of token ids) ->
  Gather of A [V, R] then MatMul by B [R, D], R = round(r * min(V, D)); the ids stay the input.
  It trades parameters for compute: one R x D product per looked-up row, where the teacher only
  copied rows. Skipped when the table is also read by another op of the neighbourhood (tied
  weights: the table would stay, so nothing would be saved).

Initialised by truncated SVD, W = U S V^T with sqrt(S) given to both factors, so a full-rank
factorisation reproduces the teacher. With sample inputs (`Student.refit`, from the run's cache) the
factors are refitted to what the op's inputs reach (activation-aware SVD, `_refitter`): kept where
that comes closer to the teacher on other samples. An op is factored only when that saves parameters
(R * (in*k*k + out) < out * in*k*k; for a table R * (V + D) < V * D); refused: grouped and depthwise Convs (already cheap, and the
factor would need per-group SVDs), ConvTranspose, MatMuls of two activations (attention scores),
MatMuls whose constant is the left operand. A BatchNormalization right after a Conv is folded in
first, so the factorisation covers the folded weight.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper

from ndonnx.candidates.base import CandidateSpec, NotApplicable, Student, register, scaled
from ndonnx.graph import onnx_opset
from ndonnx.candidates.refit import MAX_ROWS, MAX_VALUES, closest, spread, teacher_and_feeds
from ndonnx.sample import ort_session, with_outputs
from ndonnx.candidates.onnx_edit import (add_array, add_value_info, attr, consumers, copy_model, finish,
                                         fold_batchnorm, get_array, names_in_use, param_count, set_array, shapes,
                                         unique_name)

CONV_ATTRS = ("kernel_shape", "strides", "pads", "dilations", "auto_pad")


def _svd_factors(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """w [m, n] ~= a [m, rank] @ b [rank, n] = U_R sqrt(S_R) . sqrt(S_R) V_R^T, the truncated SVD.

    Computed from the eigen-decomposition of the Gram matrix of the smaller side, in float64:
    on a busy 2-core machine np.linalg.svd of a 512 x 4608 conv weight took 14 s, this 0.2 s.
    a @ b is the projection of w onto its top-`rank` singular subspace (w itself at full rank)."""
    w64 = np.asarray(w, np.float64)
    tall = w64.shape[0] > w64.shape[1]
    m = w64.T if tall else w64  # [small, large]
    vals, vecs = np.linalg.eigh(m @ m.T)
    order = np.argsort(vals)[::-1][:rank]
    s = np.sqrt(np.clip(vals[order], 0.0, None))  # singular values
    u = vecs[:, order]  # left singular vectors of m
    root = np.sqrt(s)
    safe = np.where(root > 1e-12 * max(root.max(initial=0.0), 1e-300), root, np.inf)
    left, right = u * root, (u.T @ m) / safe[:, None]  # m ~= left @ right
    a, b = (right.T, left.T) if tall else (left, right)
    return a.astype(w.dtype), b.astype(w.dtype)


def factor(sub: onnx.ModelProto, r: float, only_if_smaller: bool = True,
           multiple: int = 1) -> tuple[onnx.ModelProto, list[str]]:
    """The rank-r student and the names of the factored nodes (possibly none).
    only_if_smaller=False factors every supported op (tests: full rank reproduces the teacher)."""
    model, factored, _ = _factor(sub, r, only_if_smaller, multiple)
    return model, factored


def _factor(sub: onnx.ModelProto, r: float, only_if_smaller: bool = True,
            multiple: int = 1) -> tuple[onnx.ModelProto, list[str], list[Factored]]:
    """`factor`, and what `refit` needs of each factored weight."""
    model = fold_batchnorm(sub)
    g = model.graph
    taken = names_in_use(model)
    dims = shapes(model)
    inits = {t.name for t in g.initializer}
    readers = {name: len(slots) for name, slots in consumers(model).items()}
    new_nodes: list[onnx.NodeProto] = []
    factored: list[str] = []
    fits: list[Factored] = []

    def fresh(base: str) -> str:
        return unique_name(taken, base)

    for idx, node in enumerate(g.node):
        plan = _plan(model, node, inits, dims, r, multiple, readers)
        if plan is None or (only_if_smaller and plan[0] * (plan[1] + plan[2]) >= plan[1] * plan[2]):
            new_nodes.append(node)
            continue
        label = node.name or f"{node.op_type}_{idx}"
        mid = fresh(f"{node.output[0]}_lowrank")
        made = _factor_node(model, node, plan, mid, label, fresh, taken)
        if node.op_type != "Gather":  # (an embedding's input is ids: nothing to weigh it by)
            kept = onnx.NodeProto()
            kept.CopyFrom(node)  # (the graph's nodes are replaced below)
            fits.append(Factored(kept, made[0].input[1], made[1].input[1], get_array(model, node.input[1])))
        new_nodes.extend(made)
        factored.append(label)
        rank = plan[0]
        axis = 1 if node.op_type in ("Conv", "Gemm") else len(dims.get(node.output[0], [0, 0])) - 1
        add_value_info(model, node.output[0], mid, axis, rank)
    del g.node[:]
    g.node.extend(new_nodes)
    return model, factored, fits


def _plan(model, node, inits, dims, r, multiple=1, readers=None) -> tuple[int, int, int] | None:
    """(rank, in*k*k, out) when the op can be factored; for an embedding table (rank, V, D)."""
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    if node.op_type == "Gather":
        table = embedding_table(model, node, inits)
        if table is None or (readers or {}).get(node.input[0], 1) > 1:
            return None
        v, d = table.shape
        return scaled(min(v, d), r, multiple), int(v), int(d)
    if node.input[1] not in inits:
        return None
    w = get_array(model, node.input[1])
    if node.op_type == "Conv":
        if attr(node, "group", 1) != 1 or w.ndim < 3 or node.input[0] in inits:
            return None
        out, fan_in = w.shape[0], int(np.prod(w.shape[1:]))
    elif node.op_type == "Gemm":
        if w.ndim != 2 or node.input[0] in inits:
            return None
        fan_in, out = w.shape[::-1] if attr(node, "transB", 0) else w.shape
        if attr(node, "transA", 0) and model.opset_import and onnx_opset(model) < 11:  # C optional from 11
            return None
    elif node.op_type == "MatMul":
        if w.ndim != 2 or node.input[0] in inits or len(dims.get(node.input[0], [])) < 2:
            return None
        fan_in, out = w.shape
    else:
        return None
    return scaled(min(out, fan_in), r, multiple), int(fan_in), int(out)


def embedding_table(model: onnx.ModelProto, node: onnx.NodeProto, inits: set[str]) -> np.ndarray | None:
    """The table of an embedding lookup: a Gather on axis 0 of a constant 2-D float initializer,
    indexed by a tensor that is not constant. None for any other node."""
    if (node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) < 2
            or node.input[0] not in inits or node.input[1] in inits or attr(node, "axis", 0) not in (0, -2)):
        return None
    table = get_array(model, node.input[0])
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
        return None
    return table


def _factor_node(model, node, plan, mid, label, fresh, taken) -> list[onnx.NodeProto]:
    rank = plan[0]
    if node.op_type == "Gather":  # table [V, D] ~= a [V, R] @ b [R, D]: look up rows of a, then times b
        w = get_array(model, node.input[0])
        a_mat, b_mat = _svd_factors(w, rank)
        name_a, name_b = fresh(f"{label}/lowrank_a"), fresh(f"{label}/lowrank_b")
        wa = add_array(model, f"{node.input[0]}_a", a_mat, taken)
        wb = add_array(model, f"{node.input[0]}_b", b_mat, taken)
        return [helper.make_node("Gather", [wa, node.input[1]], [mid], name=name_a, axis=0),
                helper.make_node("MatMul", [mid, wb], list(node.output), name=name_b)]
    w = get_array(model, node.input[1])
    name_a, name_b = fresh(f"{label}/lowrank_a"), fresh(f"{label}/lowrank_b")
    if node.op_type == "Conv":
        b_mat, a_mat = _svd_factors(w.reshape(w.shape[0], -1), rank)  # [out, R], [R, in*k*k]
        wa = add_array(model, f"{node.input[1]}_a", a_mat.reshape(rank, *w.shape[1:]), taken)
        wb = add_array(model, f"{node.input[1]}_b", b_mat.reshape(w.shape[0], rank, *[1] * (w.ndim - 2)), taken)
        kw = {a: attr(node, a) for a in CONV_ATTRS if attr(node, a) is not None}
        first = helper.make_node("Conv", [node.input[0], wa], [mid], name=name_a, **kw)
        second = helper.make_node("Conv", [mid, wb, *node.input[2:3]], list(node.output), name=name_b,
                                  kernel_shape=[1] * (w.ndim - 2))
        return [first, second]
    if node.op_type == "Gemm":
        trans_b = attr(node, "transB", 0)
        a_mat, b_mat = _svd_factors(w.T if trans_b else w, rank)  # [in, R], [R, out]
        wa = add_array(model, f"{node.input[1]}_a", a_mat, taken)
        wb = add_array(model, f"{node.input[1]}_b", b_mat.T if trans_b else b_mat, taken)
        if attr(node, "transA", 0):
            first = helper.make_node("Gemm", [node.input[0], wa], [mid], name=name_a, transA=1)
        else:
            first = helper.make_node("MatMul", [node.input[0], wa], [mid], name=name_a)
        kw = {a: attr(node, a) for a in ("alpha", "beta") if attr(node, a) is not None}
        second = helper.make_node("Gemm", [mid, wb, *node.input[2:3]], list(node.output), name=name_b,
                                  transB=trans_b, **kw)
        return [first, second]
    a_mat, b_mat = _svd_factors(w, rank)  # MatMul: [in, R], [R, out]
    wa = add_array(model, f"{node.input[1]}_a", a_mat, taken)
    wb = add_array(model, f"{node.input[1]}_b", b_mat, taken)
    return [helper.make_node("MatMul", [node.input[0], wa], [mid], name=name_a),
            helper.make_node("MatMul", [mid, wb], list(node.output), name=name_b)]


@register("lowrank", values=(0.0, 1.0, False, True))
def generate(sub: onnx.ModelProto, spec: CandidateSpec) -> Student:
    model, factored, fits = _factor(sub, float(spec.value), multiple=spec.multiple)
    if not factored:
        raise NotApplicable(f"no Conv/Gemm/MatMul weight or embedding table where rank {spec.value:g} saves parameters")
    model = finish(sub, model, str(spec))
    n = param_count(model)
    return Student(spec, model, n, n, refit=_refitter(model, sub, fits) if fits else None)


class Factored(NamedTuple):
    """A factored op of the BN-folded teacher (its node as it was, its weight) and the names of its
    two factors in the student."""

    node: onnx.NodeProto
    first: str
    second: str
    weight: np.ndarray


MAX_FAN_IN = 2304  # inputs (in x kernel taps) a data-aware factorisation takes at most (a 256 x 3 x 3 conv)


def _refitter(student: onnx.ModelProto, sub: onnx.ModelProto, fits: list[Factored]):
    """`refit(fit, check)` for `Student.refit`: each factorisation weighted by the inputs the op sees.
    The SVD minimises ||W - A B||; what matters is ||X W - X A B|| over the op's inputs X (im2col
    patches for a Conv). With X^T X = S S^T that is ||S^T (W - A B)||: the truncated SVD of S^T W,
    mapped back by S^-T (activation-aware SVD; S from the eigen-decomposition of X^T X plus a ridge,
    chosen on held-out rows). Kept where closer to the teacher on `check` than the plain SVD's."""

    def refit(fit: dict[str, np.ndarray], check: dict[str, np.ndarray]) -> onnx.ModelProto:
        folded, fit, check = teacher_and_feeds(sub, fit, check)
        ins = list(dict.fromkeys(f.node.input[0] for f in fits))
        x = dict(zip(ins, ort_session(with_outputs(folded, ins)).run(ins, fit)))
        model, changed = copy_model(student), False
        for f in fits:
            rows = _rows(f.node, x[f.node.input[0]], f.weight.shape)
            if rows is not None:
                changed |= _weighted_factors(model, f, rows)
        return closest(folded, check, [student, model]) if changed else student

    return refit


def _rows(node: onnx.NodeProto, x: np.ndarray, w_shape: tuple) -> np.ndarray | None:
    """The op's inputs as rows of its fan-in (a Conv's im2col patches, channel-major like its weight
    rows), evenly subsampled (`refit.spread`); None where not handled (a Conv other than 2-D, auto_pad,
    a transposed Gemm input) or too wide (MAX_FAN_IN)."""
    import torch

    if node.op_type == "Conv":
        if x.ndim != 4 or attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None
        k = tuple(w_shape[2:])
        fan_in = x.shape[1] * int(np.prod(k))
        if fan_in > MAX_FAN_IN:
            return None
        top, left, bottom, right = attr(node, "pads") or [0, 0, 0, 0]
        t = torch.nn.functional.pad(torch.from_numpy(np.ascontiguousarray(x, np.float32)), (left, right, top, bottom))
        per = max(1, min(MAX_VALUES // fan_in, MAX_ROWS) // max(1, _positions(node, x.shape, k)))
        t = t[np.linspace(0, len(t) - 1, min(len(t), per)).astype(int)]
        cols = torch.nn.functional.unfold(t, k, dilation=tuple(attr(node, "dilations") or (1, 1)),
                                          stride=tuple(attr(node, "strides") or (1, 1)))  # [N, fan_in, L]
        rows = cols.transpose(1, 2).reshape(-1, fan_in).numpy()
    elif node.op_type in ("MatMul", "Gemm"):
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            return None
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[1] > MAX_FAN_IN:
            return None
    else:
        return None
    rows = spread(rows)
    return np.asarray(rows, np.float32) if len(rows) >= 2 * rows.shape[1] else None


def _positions(node: onnx.NodeProto, shape: tuple, k: tuple) -> int:
    """Output positions per sample of a 2-D Conv (for sizing how many samples to unfold)."""
    pads = attr(node, "pads") or [0, 0, 0, 0]
    strides, dil = attr(node, "strides") or (1, 1), attr(node, "dilations") or (1, 1)
    return int(np.prod([(shape[2 + i] + pads[i] + pads[i + 2] - dil[i] * (k[i] - 1) - 1) // strides[i] + 1
                        for i in range(2)]))


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)  # relative to the mean input energy per fan-in entry


def _weighted_factors(model: onnx.ModelProto, f: Factored, rows: np.ndarray) -> bool:
    """Write the activation-aware factors of `f` into `model`'s two factor weights; False if the
    shapes do not match (nothing written)."""
    node = f.node
    w = f.weight.astype(np.float64)
    if node.op_type == "Conv":
        w = w.reshape(w.shape[0], -1).T  # [fan_in, out]
    elif node.op_type == "Gemm" and attr(node, "transB", 0):
        w = w.T
    first, second = get_array(model, f.first), get_array(model, f.second)
    rank = first.shape[0] if node.op_type == "Conv" else first.shape[1]
    split = len(rows) * 3 // 4
    grams = [r.T @ r for r in (rows[:split].astype(np.float64), rows[split:].astype(np.float64))]
    vals, vecs = np.linalg.eigh(grams[0])
    scale = max(float(vals.sum()) / len(vals), 1e-12)

    def factors(vals, vecs, ridge):
        root = np.sqrt(np.clip(vals, 0, None) + ridge * scale)
        a, b = _svd_factors((root[:, None] * (vecs.T @ w)), rank)  # S^T W ~ a b, S = Q root
        return vecs @ (a / root[:, None]), b  # A = S^-T a

    def cost(ab):
        e = w - ab[0] @ ab[1]
        return float(np.sum(e * (grams[1] @ e)))

    ridge = min(RIDGES, key=lambda lam: cost(factors(vals, vecs, lam)))
    vals, vecs = np.linalg.eigh(grams[0] + grams[1])
    a, b = factors(vals, vecs, ridge)  # [fan_in, R], [R, out]
    # balanced like the plain SVD's sqrt(S) split: each component's column of A and row of B of one norm
    c = np.sqrt(np.linalg.norm(b, axis=1) / np.maximum(np.linalg.norm(a, axis=0), 1e-30))
    a, b = a * c, b / np.maximum(c, 1e-30)[:, None]
    if node.op_type == "Conv":
        a, b = a.T.reshape(first.shape), b.T.reshape(second.shape)
    elif node.op_type == "Gemm" and attr(node, "transB", 0):
        b = b.T
    if a.shape != first.shape or b.shape != second.shape:
        return False
    set_array(model, f.first, a.astype(first.dtype))
    set_array(model, f.second, b.astype(second.dtype))
    return True
