"""Parameters vs MACs vs measured onnxruntime latency, for a teacher and its students.

    python bench/latency.py TEACHER.onnx NAME=STUDENT.onnx ... [--batches 1,32] [--threads 1,0]
                            [--int8 [--data CALIB.npz]] [--out latency.json] [--plot latency.png]

Latency: CPUExecutionProvider, the given intra-op threads, 5 warm-up runs, the median of `--repeats`
timed runs; the teacher is timed in the same process, its students alternate with it round by round
(so drift in machine load hits both), and speed-ups are ratios within one run. Inputs are seeded
random data shaped like the teacher's inputs (symbolic dims other than the batch: --dim NAME=SIZE,
else 16, or 32 for the trailing dims of an image input).
`--threads 1,0` times each model at one thread and at all cores (0: onnxruntime's default).
`--int8` adds every model quantized as `--quantize int8` does it (`ndonnx.quantize`: static QDQ for
conv nets, calibrated on the first 256 rows of `--data`, or on the seeded random inputs without it,
which is enough for timing; dynamic for MatMul-heavy models). A benchmark, not a test: it prints its
figures and writes JSON, and `--plot` draws speed-up against parameters and MACs at the largest batch
(on one thread when that was timed: the steadiest figure on a shared machine).
`--eval-data HELD_OUT.npz` also scores every model against the teacher's outputs on those rows (the
score `compress` reports: accuracy with `--labels`, top-1 agreement, mean cosine or 1 - relative
error); `--mask-threshold T` adds, for a map output such as a text detector's probabilities, the IoU
of the pixels above T with the teacher's.
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
from ndonnx.metrics import metric_name, score_outputs
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
    ap.add_argument("--threads", default="1", help="comma-separated intra-op threads; 0 = all cores")
    ap.add_argument("--int8", action="store_true", help="also time each model quantized to int8")
    ap.add_argument("--data", type=Path, help="calibration .npz for --int8's static quantization")
    ap.add_argument("--plot", type=Path, help="write a speed-up plot here")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of teacher and students")
    ap.add_argument("--uniform", action="append", default=[], help="K or K@N: also time the teacher with every "
                    "inner channel group at width K (rounded to a multiple of N), untrained: latency only")
    ap.add_argument("--dim", action="append", default=[], help="NAME=SIZE for symbolic dims other than the batch")
    ap.add_argument("--eval-data", type=Path, help="held-out .npz: score every model against the teacher on it")
    ap.add_argument("--labels", help="labels array in --eval-data (the score becomes accuracy)")
    ap.add_argument("--mask-threshold", type=float, help="also the IoU of first-output pixels above this value")
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
    one = {k: v[:1] for k, v in make_inputs(teacher, sizes=dims).items()}
    if args.int8:
        from ndonnx.quantize import quantize

        calib = dict(np.load(args.data)) if args.data else {k: v for k, v in make_inputs(teacher).items()}
        calib = {k: v[:256] for k, v in calib.items() if k in one}
        for name, m in list(models.items()):
            models[f"{name} int8"], info = quantize(m, "int8", calib)
            print(f"{name}: int8 {info['method']}")
    if args.eval_data:
        res_scores = scores(models, args.eval_data, args.labels, args.mask_threshold)
    threads = [int(t) for t in args.threads.split(",")]
    res: dict = {"teacher": str(args.teacher), "threads": threads, "cores": os.cpu_count(),
                 "onnxruntime": ort.__version__, "models": {}}
    for name, m in models.items():
        macs = count_macs(m, {**concrete_dims(m, one), **dims})
        res["models"][name] = {"params": sum(weight_counts(m).values()),
                               "macs": macs.total if not macs.uncounted else None, "latency_ms": {}}
        if args.eval_data:
            res["models"][name].update(res_scores[name])
    for th in threads:
        sessions = {name: _session(m, th) for name, m in models.items()}
        for batch in (int(b) for b in args.batches.split(",")):
            feeds = {k: np.repeat(v, batch, axis=0) for k, v in one.items()}
            times: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(args.rounds):
                for name, sess in sessions.items():
                    times[name].append(_time(sess, feeds, args.repeats))
            key = str(batch) if threads == [1] else f"{batch}@{th or 'all'}t"
            for name in models:
                res["models"][name]["latency_ms"][key] = 1e3 * float(np.median(times[name]))
    t = res["models"]["teacher"]
    print(f"{'model':14s} {'params':>10s} {'MACs':>14s} " + " ".join(f"{'batch ' + b:>20s}" for b in t["latency_ms"]))
    for name, r in res["models"].items():
        lat = " ".join(f"{ms:9.3f} ms ({t['latency_ms'][b] / ms:4.2f}x)" for b, ms in r["latency_ms"].items())
        macs = f"{r['macs']:,}" if r["macs"] is not None else "uncounted"
        score = "".join(f" {k} {r[k]:.4f}" for k in ("score", "mask_iou") if k in r)
        print(f"{name:14s} {r['params']:>10,d} {macs:>14s} {lat}{score}")
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    if args.plot:
        plot(res, args.plot)
    return 0


def scores(models: dict, path: Path, labels: str | None, threshold: float | None) -> dict[str, dict]:
    """Each model's score against the teacher's outputs on held-out rows (in batches of 32)."""
    data = dict(np.load(path))
    y = data.pop(labels) if labels else None
    outs = {}
    for name, m in models.items():
        sess = _session(m, 0)
        feeds = [{k: v[i:i + 32] for k, v in data.items()} for i in range(0, len(next(iter(data.values()))), 32)]
        parts = [sess.run(None, f) for f in feeds]
        outs[name] = [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]
    ref = outs["teacher"]
    res = {}
    for name, o in outs.items():
        res[name] = {"metric": metric_name(ref, y), "score": score_outputs(o, ref, y)}
        if threshold is not None:
            a, b = o[0] > threshold, ref[0] > threshold
            res[name]["mask_iou"] = float((a & b).sum() / max(1, (a | b).sum()))
    return res


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = res["models"]["teacher"]
    keys = list(t["latency_ms"])
    key = next((k for k in reversed(keys) if k.endswith("@1t")), keys[-1])  # one thread: the steadiest figure
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, what in zip(axes, ("params", "macs")):
        for name, r in res["models"].items():
            if r[what] is None:
                continue
            x, y = r[what] / t[what], t["latency_ms"][key] / r["latency_ms"][key]
            ax.plot(x, y, "s" if "int8" in name else "o")
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"{what} (share of the teacher's)")
        ax.set_ylabel(f"speed-up over the teacher ({key})")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    fig.suptitle(Path(res["teacher"]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
