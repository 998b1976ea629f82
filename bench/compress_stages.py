"""Time of every stage of `compress` on the bundled ResNet-20, and of `search` for new budgets
from the same run directory (goal: <= 10 s and <= 5% of the distill time).

    python bench/compress_stages.py [--out compress_stages.json] [--finetune-steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from ndonnx.compress import CompressConfig, build, compress
from ndonnx.config import DistillConfig

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "resnet20_fmnist.onnx")
    ap.add_argument("--data", type=Path, default=ROOT / "models" / "fmnist_subset.npz")
    ap.add_argument("--eval-data", type=Path, default=ROOT / "models" / "fmnist_test.npz")
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("compress_stages.json"))
    args = ap.parse_args()
    res: dict = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        cfg = CompressConfig(distill=DistillConfig(labels="labels"), target="50%", finetune_steps=args.finetune_steps,
                             eval_data=str(args.eval_data))
        t0 = time.perf_counter()
        report = compress(args.model, run, cfg, data_path=args.data, output=Path(d) / "s.onnx")
        res["compress_seconds"] = time.perf_counter() - t0
        res["stages"] = report["timings"]
        res["accuracy_teacher"] = report["validation"]["accuracy_teacher"]
        res["accuracy_student"] = report["validation"]["accuracy_student"]
        res["params_teacher"], res["params_student"] = report["params_teacher"], report["params_student"]
        res["search"] = []
        for target in ("30%", "70%", "40%"):
            t0 = time.perf_counter()
            r = build(run, CompressConfig(target=target, eval_data=str(args.eval_data)), Path(d) / f"{target[:-1]}.onnx")
            seconds = time.perf_counter() - t0
            res["search"].append({"target": target, "seconds": seconds, "params": r["params_student"],
                                  "accuracy": r["validation"]["accuracy_student"]})
    distill_s = res["stages"]["distill"]
    worst = max(s["seconds"] for s in res["search"])
    res["search_max_seconds"], res["search_vs_distill"] = worst, worst / distill_s
    print("compress stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in res["stages"].items()))
    print(f"params {res['params_teacher']:,} -> {res['params_student']:,}; test accuracy "
          f"{res['accuracy_teacher']:.4f} -> {res['accuracy_student']:.4f}")
    for s in res["search"]:
        print(f"search {s['target']}: {s['seconds']:.1f} s, {s['params']:,} params, accuracy {s['accuracy']:.4f}")
    print(f"slowest new-budget search: {worst:.1f} s = {res['search_vs_distill']:.1%} of distill (goal <= 10 s and <= 5%)")
    args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
