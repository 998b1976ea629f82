"""GPU against CPU on the bundled ResNet-20 teacher: the cache pass, seconds per distillation job, and
`compress` end to end on CUDA.

    python bench/gpu.py [--steps 300] [--cpu-compress] [--out gpu.json]
    python bench/gpu.py --dry-run --steps 5 --compress-steps 5 --finetune-steps 5 --rounds 1 --candidates width:0.25,teacher

Needs torch with CUDA and onnxruntime's CUDA provider (`pip install -e '.[gpu]' && pip uninstall -y
onnxruntime`); without them it says which is missing and exits 2. One machine, one run:

1. the activation-cache pass over `fmnist_subset.npz`, onnxruntime's CPU provider against its CUDA
   provider, alternated over --rounds rounds (medians; the files are deleted after each round, untimed);
2. the job phase of `distill` (default candidates, --steps per job) from one prepared run directory,
   `--device cpu` then `--device cuda` (the journal's seconds per job; jobs/s of the phase);
3. `compress` with the README quick start's settings on CUDA (stage seconds, accuracy, agreement), and on
   the CPU too with --cpu-compress.

`--dry-run` runs every step with the CPU standing in for CUDA (a check of the script on a machine
without a GPU; its figures compare the CPU with itself).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from scale_out import _timed_run, prepare

from ndonnx.compress import CompressConfig, compress
from ndonnx.config import DistillConfig
from ndonnx.data import load_data
from ndonnx.distill.cache import build_cache
from ndonnx.files import atomic_write_text
from ndonnx.graph import load_teacher
from ndonnx.partition import partition

ROOT = Path(__file__).resolve().parents[1]


def missing_cuda() -> str | None:
    """Why this machine cannot run the GPU arms, or None."""
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDA provider (pip install -e '.[gpu]' && pip uninstall -y onnxruntime)"
    return None


def cache_pass(model: Path, data: Path, tmp: Path, rounds: int, gpu: bool) -> dict:
    teacher = load_teacher(model)
    ds = load_data(data, teacher)
    names = sorted({n for nb in partition(teacher).neighbourhoods for n in (*nb.inputs, *nb.outputs)})
    times: dict[str, list[float]] = {"cpu": [], "cuda": []}
    for _ in range(rounds):
        for side in times:
            t0 = time.perf_counter()
            build_cache(teacher.model, names, ds, tmp / "cache", 0, side, cuda=side == "cuda" and gpu)
            times[side].append(time.perf_counter() - t0)
            shutil.rmtree(tmp / "cache")
    cpu, cuda = statistics.median(times["cpu"]), statistics.median(times["cuda"])
    return {"samples": ds.size, "cpu_seconds": cpu, "cuda_seconds": cuda, "cuda_speedup": cpu / cuda, "rounds": times}


def job_phase(model: Path, data: Path, tmp: Path, steps: int, candidates: str | None, gpu: bool) -> dict:
    run = tmp / "run"
    prepare(run, model, data, DistillConfig(steps=steps, seed=0, device="cpu", candidates=candidates))
    out = {}
    for device in ("cpu", "cuda"):
        cfg = DistillConfig(steps=steps, seed=0, device=device if gpu else "cpu", candidates=candidates)
        seconds, journal = _timed_run(run, model, data, cfg)
        per_job = [r["seconds"] for r in journal if r.get("seconds") is not None]
        out[device] = {"phase_seconds": seconds, "jobs": len(journal), "jobs_per_s": len(journal) / seconds,
                       "median_job_seconds": statistics.median(per_job), "sum_job_seconds": sum(per_job)}
    out["cuda_speedup"] = out["cpu"]["phase_seconds"] / out["cuda"]["phase_seconds"]
    return out


def compress_run(model: Path, data: Path, eval_data: Path, tmp: Path, device: str, args: argparse.Namespace) -> dict:
    cfg = CompressConfig(distill=DistillConfig(labels="labels", device=device, candidates=args.candidates,
                                               steps=args.compress_steps), target="50%",
                         finetune_steps=args.finetune_steps, eval_data=str(eval_data))
    t0 = time.perf_counter()
    report = compress(model, tmp / f"compress_{device}", cfg, data_path=data, output=tmp / f"student_{device}.onnx")
    v = report["validation"]
    return {"seconds": time.perf_counter() - t0, "stages": report["timings"], "params": report.get("params_student"),
            "accuracy_teacher": v.get("accuracy_teacher"), "accuracy_student": v.get("accuracy_student"),
            "top1_agreement": v.get("top1_agreement")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "resnet20_fmnist.onnx")
    ap.add_argument("--data", type=Path, default=ROOT / "models" / "fmnist_subset.npz")
    ap.add_argument("--eval-data", type=Path, default=ROOT / "models" / "fmnist_test.npz")
    ap.add_argument("--steps", type=int, default=300, help="training steps per job in the job phase")
    ap.add_argument("--candidates", help="candidate families (default: distill's default set)")
    ap.add_argument("--compress-steps", type=int, default=300, help="steps per job in the compress runs")
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds of the cache pass")
    ap.add_argument("--cpu-compress", action="store_true", help="also compress on the CPU")
    ap.add_argument("--dry-run", action="store_true", help="the CPU stands in for CUDA (checks the script)")
    ap.add_argument("--out", type=Path, default=Path("gpu.json"))
    args = ap.parse_args()
    why = missing_cuda()
    if why and not args.dry_run:
        print(f"bench/gpu.py: {why}")
        return 2
    gpu = not args.dry_run
    if not gpu:
        print("dry run: the CPU stands in for CUDA below (figures compare the CPU with itself)")
    import torch

    res: dict = {"cores": os.cpu_count(), "dry_run": args.dry_run,
                 "gpu": torch.cuda.get_device_name(0) if gpu else None, "steps": args.steps}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        res["cache_pass"] = c = cache_pass(args.model, args.data, tmp, args.rounds, gpu)
        print(f"cache pass, {c['samples']} samples: CPU {c['cpu_seconds']:.2f} s, CUDA {c['cuda_seconds']:.2f} s "
              f"({c['cuda_speedup']:.2f}x)")
        res["job_phase"] = j = job_phase(args.model, args.data, tmp, args.steps, args.candidates, gpu)
        for device in ("cpu", "cuda"):
            r = j[device]
            print(f"job phase on {device}: {r['jobs']} jobs in {r['phase_seconds']:.1f} s ({r['jobs_per_s']:.2f} jobs/s), "
                  f"median {r['median_job_seconds']:.2f} s per job")
        print(f"job phase: CUDA {j['cuda_speedup']:.2f}x the CPU")
        for device in ("cuda", "cpu") if args.cpu_compress else ("cuda",):
            res[f"compress_{device}"] = r = compress_run(args.model, args.data, args.eval_data, tmp,
                                                         device if gpu else "cpu", args)
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in r["stages"].items())
            print(f"compress on {device}: {r['seconds']:.0f} s ({stages}); accuracy {r['accuracy_teacher']:.4f} -> "
                  f"{r['accuracy_student']:.4f}, agreement {r['top1_agreement']:.4f}")
    atomic_write_text(args.out, json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
