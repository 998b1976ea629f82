"""Jobs per second of the distillation backends, on the bundled ResNet-20 teacher.

    python bench/scale_out.py [--steps 50] [--arms local:1,local:2,ray:1,ray:2] [--out scale_out.json]

One run directory is prepared (cache, students); each arm then reruns every job in it from an empty
journal. Timed: the job phase alone (`runner._run`: submit, train, the driver's writes). Ray arms start
their Ray first (`ray.init(num_cpus=N)`: N workers of one torch thread each; the start is reported
apart), so their time includes the workers' first import of torch. `local:N` is `--jobs N` (threads:
cores / N). The N-GPU figures are a projection, not a measurement: each neighbourhood's group takes what
its jobs took here (the journal's seconds) and groups go to the least loaded of N workers, longest
first, as the backends hand them out in practice; a group cannot be split, so the speedup stops
at the sum of the group times over the largest one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ndonnx.config import DistillConfig
from ndonnx.distill import runner
from ndonnx.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def _timed_run(run: Path, model: Path, data: Path, cfg: DistillConfig) -> tuple[float, list[dict]]:
    """Seconds of the job phase, and the journal it wrote."""
    for sub in ("done", "weights"):
        shutil.rmtree(run / sub, ignore_errors=True)
        (run / sub).mkdir()
    real, spent = runner._run, []

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spent.append(time.perf_counter() - t0)

    runner._run = timed
    try:
        runner.distill(model, run, cfg, data_path=data)
    finally:
        runner._run = real
    return spent[0], [json.loads(p.read_text()) for p in sorted((run / "done").glob("*.json"))]


def prepare(run: Path, model: Path, data: Path, cfg: DistillConfig) -> None:
    """A run directory with everything but the jobs' results: cache, teacher pieces, students."""
    real, runner._run = runner._run, lambda *a, **k: None
    try:
        runner.distill(model, run, cfg, data_path=data)
    finally:
        runner._run = real


def _makespan(groups: list[float], workers: int) -> float:
    load = [0.0] * workers
    for g in sorted(groups, reverse=True):
        load[load.index(min(load))] += g
    return max(load)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "resnet20_fmnist.onnx"))
    ap.add_argument("--data", default=str(ROOT / "models" / "fmnist_subset.npz"))
    ap.add_argument("--steps", type=int, default=50, help="training steps per candidate (default 50; 300 in real runs)")
    ap.add_argument("--arms", default="local:1,local:2,ray:1,ray:2")
    ap.add_argument("--out", default="scale_out.json")
    args = ap.parse_args()
    arms = [(a.split(":")[0], int(a.split(":")[1])) for a in args.arms.split(",")]
    work = Path(tempfile.mkdtemp(prefix="scale_out_"))
    run = work / "run"
    base = DistillConfig(steps=args.steps, seed=0)
    results: dict = {"model": Path(args.model).name, "steps": args.steps, "cores": os.cpu_count(), "arms": {}}
    try:
        t0 = time.perf_counter()
        prepare(run, Path(args.model), Path(args.data), base)
        results["prepare_seconds"] = round(time.perf_counter() - t0, 1)
        for backend, n in arms:
            name = f"{backend}:{n}"
            ray_start = None
            if backend == "ray":
                import ray

                t0 = time.perf_counter()
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                ray.init(num_cpus=n, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
                ray_start = time.perf_counter() - t0
            load = os.getloadavg()[0]
            try:
                cfg = DistillConfig(steps=args.steps, seed=0, jobs=n, backend=backend)
                seconds, journal = _timed_run(run, Path(args.model), Path(args.data), cfg)
            finally:
                if backend == "ray":
                    ray.shutdown()
            groups: dict[int, float] = {}
            for r in journal:
                groups[r["neighbourhood"]] = groups.get(r["neighbourhood"], 0.0) + r["seconds"]
            results["arms"][name] = {
                "jobs": len(journal), "trained": sum(r["status"] == "trained" for r in journal),
                "seconds": round(seconds, 2), "jobs_per_s": round(len(journal) / seconds, 3),
                "ray_start_seconds": None if ray_start is None else round(ray_start, 2),
                "load_average_before": round(load, 2),  # other processes on the machine skew every figure
                "group_seconds": {k: round(v, 2) for k, v in sorted(groups.items())}}
            print(f"{name:8s} {len(journal)} jobs in {seconds:6.1f} s: {len(journal) / seconds:.3f} jobs/s"
                  + (f" (Ray start {ray_start:.1f} s, not included)" if ray_start is not None else ""))
        # Projection from per-job times measured with one worker (no job contending with another for
        # the cores): a Ray arm's (one torch thread), else the first arm's
        names = list(results["arms"])
        ref = "ray:1" if "ray:1" in names else next((a for a in names if a.startswith("ray:")), names[0] if names else None)
        if ref:
            arm = results["arms"][ref]
            g = list(arm["group_seconds"].values())
            total = sum(g)
            proj = {}
            for n in (1, 2, 4, 8, 16, 32):
                span = _makespan(g, n)
                proj[n] = {"makespan_s": round(span, 2), "speedup": round(total / span, 2),
                           "jobs_per_s": round(arm["jobs"] / span, 3)}
            results["projection"] = {"from_arm": ref, "groups": len(g), "largest_group_s": round(max(g), 2),
                                     "sum_of_groups_s": round(total, 2), "workers": proj}
            print(f"projection from {ref}'s per-job times ({len(g)} neighbourhoods, largest {max(g):.1f} s "
                  f"of {total:.1f} s): " + ", ".join(f"{n} workers {p['speedup']}x" for n, p in proj.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    atomic_write_text(args.out, json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
