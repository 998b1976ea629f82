"""Parameters vs MACs vs measured onnxruntime latency, for a teacher and its students.

    python bench/latency.py TEACHER.onnx NAME=STUDENT.onnx ... [--batches 1,32] [--threads 1] [--out latency.json]

Latency: CPUExecutionProvider, the given intra-op threads, 5 warm-up runs, the median of `--repeats`
timed runs; the teacher is timed in the same process, its students alternate with it round by round
(so drift in machine load hits both), and speed-ups are ratios within one run. Inputs are seeded
random data shaped like the teacher's inputs (symbolic dims other than the batch: --dim NAME=SIZE).
A benchmark, not a test: it prints its figures and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ndonnx.candidates.width import shrink
from ndonnx.graph import load_teacher, weight_counts
from ndonnx.macs import concrete_dims, count_macs
from ndonnx.sample import make_inputs


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _time(sess: ort.InferenceSession, feeds: dict, repeats: int) -> float:
    for _ in range(5):
        sess.run(None, feeds)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher", type=Path)
    ap.add_argument("students", nargs="*", help="NAME=PATH.onnx")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of teacher and students")
    ap.add_argument("--uniform", action="append", default=[], help="K or K@N: also time the teacher with every "
                    "inner channel group at width K (rounded to a multiple of N), untrained: latency only")
    ap.add_argument("--dim", action="append", default=[], help="NAME=SIZE for symbolic dims other than the batch")
    ap.add_argument("--out", type=Path, default=Path("latency.json"))
    args = ap.parse_args()

    teacher = load_teacher(args.teacher)
    models = {"teacher": teacher.model}
    for item in args.students:
        name, _, path = item.partition("=")
        models[name] = load_teacher(path).model
    for spec in args.uniform:
        k, _, n = spec.partition("@")
        model, sizes = shrink(teacher.model, float(k), multiple=int(n or 1))
        models[f"width {spec}"] = model
    dims = dict((d.split("=")[0], int(d.split("=")[1])) for d in args.dim)
    one = {k: v[:1] for k, v in make_inputs(teacher).items()}
    res: dict = {"teacher": str(args.teacher), "threads": args.threads, "cores": os.cpu_count(),
                 "onnxruntime": ort.__version__, "models": {}}
    for name, m in models.items():
        macs = count_macs(m, {**concrete_dims(m, one), **dims})
        res["models"][name] = {"params": sum(weight_counts(m).values()),
                               "macs": macs.total if not macs.uncounted else None, "latency_ms": {}}
    for batch in (int(b) for b in args.batches.split(",")):
        feeds = {k: np.repeat(v, batch, axis=0) for k, v in one.items()}
        sessions = {name: _session(m, args.threads) for name, m in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, sess in sessions.items():
                times[name].append(_time(sess, feeds, args.repeats))
        for name in models:
            res["models"][name]["latency_ms"][str(batch)] = 1e3 * float(np.median(times[name]))
    t = res["models"]["teacher"]
    print(f"{'model':14s} {'params':>10s} {'MACs':>14s} " + " ".join(f"{'batch ' + b:>20s}" for b in t["latency_ms"]))
    for name, r in res["models"].items():
        lat = " ".join(f"{ms:9.3f} ms ({t['latency_ms'][b] / ms:4.2f}x)" for b, ms in r["latency_ms"].items())
        macs = f"{r['macs']:,}" if r["macs"] is not None else "uncounted"
        print(f"{name:14s} {r['params']:>10,d} {macs:>14s} {lat}")
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
