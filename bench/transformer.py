"""A trained sentence encoder to a budget: ND with every transformer family vs layer dropping alone.

    python bench/transformer.py DIR [--budgets 79%,66%,53%] [--finetune-steps 300]
                                    [--out bench/transformer.json] [--plot bench/transformer.png]

DIR holds what bench/zoo2/use_lite.py writes: use_lite.onnx (Universal Sentence Encoder lite,
6.98M parameters, trained) and its sentences (3,000 calibration sentences of 16 tokens, 500
held-out sentences whole). The default budgets are the issue's 18M, 15M and 12M of a 22.7M MiniLM,
as fractions of this encoder (79%, 66%, 53%).

Two arms, each one `ndonnx distill` into its own run directory, then one `ndonnx search` per budget
(with end-to-end fine-tuning) on that run:
  nd      width 0.25-0.75 (feed-forward), low rank 0.25/0.5 (projections and the embedding table),
          heads 0.5/0.75, vocabulary 1/0.5, identity (dropping a sub-layer), teacher
  layers  identity and teacher only: whole attention or feed-forward sub-layers dropped
For every student, measured here (not read from the tool's report): mean cosine with the teacher's
embeddings on the 500 held-out sentences (whole, padded with -1 to 48 tokens), parameters, file
size, and onnxruntime CPU latency at batch 32 x 64 tokens on one thread (ndonnx.latency's alternated
timing, the same as --target-latency's; the ratio is the figure). Times: distill per arm
(shared by its budgets), search + fine-tune + validation per budget. A benchmark, not a test: it
prints its figures and writes JSON (and a plot of cosine against parameters).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ndonnx.graph import weight_counts
from ndonnx.latency import time_alternately
from ndonnx.metrics import mean_cosine

ARMS = {
    "nd": "width:0.25,width:0.5,width:0.75,lowrank:0.25,lowrank:0.5,heads:0.5,heads:0.75,vocab:1,vocab:0.5,"
          "identity,teacher",
    "layers": "identity,teacher",
}
LATENCY_BATCH, LATENCY_TOKENS = 32, 64


def _session(path: Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def latency_ratio(student: Path, teacher: Path, feeds: dict) -> dict:
    """Student and teacher timed alternately on one thread (`ndonnx.latency.time_alternately`:
    warm-up, rounds of repeats in turn, medians)."""
    s, t = time_alternately([onnx.load(str(student)), onnx.load(str(teacher))], [feeds, feeds], threads=1)
    return {"student_ms": 1e3 * s, "teacher_ms": 1e3 * t, "ratio": s / t}


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--budgets", default="79%,66%,53%")
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--arms", default="nd,layers")
    ap.add_argument("--out", type=Path, default=Path("bench/transformer.json"))
    ap.add_argument("--plot", type=Path, default=Path("bench/transformer.png"))
    args = ap.parse_args()
    d = args.dir.resolve()
    teacher = d / "use_lite.onnx"
    train, test = d / "sentences_train.npz", d / "sentences_test.npz"
    held_out = np.load(test)["input_ids"]
    want = _session(teacher, 2).run(None, {"input_ids": held_out})[0]
    lat_ids = np.full((LATENCY_BATCH, LATENCY_TOKENS), -1, np.int64)
    lat_ids[:, : held_out.shape[1]] = held_out[:LATENCY_BATCH]
    cli = [sys.executable, "-m", "ndonnx_cli"]
    res = {"teacher": {"path": str(teacher), "params": sum(weight_counts(onnx.load(str(teacher))).values()),
                       "bytes": teacher.stat().st_size},
           "held_out_sentences": int(len(held_out)), "calibration": str(train),
           "latency": {"batch": LATENCY_BATCH, "tokens": LATENCY_TOKENS, "threads": 1},
           "finetune_steps": args.finetune_steps, "arms": {}}
    for arm in args.arms.split(","):
        run = d / f"bench-{arm}.ndonnx-run"
        distill_s = _run([*cli, "distill", str(teacher), "--run-dir", str(run), "--data", str(train),
                          "--candidates", ARMS[arm]])
        rows = []
        for budget in args.budgets.split(","):
            out = d / f"bench-{arm}-{budget.rstrip('%')}.onnx"
            report = d / f"bench-{arm}-{budget.rstrip('%')}.json"
            try:
                search_s = _run([*cli, "search", str(run), "--target-params", budget, "-o", str(out), "--force",
                                 "--finetune-steps", str(args.finetune_steps), "--eval-data", str(test),
                                 "--report", str(report)])
            except subprocess.CalledProcessError as e:
                rows.append({"budget": budget, "error": f"search exited {e.returncode}"})
                continue
            got = _session(out, 2).run(None, {"input_ids": held_out})[0]
            rep = json.loads(report.read_text())
            row = {"budget": budget, "params": sum(weight_counts(onnx.load(str(out))).values()),
                   "bytes": out.stat().st_size, "cosine": mean_cosine(got, want),
                   "cosine_min": float(np.min((got * want).sum(1))),
                   "cosine_before_finetune": rep.get("finetune", {}).get("score_before"),
                   "candidates": {str(n["id"]): n["candidate"] for n in rep.get("neighbourhoods", [])},
                   "latency": latency_ratio(out, teacher, {"input_ids": lat_ids}),
                   "search_finetune_validate_s": round(search_s, 1)}
            row["share"] = row["params"] / res["teacher"]["params"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        res["arms"][arm] = {"candidates": ARMS[arm], "distill_s": round(distill_s, 1), "students": rows}
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    _table(res)
    if args.plot:
        plot(res, args.plot)
    return 0


def _table(res: dict) -> None:
    print(f"{'arm':8} {'budget':>6} {'params':>10} {'share':>6} {'cosine':>7} {'min':>6} {'latency':>8} {'time s':>7}")
    for arm, a in res["arms"].items():
        for r in a["students"]:
            if "error" in r:
                print(f"{arm:8} {r['budget']:>6} {r['error']}")
                continue
            print(f"{arm:8} {r['budget']:>6} {r['params']:>10,} {r['share']:>6.1%} {r['cosine']:>7.4f} "
                  f"{r['cosine_min']:>6.3f} {r['latency']['ratio']:>7.2f}x {a['distill_s'] + r['search_finetune_validate_s']:>7.0f}")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for arm, a in res["arms"].items():
        ok = [r for r in a["students"] if "error" not in r]
        ax.plot([r["params"] / 1e6 for r in ok], [r["cosine"] for r in ok], "o-", label=arm)
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("mean cosine with the teacher (held-out sentences)")
    ax.set_title(f"USE-lite ({res['teacher']['params'] / 1e6:.2f}M) to a budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
