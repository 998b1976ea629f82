"""Validation: onnx.checker, then the student against the teacher in onnxruntime on held-out data,
and the student's own torch-vs-onnxruntime consistency (skipped, with a note, where torch is not
installed: this module imports torch only for that check)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import onnx

from ndonnx.files import file_size
from ndonnx.graph import weight_counts
from ndonnx.metrics import metric_name, rel_err, score_outputs
from ndonnx.sample import ort_session, run_chunked


LATENCY_BATCH = 64  # samples per timed run of the latency ratio, at most ...
RUN_SECONDS = 0.1  # ... and fewer where one run of the teacher would take longer than this


def _latency_ratio(student: onnx.ModelProto, teacher: onnx.ModelProto, feeds: dict) -> float:
    """Student / teacher seconds per run on one thread, timed alternately (ndonnx.latency), so a change
    in machine load hits both alike; about a second in all. A large teacher is timed on fewer samples
    per run (about 50 runs are timed: at 64 samples of BERT-base, minutes)."""
    from ndonnx.latency import session, time_alternately

    probe = session(teacher, threads=1)
    one = {k: v[:1] for k, v in feeds.items()}
    probe.run(None, one)  # (the first run pays for allocations)
    t0 = time.perf_counter()
    probe.run(None, one)
    once = time.perf_counter() - t0
    del probe
    n = max(1, min(LATENCY_BATCH, int(RUN_SECONDS / max(once, 1e-9))))
    batch = {k: v[:n] for k, v in feeds.items()}
    s, t = time_alternately([student, teacher], [batch, batch], threads=1, rounds=4, block=0.1)
    return s / t


def validate(student: onnx.ModelProto, teacher: onnx.ModelProto, inputs: dict[str, np.ndarray],
             labels: np.ndarray | None = None, student_path: Path | None = None,
             teacher_path: Path | None = None, torch_check: bool = True) -> dict:
    """Figures for the report; every comparison is on the same inputs. `torch_check=False` leaves
    out the student's torch-vs-onnxruntime figure (`ndonnx check` needs onnxruntime only)."""
    s_sess, t_sess = ort_session(student), ort_session(teacher)
    names = [o.name for o in teacher.graph.output]
    s_out, t_out = run_chunked(s_sess, names, inputs), run_chunked(t_sess, names, inputs)
    del s_sess, t_sess  # (the latency ratio makes its own: one copy of the weights at a time)
    diff = [np.abs(s.astype(np.float64) - t) for s, t in zip(s_out, t_out)]
    res = {
        "samples": int(len(next(iter(inputs.values())))),
        "params_teacher": sum(weight_counts(teacher).values()),
        "params_student": sum(weight_counts(student).values()),
        "max_abs_err": float(max(d.max() for d in diff)),
        "rel_err": float(max(rel_err(s, t) for s, t in zip(s_out, t_out))),
        "metric": metric_name(t_out, labels),
        "score_teacher": score_outputs(t_out, t_out, labels),
        "score_student": score_outputs(s_out, t_out, labels),
    }
    if t_out[0].ndim == 2 and t_out[0].shape[1] > 1 and res["metric"] != "cosine":  # not an embedding's argmax
        res["top1_agreement"] = float((s_out[0].argmax(-1) == t_out[0].argmax(-1)).mean())
    if labels is not None:
        res["accuracy_teacher"] = float((t_out[0].argmax(-1) == labels).mean())
        res["accuracy_student"] = float((s_out[0].argmax(-1) == labels).mean())
    res["latency_ratio"] = _latency_ratio(student, teacher, inputs)
    if student_path is not None and teacher_path is not None:
        res["bytes_student"] = file_size(student_path)
        res["bytes_teacher"] = file_size(teacher_path)
    if torch_check:
        res["torch_rel_err"], note = torch_consistency(student, {k: v[:16] for k, v in inputs.items()})
        if note:
            res["torch_note"] = note
    return res


def torch_consistency(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> tuple[float | None, str | None]:
    """rel_err of the model converted to torch against onnxruntime, and a note when there is none:
    the model does not convert, or torch/onnx2torch are not installed (a light install)."""
    try:
        import torch
        import onnx2torch  # noqa: F401
    except ImportError as e:
        return None, f"skipped: {e.name or 'torch'} is not installed"
    from ndonnx.trainable import Trainable

    try:
        module = Trainable(model)
        with torch.no_grad(), warnings.catch_warnings():  # converter deprecation chatter is not the user's
            warnings.simplefilter("ignore")
            got = module(*[torch.as_tensor(np.array(inputs[n])) for n in module.input_names])
    except Exception:
        return None, "does not convert"
    want = ort_session(model).run(module.output_names, inputs)
    return float(max(rel_err(g.numpy(), w) for g, w in zip(got, want))), None
