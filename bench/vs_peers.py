"""ndonnx against a peer pruning tool (onnxsim 0.8.1), side by side, per teacher and parameter budget.

    python bench/vs_peers.py --out vs_peers.json                      # onnxsim arms, 30/50/70%
    python bench/vs_peers.py --budgets 0.5 --arms onnxsim_fix,ndonnx  # one budget, with ndonnx
    PEER_PYTHON=/path/to/venv/bin/python python bench/vs_peers.py ...

The peer runs in its own interpreter (`--peer-python`, default $PEER_PYTHON, else
/tmp/peer-venv/bin/python: a venv with `pip install onnxsim==0.8.1`), which executes this same file
in worker mode (`--peer-worker SPEC.json`), so the project environment never needs onnxsim. The
project side uses numpy, onnx and onnxruntime only.

Arms (`--arms`, comma-separated):

  onnxsim      onnxsim 0.8.1 as shipped. Recipe, all label-free, on the calibration data (split into
               batches of --cal-batch):
                 1. `onnxsim.pruning.apply_structured_wanda_pruning(teacher, calibration_data=cal,
                    sparsity=s, seed=seed)`: whole output channels of every matched producer ->
                    consumer chain, ranked by ||W_row|| * ||X||; per-chain sparsity (the default,
                    global_sparsity=False). s is found by bisection with the data-free
                    `apply_structured_pruning` (same per-chain keep counts, no data, ~10 ms a call)
                    as the smallest s whose kept parameters are <= the budget, then checked against
                    the Wanda model's own count.
                 2. `onnxsim.finetune.apply_pruning_finetune(teacher, pruned, calibration_data=cal)`:
                    closed-form ridge refit of each MatMul/Gemm against the teacher's activations
                    (what onnxsim's own optimize_pipeline runs after pruning; Conv layers are out of
                    its scope, so on a ConvNet it touches only the classifier).
                 3. `onnxsim.qat.apply_block_finetune_all_blocks(teacher, refit, calibration_data=cal,
                    num_iterations=N, learning_rate=lr, batch_size=B, batch_seed=seed)`: block-wise
                    Adam refit (blocks found by liveness cuts, <= 2 weighted layers each, Conv
                    included), sequentially on the student's own upstream activations, against the
                    teacher's block outputs.
  onnxsim_fix  the same with a one-line workaround for a bug in step 3 (monkeypatched in the worker,
               the installed package is not edited): `onnxsim/qat.py`, `_train_block` (line 1839)
               calls `_block_shapes(float_model, ...)`, which infers the block's shapes from the
               *teacher's* initializers (line 1046), although with fake_quant=False the weights it
               trains are the *student's*. After channel pruning every block with a pruned inner
               conv then fails in graph_grad's Conv rule ("Conv's W has 8 channels per group, but
               ... needs 16"), which apply_qat_all_blocks catches (line 3109) and records as
               skipped: every residual block is left unrefit and only the classifier block trains.
               The patch passes the student as `float_model` to `_train_block` when fake_quant is
               False -- the only other use of `float_model` there (line 1855) already picks the
               student in that case.
  ndonnx       `ndonnx compress MODEL --data CAL --target-params P% --run-dir RUN -o OUT --report R
               --force --finetune-steps N --finetune-lr LR`, label-free: the fine-tuning is end-to-end
               KD on the teacher's outputs only (no labels), see run_ndonnx(); one run directory per
               teacher, so later budgets reuse the distilled candidates (the first budget's wall
               seconds include the distillation).
  ndonnx_labels  the same with `--labels KEY` added: cross-entropy on the labels beside the KD
               (teachers with labels only).

Per (teacher, budget, arm) the JSON records: params kept (sum of float initializer sizes), quality on
the eval data (accuracy when the teacher entry names a labels key, else top-1 agreement with the
teacher), top-1 agreement, wall seconds of pruning + refit (the peer's stages separately; for ndonnx
the whole compress command), and onnxruntime latency relative to the teacher (CPU provider, one
thread, batch --latency-batch, teacher and student alternated run by run, median of --latency-runs).
The machine this was written on has 2 cores shared with other work: timings are indicative only.

More teachers: append a Teacher(...) to TEACHERS (model, calibration npz, eval npz, labels key or None).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PEER_PYTHON = os.environ.get("PEER_PYTHON", "/tmp/peer-venv/bin/python")


@dataclass
class Teacher:
    name: str
    model: str
    calibration: str          # .npz: the input named like the model's input (or a lone array)
    eval: str                 # .npz: same layout
    labels: Optional[str]     # key of a labels array in both npz files, or None (quality = agreement)


TEACHERS: List[Teacher] = [
    Teacher("resnet20_fmnist", str(ROOT / "models/resnet20_fmnist.onnx"),
            str(ROOT / "models/fmnist_subset.npz"), str(ROOT / "models/fmnist_test.npz"), "labels"),
]

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16)


# ------------------------------------------------------------------------------------------------ shared

def count_params(model: onnx.ModelProto) -> int:
    """Sum of the sizes of the float initializers."""
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in FLOAT_TYPES))


def model_input(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != 1:
        raise SystemExit(f"only one-input teachers are supported here, got {names}")
    return names[0]


def load_inputs(npz_path: str, input_name: str, labels_key: Optional[str]) -> np.ndarray:
    d = np.load(npz_path, allow_pickle=False)
    if input_name in d.files:
        return d[input_name]
    rest = [k for k in d.files if k != labels_key]
    if len(rest) == 1:
        return d[rest[0]]
    raise SystemExit(f"{npz_path}: no array named {input_name!r} (has {d.files})")


# ------------------------------------------------------------------------------------------------ peer worker
# Runs inside --peer-python (imports onnxsim); never imported by the project side.

def _install_onnxsim_workaround() -> None:
    """onnxsim 0.8.1 qat._train_block infers block shapes from the teacher (float_model) even when it
    trains the student's own float weights (fake_quant=False): use the student there instead."""
    from onnxsim import qat
    original = qat._train_block

    def _train_block(float_model, quantized_model, plan, *args, **kwargs):
        if not kwargs.get("fake_quant", True):
            float_model = quantized_model
        return original(float_model, quantized_model, plan, *args, **kwargs)

    qat._train_block = _train_block


def _peer_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import onnxsim
    from onnxsim import qat
    from onnxsim.finetune import apply_pruning_finetune
    from onnxsim.pruning import apply_structured_pruning, apply_structured_wanda_pruning

    if spec["workaround"]:
        _install_onnxsim_workaround()
    t_start = time.perf_counter()
    teacher = onnx.load(spec["model"])
    name = model_input(teacher)
    x = load_inputs(spec["calibration"], name, spec["labels"])
    cal = [{name: x[i:i + spec["cal_batch"]]} for i in range(0, len(x), spec["cal_batch"])]
    total = count_params(teacher)
    target = int(spec["budget"] * total)

    # 1. sparsity for the budget: per-chain keep counts depend on the sparsity only, so bisect with
    #    the data-free pruner (fast) and prune once with Wanda at the result.
    t0 = time.perf_counter()
    lo, hi = 0.0, 0.999
    if count_params(apply_structured_pruning(teacher, sparsity=hi)) > target:
        raise SystemExit(f"budget {spec['budget']} below what onnxsim can prune to")
    for _ in range(30):
        mid = (lo + hi) / 2
        if count_params(apply_structured_pruning(teacher, sparsity=mid)) <= target:
            hi = mid
        else:
            lo = mid
    sparsity = hi
    t_search = time.perf_counter() - t0
    t0 = time.perf_counter()
    pruned = apply_structured_wanda_pruning(teacher, calibration_data=cal, sparsity=sparsity,
                                            seed=spec["seed"])
    t_prune = time.perf_counter() - t0
    # 2. per-layer ridge refit (MatMul/Gemm)
    t0 = time.perf_counter()
    refit = apply_pruning_finetune(teacher, pruned, calibration_data=cal, seed=spec["seed"])
    t_ridge = time.perf_counter() - t0
    # 3. block refit
    t0 = time.perf_counter()
    student, results = qat.apply_block_finetune_all_blocks(
        teacher, refit, calibration_data=cal, seed=spec["seed"], num_iterations=spec["iterations"],
        learning_rate=spec["lr"], batch_size=spec["batch"], batch_seed=spec["seed"])
    t_block = time.perf_counter() - t0
    t_total = time.perf_counter() - t_start

    onnx.save(refit, spec["out_ridge"])
    onnx.save(student, spec["out"])
    blocks = [{"output": r.block.output_name, "trained": bool(r.trained), "skipped": r.skipped_reason,
               "loss_first": r.losses[0] if r.losses else None,
               "loss_last": r.losses[-1] if r.losses else None} for r in results]
    Path(spec["result"]).write_text(json.dumps({
        "onnxsim_version": getattr(onnxsim, "__version__", "?"), "sparsity": sparsity,
        "params_pruned_wanda": count_params(pruned), "params_target": target,
        "seconds": {"search": t_search, "prune": t_prune, "ridge": t_ridge, "block": t_block,
                    "total": t_total},
        "blocks_trained": sum(b["trained"] for b in blocks), "blocks": blocks,
    }, indent=2))


# ------------------------------------------------------------------------------------------------ evaluation

def _session(model_path: str, threads: int = 0):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])


def predict(model_path: str, x: np.ndarray, batch: int = 256) -> np.ndarray:
    s = _session(model_path)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def evaluate(student_path: str, teacher_logits: np.ndarray, x: np.ndarray,
             labels: Optional[np.ndarray]) -> Dict[str, Optional[float]]:
    """quality = accuracy with labels, else top-1 agreement with the teacher; agreement always."""
    s = predict(student_path, x).argmax(-1)
    agreement = float((s == teacher_logits.argmax(-1)).mean())
    accuracy = float((s == labels).mean()) if labels is not None else None
    return {"quality": accuracy if labels is not None else agreement, "accuracy": accuracy,
            "agreement": agreement}


def latency_ratio(teacher_path: str, student_path: str, x: np.ndarray, batch: int, runs: int
                  ) -> Dict[str, float]:
    """One thread, batch `batch`; teacher and student alternated run by run; medians."""
    reps = -(-batch // len(x))
    xb = np.concatenate([x] * reps)[:batch]
    sessions = [_session(p, threads=1) for p in (teacher_path, student_path)]
    feeds = [{s.get_inputs()[0].name: xb} for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(5):
            s.run(None, f)
    times: List[List[float]] = [[], []]
    for _ in range(runs):
        for k in (0, 1):
            t0 = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(time.perf_counter() - t0)
    t, s = statistics.median(times[0]), statistics.median(times[1])
    return {"teacher_ms": 1e3 * t, "student_ms": 1e3 * s, "ratio": s / t}


# ------------------------------------------------------------------------------------------------ arms

def run_onnxsim(teacher: Teacher, budget: float, work: Path, workaround: bool, args) -> Dict:
    tag = f"{teacher.name}-{round(100 * budget)}pct-{'onnxsim_fix' if workaround else 'onnxsim'}"
    spec = {"model": teacher.model, "calibration": teacher.calibration, "labels": teacher.labels,
            "budget": budget, "workaround": workaround, "seed": args.seed, "cal_batch": args.cal_batch,
            "iterations": args.peer_iters, "lr": args.peer_lr, "batch": args.peer_batch,
            "out": str(work / f"{tag}.onnx"), "out_ridge": str(work / f"{tag}.ridge.onnx"),
            "result": str(work / f"{tag}.json")}
    spec_path = work / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    t0 = time.perf_counter()
    proc = subprocess.run([args.peer_python, str(Path(__file__).resolve()), "--peer-worker", str(spec_path)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": f"peer worker exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}",
                "wall_s_subprocess": wall}
    res = json.loads(Path(spec["result"]).read_text())
    return {"student": spec["out"], "ridge_model": spec["out_ridge"], "wall_s": res["seconds"]["total"],
            "wall_s_subprocess": wall, "peer": res}


def run_ndonnx(teacher: Teacher, budget: float, run_dir: Path, work: Path, args: argparse.Namespace,
               labels: Optional[str] = None) -> Dict:
    """==== ndonnx arm ====  `ndonnx compress` in a subprocess, label-free unless `labels` is given
    (then `--labels KEY`); both fine-tune --finetune-steps at --finetune-lr. `run_dir` is shared by every budget (and both variants)
    of one teacher, so only the first call distils; quality is read from OUT by the caller with the
    same evaluate() as the peer, and the report's own validation is kept alongside."""
    tag = f"{teacher.name}-{round(100 * budget)}pct-{'ndonnx_labels' if labels else 'ndonnx'}"
    out, report = work / f"{tag}.onnx", work / f"{tag}.report.json"
    exe = shutil.which("ndonnx")
    cmd = ([exe] if exe else [sys.executable, "-m", "cli"]) + [
        "compress", teacher.model, "--data", teacher.calibration, "--target-params", f"{100 * budget:g}%",
        "--run-dir", str(run_dir), "-o", str(out), "--report", str(report), "--force",
        "--finetune-steps", str(args.finetune_steps), "--finetune-lr", f"{args.finetune_lr:g}"]
    if labels:
        cmd += ["--labels", labels]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    wall = time.perf_counter() - t0
    (work / f"{tag}.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode not in (0, 1) or not out.exists():   # 1: ran, goal (e.g. --max-drop) not met
        return {"error": f"ndonnx exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}",
                "wall_s": wall, "cmd": cmd}
    rep = json.loads(report.read_text()) if report.exists() else {}
    return {"student": str(out), "wall_s": wall, "cmd": cmd, "exit": proc.returncode,
            "ndonnx_report": {"params_student": rep.get("params_student"), "metric": rep.get("metric"),
                              "validation": rep.get("validation"), "timings": rep.get("timings")}}


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="vs_peers.json", help="JSON results")
    ap.add_argument("--budgets", default="0.3,0.5,0.7", help="fractions of the teacher's parameters kept")
    ap.add_argument("--arms", default="onnxsim,onnxsim_fix",
                    help="comma-separated: onnxsim, onnxsim_fix, ndonnx, ndonnx_labels")
    ap.add_argument("--teachers", default=None, help="comma-separated names from TEACHERS (default: all)")
    ap.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON,
                    help="interpreter with onnxsim installed (default $PEER_PYTHON or /tmp/peer-venv/bin/python)")
    ap.add_argument("--work-dir", default=None, help="students, logs, run dirs (default: a new folder in /tmp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cal-batch", type=int, default=250, help="calibration rows per batch handed to onnxsim")
    ap.add_argument("--peer-iters", type=int, default=1000, help="Adam steps per block (onnxsim's default)")
    ap.add_argument("--peer-lr", type=float, default=1e-3,
                    help="block refit learning rate (onnxsim's default 1e-4 gave 91.6%% vs 92.65%% at 50%%)")
    ap.add_argument("--peer-batch", type=int, default=64,
                    help="block refit minibatch (onnxsim's default is full batch: ~4 s a step here)")
    ap.add_argument("--finetune-steps", type=int, default=1000, help="ndonnx arms: --finetune-steps (1000 at 1e-4: "
                    "the best of 1000-4000 steps at 1e-4/3e-4 measured on the 30%% ResNet-20 student)")
    ap.add_argument("--finetune-lr", type=float, default=1e-4, help="ndonnx arms: --finetune-lr")
    ap.add_argument("--plot", default=None, help="PNG: quality against parameters kept, per arm")
    ap.add_argument("--latency-batch", type=int, default=32)
    ap.add_argument("--latency-runs", type=int, default=50)
    ap.add_argument("--peer-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer_worker:
        _peer_worker(args.peer_worker)
        return 0

    np.random.seed(args.seed)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(arms) - {"onnxsim", "onnxsim_fix", "ndonnx", "ndonnx_labels"}
    if unknown:
        ap.error(f"unknown arms {sorted(unknown)}")
    teachers = [t for t in TEACHERS if args.teachers is None or t.name in args.teachers.split(",")]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="vs_peers-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}", flush=True)

    out: Dict = {"settings": {k: v for k, v in vars(args).items() if k != "peer_worker"},
                 "note": "timings indicative: shared machine", "teachers": []}
    for teacher in teachers:
        model = onnx.load(teacher.model)
        name = model_input(model)
        x_eval = load_inputs(teacher.eval, name, teacher.labels)
        labels = np.load(teacher.eval)[teacher.labels] if teacher.labels else None
        t_logits = predict(teacher.model, x_eval)
        t_params = count_params(model)
        t_quality = float((t_logits.argmax(-1) == labels).mean()) if labels is not None else 1.0
        entry = {**asdict(teacher), "params": t_params, "quality": t_quality,
                 "metric": "accuracy" if labels is not None else "agreement", "rows": []}
        out["teachers"].append(entry)
        run_dir = work / f"{teacher.name}.ndonnx-run"
        for budget in budgets:
            for arm in arms:
                print(f"{teacher.name} {budget:.0%} {arm} ...", flush=True)
                if arm in ("onnxsim", "onnxsim_fix"):
                    r = run_onnxsim(teacher, budget, work, arm == "onnxsim_fix", args)
                elif arm == "ndonnx":
                    r = run_ndonnx(teacher, budget, run_dir, work, args)
                else:
                    if teacher.labels is None:
                        continue
                    r = run_ndonnx(teacher, budget, run_dir, work, args, labels=teacher.labels)
                row = {"budget": budget, "arm": arm, **r}
                if "error" not in r:
                    student = onnx.load(r["student"])
                    row["params"] = count_params(student)
                    row["params_fraction"] = row["params"] / t_params
                    row.update(evaluate(r["student"], t_logits, x_eval, labels))
                    if r.get("ridge_model"):
                        row["before_block_refit"] = evaluate(r["ridge_model"], t_logits, x_eval, labels)
                    row["latency"] = latency_ratio(teacher.model, r["student"], x_eval,
                                                   args.latency_batch, args.latency_runs)
                entry["rows"].append(row)
                Path(args.out).write_text(json.dumps(out, indent=2, default=float))
                print(_line(teacher.name, row), flush=True)

    print()
    print(f"{'teacher':18} {'budget':>6} {'arm':14} {'params':>8} {'frac':>6} {'quality':>8} {'agree':>7} "
          f"{'wall s':>8} {'lat x':>6}")
    for entry in out["teachers"]:
        print(f"{entry['name']:18} {'-':>6} {'teacher':14} {entry['params']:8d} {1:6.3f} {entry['quality']:8.4f}")
        for row in entry["rows"]:
            print(_line(entry["name"], row))
    Path(args.out).write_text(json.dumps(out, indent=2, default=float))
    print(f"\nwrote {args.out}")
    if args.plot:
        plot(out, args.plot)
        print(f"wrote {args.plot}")
    return 0


def plot(out: Dict, path: str) -> None:
    """Quality against the fraction of parameters kept, one line per arm, one panel per teacher."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = out["teachers"]
    fig, axes = plt.subplots(1, len(teachers), figsize=(5.5 * len(teachers), 4), squeeze=False)
    for ax, entry in zip(axes[0], teachers):
        rows = [r for r in entry["rows"] if "error" not in r]
        for arm in dict.fromkeys(r["arm"] for r in rows):
            pts = sorted((r["params_fraction"], r["quality"], r["wall_s"]) for r in rows if r["arm"] == arm)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{arm} ({max(p[2] for p in pts):.0f} s max)")
        ax.axhline(entry["quality"], color="grey", ls=":", label="teacher")
        ax.set_ylim(entry["quality"] - 0.06, entry["quality"] + 0.01)  # onnxsim as shipped lies below: see the table
        ax.set(title=entry["name"], xlabel="parameters kept (fraction of the teacher)", ylabel=entry["metric"])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _line(teacher: str, row: Dict) -> str:
    if "error" in row:
        return f"{teacher:18} {row['budget']:6.0%} {row['arm']:14} ERROR {row['error'][-300:]}"
    return (f"{teacher:18} {row['budget']:6.0%} {row['arm']:14} {row['params']:8d} {row['params_fraction']:6.3f} "
            f"{row['quality']:8.4f} {row['agreement']:7.4f} {row['wall_s']:8.1f} {row['latency']['ratio']:6.2f}")


if __name__ == "__main__":
    sys.exit(main())
