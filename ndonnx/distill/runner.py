"""`ndonnx distill`: prepare the run directory (teacher pieces, students, activation cache), then
run every unfinished job, in parallel across neighbourhoods, resumable after a crash. What the run
directory holds: `ndonnx.distill.layout`."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from safetensors.numpy import save_file

from ndonnx.config import DistillConfig
from ndonnx.convert import extract, round_trip
from ndonnx.data import Dataset, load_data, teacher_hash
from ndonnx.distill.backends import plan_local, run_pool, shown, with_threads
from ndonnx.distill.cache import CacheReader, build_cache, fingerprint
from ndonnx.files import atomic_path, atomic_write_text
from ndonnx.distill.job import Job, TrainSettings, run_group
from ndonnx.distill.layout import Layout
from ndonnx.errors import NdonnxError
from ndonnx.graph import Teacher, load_teacher
from ndonnx.partition import Partition, partition
from ndonnx.config import SampleConfig
from ndonnx.sample import index_ranges, run_sample, with_dynamic_batch
from ndonnx.synthetic import SyntheticConfig, cached_inputs, resolve_method

log = logging.getLogger(__name__)
BANK_ROWS = 256
REFITTED = ("width", "lowrank")  # families whose students are fitted to the teacher before training (`Student.refit`)
FIT_SAMPLES, CHECK_SAMPLES = 256, 32  # cached samples students are fitted on / judged on before training (at most)
FIT_BYTES = 256 << 20  # ... and at most about this much of a neighbourhood's tensors at once
SYNTHETIC_SAMPLES = 256  # data-free runs without data, noise: held-out inputs for scoring
SYNTHETIC_OPTIMISED = 512  # bn-stats, inversion: the inputs every neighbourhood trains on (and the held-out 10%)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise NdonnxError("--device cuda: torch sees no CUDA device")
    return device


def _cuda_here(device: str) -> bool:
    """Whether this process's teacher passes (the activation cache) run on CUDA: on a device that asks
    for it and that this machine has (with --backend ray the device is the cluster's, unresolved)."""
    import torch

    return device != "cpu" and torch.cuda.is_available()


def _open_run_dir(run_dir: Path, teacher: Teacher, cfg: DistillConfig) -> None:
    """Refuse a directory made for another model (or wipe it with --force); bind a new one to this
    teacher. Settings are recorded when the stage commits (`_commit`), so a failed or interrupted
    command leaves run.json as the last finished one wrote it."""
    meta_path = Layout(run_dir).run_json
    digest = teacher_hash(teacher.model)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("teacher_hash") != digest:
            if not cfg.force:
                raise NdonnxError(f"{run_dir} holds a run of another model ({meta.get('teacher')}); "
                                  f"use another --run-dir, or --force to start anew")
            shutil.rmtree(run_dir)
        elif meta.get("settings") != _job_settings(cfg):
            log.warning("%s was made with other settings; finished jobs are kept, new ones use the new settings", run_dir)
    Layout(run_dir).make()
    if not meta_path.exists():
        _commit(run_dir, teacher, cfg)


def _commit(run_dir: Path, teacher: Teacher, cfg: DistillConfig, backend: dict | None = None) -> None:
    # absolute: `search` works from any folder. `backend`: what ran this command's jobs (each job's
    # host is in its journal record); kept from the last command that trained any
    meta_path = Layout(run_dir).run_json
    if backend is None and meta_path.exists():
        backend = json.loads(meta_path.read_text()).get("backend")
    atomic_write_text(meta_path, json.dumps(
        {"teacher": str(teacher.path.resolve()), "teacher_hash": teacher_hash(teacher.model),
         "settings": _job_settings(cfg), "config": cfg.to_dict(), "backend": backend}, indent=1))


def _job_settings(cfg: DistillConfig) -> dict:
    keys = ("candidates", "channel_multiple", "steps", "batch", "lr", "seed", "lookahead", "data_free", "min_steps",
            "patience", "min_gain", "fit_tolerance", "dominated")
    if cfg.data_free:  # (only then: runs made before these settings existed stay comparable)
        keys += ("data_free_method", "synthetic_count")
    return {k: getattr(cfg, k) for k in keys}


def distill(model_path: str | Path, run_dir: str | Path, cfg: DistillConfig, data_path: str | Path | None = None,
            progress: Callable | None = None) -> list[dict]:
    """Prepare and run every job; returns the rows of candidates.json."""
    from ndonnx.candidates import DEFAULT_CANDIDATES, parse_candidates, with_multiple

    specs = with_multiple(parse_candidates(cfg.candidates or DEFAULT_CANDIDATES), cfg.channel_multiple)
    if data_path is None and not cfg.data_free:
        raise NdonnxError("give calibration data with --data FILE.npz, or use --data-free")
    if data_path is not None and cfg.data_free and cfg.data_free_method == "bn-stats":
        raise NdonnxError("--data-free-method bn-stats makes inputs where there is no data; with --data, "
                          "--data-free trains on Gaussian noise matched to it")
    if cfg.backend == "ray":
        from ndonnx.distill.ray_backend import preflight

        preflight()  # a missing extra or a cluster that is not there: usage errors, found before any work
        device = cfg.device  # the cluster's GPUs, not this machine's, decide: settled when it is joined
    else:
        device = resolve_device(cfg.device)
    teacher = with_dynamic_batch(load_teacher(model_path))
    data = load_data(data_path, teacher, cfg.labels) if data_path is not None else None  # checked before any write
    part = partition(teacher, cfg.partition)
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        return _distill(teacher, part, data, run_dir, cfg, specs, device, progress)
    except Exception:
        if created and not Layout(run_dir).journal:  # nothing worth keeping: leave no stub
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _distill(teacher: Teacher, part: Partition, data: Dataset | None, run_dir: Path, cfg: DistillConfig, specs,
             device: str, progress: Callable | None) -> list[dict]:
    from ndonnx.candidates import REGISTRY, build_candidates

    _open_run_dir(run_dir, teacher, cfg)
    layout = Layout(run_dir)
    real = data is not None
    noise = cfg.data_free  # neighbourhoods train on Gaussian noise at their boundary, not on cached inputs
    if not real:  # data-free: synthetic inputs made from the teacher alone stand in for data (ndonnx.synthetic)
        method, why = resolve_method(teacher, cfg.data_free_method)
        if why:
            log.warning(why)
        noise = method == "noise"  # noise: the inputs are only the held-out set for scores
        scfg = SyntheticConfig(method=method, seed=cfg.seed,
                               count=cfg.synthetic_count or (SYNTHETIC_SAMPLES if noise else SYNTHETIC_OPTIMISED))
        data = load_data(cached_inputs(teacher, layout.synthetic, scfg, teacher_hash(teacher.model), progress), teacher)
    sample = run_sample(teacher, feeds=data.head(SampleConfig.batch))

    cache_dir = layout.cache
    names = sorted({n for nbh in part.neighbourhoods for n in (*nbh.inputs, *nbh.outputs, *nbh.side_inputs)}
                   | set(teacher.input_names) | {o.name for o in teacher.model.graph.output})
    shape_only = sorted({n for nbh in part.neighbourhoods for n in nbh.shape_inputs} - set(names))
    build_cache(teacher.model, names, data, cache_dir, cfg.seed, fingerprint(teacher_hash(teacher.model), data), progress=progress,
                shape_only=shape_only, cuda=_cuda_here(device))
    # families that build from the calibration data (vocab) read their neighbourhood's inputs of the
    # training split; synthetic stand-ins for data are no calibration data
    calibrates = real and any(REGISTRY[s.family].needs_sample for s in specs)
    reader = CacheReader(cache_dir) if calibrates or any(s.family in REFITTED for s in specs) else None

    rows_fixed: list[dict] = []  # neighbourhoods kept as the teacher without training
    jobs: list[Job] = []
    subs: dict[int, Path] = {}
    skipped: dict[str, dict[str, str]] = {}
    for nbh in shown(part.neighbourhoods, progress, label="prepare"):
        rt = round_trip(teacher, nbh, sample)
        if not rt.convertible:
            rows_fixed.append(_teacher_row(nbh.id, nbh.params, f"kept as teacher: {rt.reason}"))
            continue
        sub = extract(teacher, nbh, sample)
        path = layout.teacher(nbh.id)
        _save_model(sub, path)
        subs[nbh.id] = path
        ins = [i.name for i in sub.graph.input]
        calib = reader.tensors(ins, reader.train) if calibrates else None
        feeds = {n: sample.values[n] for n in ins} if all(n in sample.values for n in ins) else None
        fit = _fit_feeds(reader, sub, sample) if reader else None
        students, reasons = build_candidates(sub, specs, sample=calib, feeds=feeds, fit=fit)
        skipped[str(nbh.id)] = reasons
        for st in students:
            name = str(st.spec)
            # The teacher's size is what it owns: weights it shares with other neighbourhoods are
            # counted once, outside (a student gets its own copy, so its count includes them).
            params = nbh.params if name == "teacher" else st.params
            nonzero = nbh.params if name == "teacher" else st.nonzero
            spath = layout.student(nbh.id, name)
            if not spath.exists():
                _save_model(st.model, spath)
            jobs.append(Job(
                neighbourhood=nbh.id, candidate=name, student=str(spath), teacher=str(path), lookahead=(),
                cache=str(cache_dir), noise=None, sparsity=st.sparsity, prunable=st.prunable,
                train=name != "teacher" and st.params > 0, params=params, nonzero=nonzero, note=st.note,
                weights_out=str(layout.weights(nbh.id, name)), result_out=str(layout.done(nbh.id, name)),
                settings=TrainSettings(steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, seed=cfg.seed, device=device,
                                       lookahead=cfg.lookahead, data_free=noise, min_steps=cfg.min_steps,
                                       patience=cfg.patience, min_gain=cfg.min_gain,
                                       fit_tolerance=cfg.fit_tolerance, dominated=cfg.dominated)))
    atomic_write_text(layout.skipped_json, json.dumps(skipped, indent=1))
    if noise:
        _write_noise(part, teacher.model, cache_dir, real, run_dir)
    jobs = [_with_context(j, part, subs, run_dir, replace(cfg, data_free=noise)) for j in jobs]
    done = sum(Path(j.result_out).exists() for j in jobs)
    if done:
        log.info("reusing %s: %d of %d jobs done", run_dir, done, len(jobs))
    try:
        backend = _run(jobs, cfg, device, progress)
    except KeyboardInterrupt:
        done = sum(Path(j.result_out).exists() for j in jobs)
        log.warning("stopped: %d of %d jobs are journalled in %s; the same command resumes from there",
                    done, len(jobs), run_dir)
        raise
    rows = write_candidates(run_dir, rows_fixed)
    _commit(run_dir, teacher, cfg, backend)
    return rows


def _with_context(job: Job, part: Partition, subs: dict[int, Path], run_dir: Path, cfg: DistillConfig) -> Job:
    ids = [n.id for n in part.neighbourhoods]
    pos = ids.index(job.neighbourhood)
    nxt = []
    made = set(part.neighbourhoods[pos].outputs)
    for i in ids[pos + 1: pos + 1 + cfg.lookahead]:
        nbh = part.neighbourhoods[ids.index(i)]
        # stops at one that does not convert or reads none of it; data-free batches hold no other boundary
        if i not in subs or not made & set(nbh.inputs) or (cfg.data_free and not set(nbh.inputs) <= made):
            break
        made |= set(nbh.outputs)
        nxt.append(str(subs[i]))
    noise = str(Layout(run_dir).noise(job.neighbourhood)) if cfg.data_free else None
    return replace(job, lookahead=tuple(nxt), noise=noise)


def _teacher_row(nid: int, params: int, reason: str | None) -> dict:
    return {"neighbourhood": nid, "candidate": "teacher", "params": params, "nonzero": params, "rel_mse": 0.0,
            "train_rel_mse": None, "status": "frozen", "reason": reason, "weights": None, "seconds": 0.0}


def _save_model(model: onnx.ModelProto, path: Path) -> None:
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def _write_noise(part: Partition, part_model: onnx.ModelProto, cache_dir: Path, real: bool, run_dir: Path) -> None:
    """Per-channel mean/std of each boundary from real data when some is given, else N(0, 1);
    banks of side-input rows (real, or the synthetic held-out inputs) so masks and ids stay valid.
    Shapes and banks keep each tensor's batch axis (seq-first transformers carry it at 1); a side
    input that is the same for every sample is stored once, shape-only inputs not at all."""
    reader = CacheReader(cache_dir)
    sides = sorted({n for nbh in part.neighbourhoods for n in nbh.feeds[1:]} - set(reader.shape_only))
    for nbh in part.neighbourhoods:
        main = nbh.inputs[0]
        ref = reader.read(main, reader.train[:2048])
        axis = reader.batch_axis.get(main, 0)
        arrays = {f"shape:{main}": np.array(ref.shape, np.int64), f"axis:{main}": np.array(axis, np.int64)}
        if not np.issubdtype(ref.dtype, np.floating):  # token ids: uniform over the embedding table
            arrays[f"high:{main}"] = np.array(index_ranges(part_model).get(main, 2), np.int64)
        else:
            # Statistics per channel: axis 1 of images (NCHW), the last axis of sequences.
            ch = 1 if ref.ndim == 4 else ref.ndim - 1
            axes = tuple(k for k in range(ref.ndim) if k != ch)
            if real:
                mean, std = ref.mean(axis=axes, keepdims=True), ref.std(axis=axes, keepdims=True)
            else:
                mean, std = np.zeros((1,) * ref.ndim, np.float32), np.ones((1,) * ref.ndim, np.float32)
            arrays[f"mean:{main}"] = mean.astype(np.float32)
            arrays[f"std:{main}"] = np.maximum(std, 1e-6).astype(np.float32)
        for name in sides:  # every side input, so look-ahead neighbourhoods find theirs too
            if reader.batch_axis.get(name, 0) is None:
                arrays[f"const:{name}"] = np.ascontiguousarray(reader.read(name, reader.train[:1]))
                continue
            bank = reader.read(name, reader.train[:BANK_ROWS])
            arrays[f"bank:{name}"] = np.ascontiguousarray(np.moveaxis(bank, reader.batch_axis.get(name, 0), 0))
            arrays[f"axis:{name}"] = np.array(reader.batch_axis.get(name, 0), np.int64)
        with atomic_path(Layout(run_dir).noise(nbh.id)) as tmp:
            save_file(arrays, str(tmp))


def _run(jobs: list[Job], cfg: DistillConfig, device: str, progress: Callable | None) -> dict | None:
    """Run the unfinished jobs, one group per neighbourhood; returns what ran them (for run.json)."""
    groups: dict[int, list[Job]] = {}
    for j in jobs:
        if not Path(j.result_out).exists():
            groups.setdefault(j.neighbourhood, []).append(j)
    if not groups:
        return None
    if cfg.backend == "ray":
        from ndonnx.distill.ray_backend import run_ray

        return run_ray(list(groups.values()), cfg, progress)
    plan = plan_local(device, cfg.jobs, len(groups))
    batches = with_threads(list(groups.values()), plan.threads)
    if plan.workers == 1:
        for g in shown(batches, progress):
            run_group(g)
    else:
        run_pool(batches, plan, progress)
    return {"name": "local", "workers": plan.workers, "device": device,
            **({"gpus": list(plan.devices)} if plan.devices[0] is not None else {})}


def write_candidates(run_dir: Path, extra_rows: list[dict] = ()) -> list[dict]:
    rows = list(extra_rows) + [json.loads(p.read_text()) for p in Layout(run_dir).journal]
    rows.sort(key=lambda r: (r["neighbourhood"], r["candidate"] != "teacher", r["params"]))
    atomic_write_text(Layout(run_dir).candidates_json, json.dumps(rows, indent=1))
    return rows


def _fit_feeds(reader: CacheReader, sub: onnx.ModelProto, sample) -> tuple[dict, dict] | None:
    """Inputs of the neighbourhood to fit students on before training and to judge that fit on
    (`Student.refit`): evenly spaced training samples, disjoint, as many as FIT_BYTES of its tensors
    allow (their size per sample read off the sample run, of SampleConfig.batch samples). None where
    the cache lacks an input."""
    ins = [i.name for i in sub.graph.input]
    if not all(n in reader.arrays or n in reader.shape_only for n in ins):
        return None
    per = sum(sample.values[o].nbytes for node in sub.graph.node for o in node.output if o in sample.values)
    n = max(2, min(FIT_SAMPLES + CHECK_SAMPLES, FIT_BYTES * SampleConfig.batch // max(per, 1)))
    idx = reader.train[np.linspace(0, len(reader.train) - 1, min(n, len(reader.train))).astype(int)]
    if len(idx) < 4:
        return reader.tensors(ins, idx), reader.tensors(ins, idx)
    every = max(2, round(len(idx) / max(1, round(len(idx) * CHECK_SAMPLES / (FIT_SAMPLES + CHECK_SAMPLES)))))
    check = np.zeros(len(idx), bool)
    check[every - 1::every] = True
    return reader.tensors(ins, idx[~check]), reader.tensors(ins, idx[check])
