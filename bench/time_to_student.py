"""Time to a student: the whole `ndonnx compress` per teacher, stage by stage, beside one plain
onnxruntime pass over the same calibration data, plus a re-budget rerun on the finished run directory.

    python bench/time_to_student.py [--cases resnet20,mobilenetv2] [--use-lite DIR] [--minilm DIR]
                                    [--bert-base DIR] [--out bench/time_to_student.json]
                                    [--plot bench/time_to_student.png] [--work-dir DIR]

Bundled cases: ResNet-20 and MobileNetV2 on Fashion-MNIST, exactly the README's quick start
(`--labels labels --finetune-steps 300 --eval-data models/fmnist_test.npz`, 50%). More cases are added
by naming the folder their build script wrote (nothing is downloaded here):
  --use-lite DIR   bench/zoo2/use_lite.py (USE-lite, 6.98M, trained): 79%, eval on the held-out sentences
  --minilm DIR     bench/zoo2/minilm.py (all-MiniLM-L6-v2, 22.7M, trained; 1,000 sentences): 18M
  --bert-base DIR  bench/zoo2/minilm.py --bert-base --length 128 --train 256 (110M, random): 80%
Every case runs with the defaults a user gets, apart from the flags listed in CASES.

Per case, each command measured as its own process (os.wait4: wall, user+system CPU, peak RSS):
  ort       one onnxruntime pass (CPU provider, default threads, batches of 32) over the calibration
            data, in this process: the unit every other figure is also given in
  compress  fresh run directory: the stages' wall and CPU seconds from its report (CPU includes
            finished worker processes), peak RSS, run-directory size (and its largest entries),
            quality from its validation
  rerun     `compress` at another budget on the finished run directory
  search    `search` at a third budget on it; rerun / search is the re-budget figure
A benchmark, not a test: it prints its figures and writes JSON (and a plot of the stages).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK_START = ["--labels", "labels", "--finetune-steps", "300"]


@dataclass
class Case:
    name: str
    model: Path
    data: Path
    target: str
    rerun: str        # budget of the rerun on the finished run directory
    search: str       # budget of `ndonnx search` on it
    eval: Path | None = None
    flags: list[str] = field(default_factory=list)


def cases(args) -> list[Case]:
    m = ROOT / "models"
    out = [Case("resnet20", m / "resnet20_fmnist.onnx", m / "fmnist_subset.npz", "50%", "40%", "60%",
                m / "fmnist_test.npz", QUICK_START),
           Case("mobilenetv2", m / "mobilenetv2_fmnist.onnx", m / "fmnist_subset.npz", "50%", "40%", "60%",
                m / "fmnist_test.npz", QUICK_START)]
    if args.use_lite:
        d = Path(args.use_lite)
        out.append(Case("use_lite", d / "use_lite.onnx", d / "sentences_train.npz", "79%", "66%", "53%",
                        d / "sentences_test.npz"))
    if args.minilm:
        d = Path(args.minilm)
        out.append(Case("minilm", d / "minilm.onnx", d / "sentences_train.npz", "18M", "15M", "20M",
                        d / "sentences_test.npz"))
    if args.bert_base:
        d = Path(args.bert_base)
        out.append(Case("bert_base", d / "bert_base.onnx", d / "sentences_train.npz", "80%", "70%", "90%"))
    want = set(args.cases.split(",")) if args.cases else None
    return [c for c in out if want is None or c.name in want]


def measured(cmd: list[str], log: Path) -> dict:
    """Run one command as a child process: wall, CPU (user + system, its own workers included) and
    peak RSS (the largest of it and its workers) from os.wait4."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT))
        _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"cmd": " ".join(map(str, cmd)), "exit": proc.returncode, "wall_s": time.perf_counter() - t0,
            "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_gib": ru.ru_maxrss / 2**20}


def ort_pass(model: Path, data: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    arrays = np.load(data)
    feeds = {n: arrays[n] for n in names}
    rows = len(next(iter(feeds.values())))
    t0, c0 = time.perf_counter(), time.process_time()
    for lo in range(0, rows, 32):
        sess.run(None, {n: v[lo:lo + 32] for n, v in feeds.items()})
    return {"rows": rows, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def dir_size(path: Path) -> tuple[int, dict[str, int]]:
    """Bytes under `path`, and per top-level entry."""
    per = {}
    for entry in path.iterdir():
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        per[entry.name] = sum(p.stat().st_size for p in files)
    return sum(per.values()), dict(sorted(per.items(), key=lambda kv: -kv[1]))


def run_case(case: Case, work: Path) -> dict:
    exe = shutil.which("ndonnx") or sys.executable
    base = [exe] if exe.endswith("ndonnx") else [exe, "-m", "ndonnx_cli"]
    run = work / f"{case.name}.run"
    shutil.rmtree(run, ignore_errors=True)
    ev = ["--eval-data", str(case.eval)] if case.eval else []
    res: dict = {"case": case.name, "model": str(case.model), "model_bytes": case.model.stat().st_size,
                 "target": case.target, "ort": ort_pass(case.model, case.data)}
    print(f"{case.name}: one onnxruntime pass {res['ort']['wall_s']:.2f} s over {res['ort']['rows']} rows", flush=True)
    for step, budget, verb, extra in (("compress", case.target, "compress", []),
                                      ("rerun", case.rerun, "compress", []),
                                      ("search", case.search, "search", [])):
        report, out = work / f"{case.name}.{step}.json", work / f"{case.name}.{step}.onnx"
        head = [*base, "compress", str(case.model), "--data", str(case.data), "--run-dir", str(run)] \
            if verb == "compress" else [*base, "search", str(run)]
        flags = case.flags if verb == "compress" else [f for f in case.flags if f not in ("--labels", "labels")]
        r = measured([*head, "--target-params", budget, "-o", str(out), "--report", str(report), "--force",
                      *flags, *ev, *extra], work / f"{case.name}.{step}.log")
        r["budget"] = budget
        if report.exists():
            rep = json.loads(report.read_text())
            v = rep["validation"]
            r.update(stages_wall_s=rep["timings"], stages_cpu_s=rep.get("cpu_seconds"), metric=rep["metric"],
                     params_teacher=rep["params_teacher"], params_student=rep["params_student"],
                     score_teacher=v["score_teacher"], score_student=v["score_student"],
                     score_before_finetune=(rep.get("finetune") or {}).get("score_before"))
        r["x_ort_pass"] = r["wall_s"] / res["ort"]["wall_s"]
        res[step] = r
        print(f"  {step:8} {budget:>5}: exit {r['exit']}, {r['wall_s']:7.1f} s wall, {r['cpu_s']:7.1f} s CPU, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB, {r.get('metric', '?')} {r.get('score_student', float('nan')):.4f} "
              f"(teacher {r.get('score_teacher', float('nan')):.4f})", flush=True)
        if step == "compress":
            total, per = dir_size(run)
            res["run_dir_bytes"], res["run_dir_largest"] = total, dict(list(per.items())[:6])
    res["rerun_over_search"] = res["rerun"]["wall_s"] / res["search"]["wall_s"]
    return res


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.8 + 0.7 * len(results)))
    stages = list(dict.fromkeys(s for r in results for s in r["compress"].get("stages_wall_s", {})))
    for i, r in enumerate(results):
        left = 0.0
        for j, s in enumerate(stages):
            w = r["compress"].get("stages_wall_s", {}).get(s, 0.0)
            ax.barh(i, w, left=left, color=f"C{j}", label=s if i == 0 else None)
            left += w
        ax.text(left, i, f" {left:.0f} s = {r['compress']['x_ort_pass']:.0f}x one ORT pass", va="center", fontsize=8)
    ax.set_yticks(range(len(results)), [r["case"] for r in results])
    ax.set_xlabel("wall seconds of `ndonnx compress` (fresh run directory)")
    ax.set_xlim(0, 1.3 * max(sum(r["compress"].get("stages_wall_s", {}).values()) for r in results))  # room for the labels
    ax.legend(fontsize=7, ncol=len(stages), loc="upper center", bbox_to_anchor=(0.5, -0.3 - 0.4 / len(results)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", help="comma-separated names (default: every case available)")
    ap.add_argument("--use-lite", help="folder written by bench/zoo2/use_lite.py")
    ap.add_argument("--minilm", help="folder written by bench/zoo2/minilm.py")
    ap.add_argument("--bert-base", help="folder written by bench/zoo2/minilm.py --bert-base")
    ap.add_argument("--work-dir", help="run directories, students, logs (default: a temporary folder)")
    ap.add_argument("--out", default="time_to_student.json")
    ap.add_argument("--plot", default=None, help="PNG of the stages per case")
    args = ap.parse_args()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ndonnx-tts-"))
    work.mkdir(parents=True, exist_ok=True)
    out = {"cores": os.cpu_count(), "load_average_at_start": os.getloadavg(), "results": []}
    for case in cases(args):
        out["results"].append(run_case(case, work))
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'case':12} {'wall s':>8} {'CPU s':>8} {'x ORT':>7} {'RSS GiB':>8} {'run dir MB':>10} "
          f"{'quality':>8} {'teacher':>8} {'rerun/search':>12}")
    for r in out["results"]:
        c = r["compress"]
        print(f"{r['case']:12} {c['wall_s']:8.1f} {c['cpu_s']:8.1f} {c['x_ort_pass']:7.0f} {c['peak_rss_gib']:8.2f} "
              f"{r['run_dir_bytes'] / 1e6:10.1f} {c.get('score_student', float('nan')):8.4f} "
              f"{c.get('score_teacher', float('nan')):8.4f} {r['rerun_over_search']:12.2f}")
    out["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.plot:
        plot(out["results"], args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
