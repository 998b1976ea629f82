"""Fitting students to the teacher on sample inputs, before they are trained: width students' cut
ops here; the pieces every family's refit shares (`teacher_and_feeds`, `spread`, `closest`) too.

Dropping channels removes what they added to the next weighted op (the *cut op*: the Conv, Gemm or
MatMul whose input rows were sliced). Two corrections, each measured on the teacher's own activations:

- **Compensation** (the weights): each dropped input channel is regressed on the kept ones over the
  sample (ridge least squares, centred), d ~ mean_d + (k - mean_k) A, and the dropped rows' weights
  are folded into the kept rows: W_kept += A W_dropped. What the dropped channels carried that the
  kept ones predict is then still delivered (channels after a ReLU are far from independent).
- **Bias**: what is still missing on average at each cut op's output (teacher minus student, in the
  order the ops run, each measured after the ones before it were corrected) goes into its bias
  (Conv, ConvTranspose, Gemm; a MatMul's following Add of a constant vector).

Both are judged on held-out inputs: of the plain student, the bias-corrected one and the
compensated one, the closest to the teacher there is kept (a correction can only help or be dropped).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx

from ndonnx.candidates.onnx_edit import add_array, attr, consumers, copy_model, fold_batchnorm, get_array, producers, set_array
from ndonnx.sample import ort_session, with_outputs

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # ridge strengths tried, relative to the kept channels' mean variance
MAX_ROWS = 65536  # rows (samples x positions) a regression reads at most, evenly spaced ...
MAX_VALUES = 32 << 20  # ... and at most this many values (rows x channels)


class Cut(NamedTuple):
    """A cut op: its output, its activation input and that input's channel axis, its weight in the
    BN-folded teacher with the axis its input channels are on, the input channels kept and dropped,
    and the output channels the student keeps (None: all)."""

    output: str
    input: str
    channel_axis: int
    weight: np.ndarray
    in_axis: int
    out_axis: int
    keep: np.ndarray
    drop: np.ndarray
    kept_out: np.ndarray | None


def cut_of(node: onnx.NodeProto, weight: np.ndarray, in_axis: int, keep: np.ndarray, size: int,
           kept_out: np.ndarray | None) -> Cut | None:
    """The cut of a weighted op whose weight (slot 1) loses input rows on `in_axis`; None for an op
    compensation does not handle (a Gemm reading its input transposed)."""
    op = node.op_type
    if op == "Gemm" and attr(node, "transA", 0):
        return None
    channel_axis = -1 if op == "MatMul" else 1
    out_axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": weight.ndim - 1,
                "Gemm": 0 if attr(node, "transB", 0) else 1}.get(op)
    if out_axis is None or out_axis == in_axis:
        return None
    return Cut(node.output[0], node.input[0], channel_axis, weight, in_axis, out_axis, keep,
               np.setdiff1d(np.arange(size), keep), kept_out)


def refitter(student: onnx.ModelProto, sub: onnx.ModelProto, cuts: list[Cut]):
    """`refit(fit, check)` for `Student.refit`: the student corrected on the inputs `fit` and judged
    on `check` (see the module's doc). Pure: returns a new model or `student`."""

    def refit(fit: dict[str, np.ndarray], check: dict[str, np.ndarray]) -> onnx.ModelProto:
        folded, fit, check = teacher_and_feeds(sub, fit, check)
        order = sorted(cuts, key=lambda c: producers(student)[c.output])  # the order the ops run
        seen = list(dict.fromkeys([c.output for c in order] + [c.input for c in order]))
        t_fit = dict(zip(seen, ort_session(with_outputs(folded, seen)).run(seen, fit)))
        variants = []
        for compensate in (False, True):
            model = copy_model(student)
            if compensate and not any([_compensate(model, c, t_fit[c.input]) for c in order]):
                continue
            for c in order:
                _shift_bias(model, c, t_fit[c.output], fit)
            variants.append(model)
        return closest(folded, check, [student, *variants])

    return refit


def teacher_and_feeds(sub: onnx.ModelProto, fit: dict, check: dict) -> tuple[onnx.ModelProto, dict, dict]:
    """The BN-folded teacher (as students are cut from it) and the feeds of its inputs."""
    folded = fold_batchnorm(sub)
    ins = {i.name for i in folded.graph.input}
    fit, check = ({k: np.ascontiguousarray(v) for k, v in f.items() if k in ins} for f in (fit, check))
    return folded, fit, check


def spread(rows: np.ndarray) -> np.ndarray:
    """At most MAX_ROWS rows and MAX_VALUES values of `rows`, evenly spaced (in their order)."""
    most = max(1, min(MAX_ROWS, MAX_VALUES // rows.shape[1]))
    return rows[np.linspace(0, len(rows) - 1, most).astype(int)] if len(rows) > most else rows


def closest(teacher: onnx.ModelProto, check: dict, models: list[onnx.ModelProto]) -> onnx.ModelProto:
    """Of `models` (the unfitted student first), the one closest to the teacher on `check`: summed
    squared error of the outputs; the first wins a tie."""
    outs = [o.name for o in teacher.graph.output]
    want = ort_session(teacher).run(outs, check)

    def err(model: onnx.ModelProto) -> float:
        got = ort_session(model).run(outs, check)
        return sum(float(((g.astype(np.float64) - w) ** 2).sum()) for g, w in zip(got, want))

    errors = [err(m) for m in models]
    return models[int(np.argmin(errors))]


def _compensate(model: onnx.ModelProto, cut: Cut, x: np.ndarray) -> bool:
    """Fold the dropped input rows into the kept ones, W_kept += A W_dropped, with A the ridge
    regression of the dropped channels of `x` (the teacher's input to the op) on the kept ones, and
    what the regression's constant carries into the bias. False where nothing changed (no dropped
    channel, too few rows, no bias to take the constant, a weight of another shape)."""
    if not len(cut.drop) or not np.issubdtype(x.dtype, np.floating) or x.shape[cut.channel_axis] != len(cut.keep) + len(cut.drop):
        return False
    rows = spread(np.moveaxis(x, cut.channel_axis, -1).reshape(-1, x.shape[cut.channel_axis]))  # sample-major
    if len(rows) < 4 * len(cut.keep):  # too few rows for this many unknowns: the fit would follow the sample
        return False
    w_drop = np.take(cut.weight, cut.drop, axis=cut.in_axis).astype(np.float64)
    if cut.kept_out is not None:
        w_drop = np.take(w_drop, cut.kept_out, axis=cut.out_axis)
    a, mean = _regress(rows.astype(np.float32), cut.keep, cut.drop, np.moveaxis(w_drop, cut.in_axis, 0))
    extra = np.moveaxis(np.tensordot(a, np.moveaxis(w_drop, cut.in_axis, 0), axes=(1, 0)), 0, cut.in_axis)
    node = model.graph.node[producers(model)[cut.output]]
    w = get_array(model, node.input[1])
    if w is None or w.shape != extra.shape:
        return False
    # d ~ const + k A with const = mean_d - mean_k A: the constant reaches the output through the dropped
    # weights (summed over a kernel's taps: exact away from a padded border)
    const = mean[cut.drop] - mean[cut.keep] @ a
    out = cut.out_axis - (cut.out_axis > cut.in_axis)
    through = np.tensordot(const, np.moveaxis(w_drop, cut.in_axis, 0), axes=(0, 0))
    if not add_to_bias(model, cut.output, through.sum(axis=tuple(i for i in range(through.ndim) if i != out))):
        return False
    new = (w.astype(np.float64) + extra).astype(w.dtype)
    if len(consumers(model).get(node.input[1], [])) > 1:
        node.input[1] = add_array(model, f"{node.input[1]}_c", new)
    else:
        set_array(model, node.input[1], new)
    return True


def _regress(rows: np.ndarray, keep: np.ndarray, drop: np.ndarray, w_drop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A [kept, dropped] and the channel means: ridge regression of the dropped channels on the kept
    ones, centred. The ridge is chosen among RIDGES on the last quarter of the rows (later samples),
    fitted on the rest, by the error the residual makes through the dropped weights (`w_drop`,
    dropped channels first), then refitted on every row. Products are taken once per part: each
    ridge costs a solve of the kept channels' size."""
    mean = rows.mean(axis=0, dtype=np.float64)
    rows = rows - mean.astype(rows.dtype)
    m = w_drop.reshape(len(drop), -1)
    m = m @ m.T  # a residual r costs r M r^T at the output (taps' cross terms aside)
    split = len(rows) * 3 // 4
    parts = []
    for part in (rows[:split], rows[split:]):
        k, d = part[:, keep].astype(np.float64), part[:, drop].astype(np.float64)
        parts.append((k.T @ k, k.T @ d, d.T @ d))
    (g_fit, c_fit, _), (g_val, c_val, d_val) = parts

    def solve(gram: np.ndarray, cross: np.ndarray, ridge: float) -> np.ndarray:
        scale = max(float(np.trace(gram)) / len(keep), 1e-12)
        return np.linalg.solve(gram + ridge * scale * np.eye(len(keep)), cross)

    def cost(a: np.ndarray) -> float:  # sum over the held rows of r M r^T, r = d - k a
        rr = d_val - a.T @ c_val - c_val.T @ a + a.T @ g_val @ a
        return float(np.sum(rr * m))

    ridge = min(RIDGES, key=lambda lam: cost(solve(g_fit, c_fit, lam)))
    return solve(g_fit + g_val, c_fit + c_val, ridge), mean


def _shift_bias(model: onnx.ModelProto, cut: Cut, teacher_out: np.ndarray, fit: dict) -> bool:
    """Add to the cut op's bias what its output still lacks on average against the teacher's."""
    if teacher_out.ndim < 2 or not np.issubdtype(teacher_out.dtype, np.floating):
        return False
    got = ort_session(with_outputs(model, [cut.output])).run([cut.output], fit)[0]
    want = teacher_out if cut.kept_out is None else np.take(teacher_out, cut.kept_out, axis=cut.channel_axis)
    if want.shape != got.shape:
        return False
    axis = cut.channel_axis % got.ndim
    shift = (want.astype(np.float64) - got).mean(axis=tuple(a for a in range(got.ndim) if a != axis))
    return add_to_bias(model, cut.output, shift)


def add_to_bias(model: onnx.ModelProto, name: str, shift: np.ndarray) -> bool:
    """Add `shift` (one value per output channel) to the bias of the op making `name`: its bias input
    (made when absent), or for a MatMul the constant vector of the Add reading it. False if none."""
    nodes = model.graph.node
    node = nodes[producers(model)[name]]
    if node.op_type == "MatMul":
        readers = consumers(model).get(name, [])
        add = nodes[readers[0][0]] if len(readers) == 1 else None
        if add is None or add.op_type != "Add":
            return False
        slot = 1 - readers[0][1]
        if add.input[slot] not in {t.name for t in model.graph.initializer}:
            return False
        node, bias_slot = add, slot
    elif node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        bias_slot = 2
        if node.op_type == "Gemm" and attr(node, "beta", 1.0) != 1.0:
            return False
    else:
        return False
    if len(node.input) <= bias_slot or not node.input[bias_slot]:
        while len(node.input) < bias_slot:
            node.input.append("")
        node.input.append(add_array(model, f"{name}_bias", np.zeros(len(shift), np.float32)))
    bias = get_array(model, node.input[bias_slot])
    if bias.shape != shift.shape:
        return False
    new = (bias.astype(np.float64) + shift).astype(bias.dtype)
    if len(consumers(model).get(node.input[bias_slot], [])) > 1:
        node.input[bias_slot] = add_array(model, f"{node.input[bias_slot]}_b", new)
    else:
        set_array(model, node.input[bias_slot], new)
    return True
