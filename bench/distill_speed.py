"""Speed of the distillation engine, on the bundled ResNet-20 teacher.

    python bench/distill_speed.py [--model models/resnet20_fmnist.onnx] [--out distill_speed.json] [--skip-full]

Figures (ratios measured in one run on one machine):
- engine_vs_plain: student training steps/s through the engine / a plain hand-written torch loop
  on the same block, batch and device (goal >= 0.9);
- cache_vs_ort: samples/s of the activation-cache pass / plain onnxruntime inference (goal >= 0.8),
  the two alternated over --rounds rounds, medians (see `cache_vs_ort`); exposed_vs_ort: the same
  for the pass's session alone, every boundary exposed and nothing written (its bound without writes);
- grouped_vs_single: seconds to train all candidates of a neighbourhood one at a time / from shared
  batches (> 1 means sharing batches saves time);
- full_data_free_seconds: `ndonnx distill --data-free` with the default candidates (goal < 600 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch

from ndonnx.config import DistillConfig
from ndonnx.data import load_data
from ndonnx.distill.cache import PROBE, _batch_size, _HalfSession, _probe, build_cache
from ndonnx.distill.job import Job, TrainSettings, run_group
from ndonnx.distill.runner import distill
from ndonnx.graph import load_teacher
from ndonnx.partition import partition
from ndonnx.sample import ort_session, with_outputs
from ndonnx.trainable import Trainable

ROOT = Path(__file__).resolve().parents[1]


def _jobs(run: Path, nid: int, steps: int, threads: int) -> list[Job]:
    """The jobs of neighbourhood `nid` as `distill` wrote them, re-pointed to fresh outputs."""
    out = []
    for p in sorted((run / "students").glob(f"{nid}__*.onnx")):
        cand = p.stem.split("__", 1)[1]
        res = run / "bench_done" / f"{p.stem}.json"
        out.append(Job(neighbourhood=nid, candidate=cand, student=str(p), teacher=str(run / "teacher" / f"{nid}.onnx"),
                       lookahead=(), cache=str(run / "cache"), noise=None, sparsity=None, prunable=(), train=cand != "teacher",
                       params=0, nonzero=0, weights_out=str(run / "bench_done" / f"{p.stem}.safetensors"),
                       result_out=str(res), settings=TrainSettings(steps=steps, batch=64, threads=threads)))
    return out


def _time_group(jobs: list[Job]) -> float:
    t0 = time.perf_counter()
    run_group(jobs)
    return time.perf_counter() - t0


def engine_vs_plain(run: Path, nid: int, threads: int) -> dict:
    job = [j for j in _jobs(run, nid, 10, threads) if j.candidate == "width_0.5"][0]
    short, long = 20, 120
    t_short = _time_group([replace(job, settings=replace(job.settings, steps=short))])
    t_long = _time_group([replace(job, settings=replace(job.settings, steps=long))])
    engine = (long - short) / (t_long - t_short)  # setup and evaluation cancel out
    # The plain loop: the same student module, Adam, MSE, batches from arrays in memory.
    torch.set_num_threads(threads)
    st = Trainable(onnx.load(job.student))
    from ndonnx.distill.cache import CacheReader

    cache = CacheReader(Path(job.cache))
    x_all = torch.from_numpy(cache.read(st.input_names[0], cache.train))
    y_all = torch.from_numpy(cache.read(st.output_names[0], cache.train))
    opt = torch.optim.Adam(st.named_weights().values(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(long - short):
        idx = torch.randint(len(x_all), (64,), generator=g)
        opt.zero_grad()
        loss = torch.mean((st(x_all[idx])[0] - y_all[idx]) ** 2)
        loss.backward()
        opt.step()
    plain = (long - short) / (time.perf_counter() - t0)
    return {"engine_steps_per_s": engine, "plain_steps_per_s": plain, "engine_vs_plain": engine / plain}


def grouped_vs_single(run: Path, nid: int, threads: int) -> dict:
    jobs = [j for j in _jobs(run, nid, 60, threads) if j.train]
    grouped = _time_group(jobs)
    single = sum(_time_group([j]) for j in jobs)
    return {"grouped_seconds": grouped, "single_seconds": single, "grouped_vs_single": single / grouped,
            "candidates": len(jobs)}


def cache_vs_ort(model: Path, data: Path, tmp: Path, rounds: int = 5) -> dict:
    """The cache pass against plain inference over the same data, timed the same way: each side makes
    its session (`ort_session`, the same options and threads), reads the data's shards and runs batches
    of 256; the two alternate for `rounds` rounds and the medians are compared (the machine is shared)."""
    teacher = load_teacher(model)
    ds = load_data(data, teacher)
    part = partition(teacher)
    names = sorted({n for nb in part.neighbourhoods for n in (*nb.inputs, *nb.outputs)})
    inputs = [s.name for s in ds.specs]

    def plain():
        sess = ort_session(teacher.model)
        for shard in ds.iter_shards():
            for lo in range(0, len(shard[inputs[0]]), 256):
                sess.run(None, {k: shard[k][lo:lo + 256] for k in inputs})

    def cache():  # the previous round's files are deleted after it, untimed (the pass deletes nothing)
        build_cache(teacher.model, names, ds, tmp / "cache_bench", 0, "bench")

    def exposed():  # the cache pass's own session and batches, nothing written: what exposing costs
        shard = next(iter(ds.iter_shards()))
        probed = _probe(teacher.model, names, [], {k: shard[k][:PROBE] for k in inputs})
        sess, batch = _HalfSession(teacher.model, [k for k in names if k not in inputs], probed), _batch_size(256, probed.bytes_per_sample())
        for shard in ds.iter_shards():
            for lo in range(0, len(shard[inputs[0]]), batch):
                sess.run({k: shard[k][lo:lo + batch] for k in inputs})

    times: dict[str, list[float]] = {"ort": [], "cache": [], "exposed": []}
    for _ in range(rounds):
        for side, f in (("ort", plain), ("cache", cache), ("exposed", exposed)):
            t0 = time.perf_counter()
            f()
            times[side].append(time.perf_counter() - t0)
            shutil.rmtree(tmp / "cache_bench", ignore_errors=True)
    t_ort, t_cache, t_exposed = (statistics.median(times[k]) for k in ("ort", "cache", "exposed"))
    return {"cache_seconds": t_cache, "ort_seconds": t_ort, "cache_vs_ort": t_ort / t_cache, "samples": ds.size,
            "exposed_seconds": t_exposed, "exposed_vs_ort": t_ort / t_exposed,
            "cache_rounds": times, "cache_bytes_per_sample": _cache_bytes(teacher, names, ds),
            "ort_intra_op_threads": "onnxruntime default (one per physical core), both sides"}


def _cache_bytes(teacher, names: list[str], ds) -> int:
    """Bytes one sample adds to the cache (float32 tensors stored float16)."""
    outs = ort_session(with_outputs(teacher.model, names)).run(names, ds.head(1))
    return int(sum(o.size * (2 if o.dtype == np.float32 else o.itemsize) for o in outs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "resnet20_fmnist.onnx")
    ap.add_argument("--data", type=Path, default=ROOT / "models" / "fmnist_subset.npz")
    ap.add_argument("--out", type=Path, default=Path("distill_speed.json"))
    ap.add_argument("--skip-full", action="store_true", help="skip the full data-free distill")
    ap.add_argument("--rounds", type=int, default=5, help="alternated rounds of the cache-pass comparison")
    ap.add_argument("--cache-only", action="store_true", help="only the cache pass vs plain inference")
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    res: dict = {"cores": threads, "model": str(args.model)}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        res.update(cache_vs_ort(args.model, args.data, tmp, args.rounds))
        print(f"cache pass vs plain onnxruntime: {res['cache_vs_ort']:.2f} (medians {res['cache_seconds']:.2f} s vs "
              f"{res['ort_seconds']:.2f} s over {args.rounds} alternated rounds; goal >= 0.8)")
        print(f"  its session alone, boundaries exposed, nothing written: {res['exposed_vs_ort']:.2f} "
              f"({res['exposed_seconds']:.2f} s): the bound without writes")
        if args.cache_only:
            args.out.write_text(json.dumps(res, indent=2))
            return 0
        run = tmp / "run"
        cfg = DistillConfig(steps=1, jobs=1, candidates="width:0.25,width:0.5,width:0.75,lowrank:0.5,teacher")
        distill(args.model, run, cfg, data_path=args.data)  # writes students, teacher pieces and the cache
        (run / "bench_done").mkdir()
        nid = 2  # a 16-channel residual block
        res.update(engine_vs_plain(run, nid, threads))
        res.update(grouped_vs_single(run, nid, threads))
        if not args.skip_full:
            t0 = time.perf_counter()
            distill(args.model, tmp / "full", DistillConfig(data_free=True))
            res["full_data_free_seconds"] = time.perf_counter() - t0
            rows = json.loads((tmp / "full" / "candidates.json").read_text())
            res["full_data_free_jobs"] = len(rows)
    print(f"engine vs plain torch loop: {res['engine_vs_plain']:.2f} ({res['engine_steps_per_s']:.1f} vs "
          f"{res['plain_steps_per_s']:.1f} steps/s; goal >= 0.9)")
    print(f"one at a time / shared batches: {res['grouped_vs_single']:.2f} ({res['candidates']} candidates)")
    if "full_data_free_seconds" in res:
        print(f"full data-free distill, default candidates: {res['full_data_free_seconds']:.0f} s "
              f"({res['full_data_free_jobs']} candidates; goal < 600 s)")
    args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
