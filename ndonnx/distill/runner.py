"""`ndonnx distill`: prepare the run directory (teacher pieces, students, activation cache), then
run every unfinished job, in parallel across neighbourhoods, resumable after a crash. What the run
directory holds: `ndonnx.distill.layout`."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx
from safetensors.numpy import save_file

from ndonnx.config import DistillConfig
from ndonnx.data import Dataset, load_data, teacher_hash
from ndonnx.distill.backends import plan_local, run_pool, shown, with_threads
from ndonnx.distill.cache import CacheReader, build_cache, fingerprint
from ndonnx.files import atomic_path, atomic_write_text
from ndonnx.distill.layout import Layout
from ndonnx.distill.prepare import Prepared
from ndonnx.errors import NdonnxError
from ndonnx.graph import Teacher, load_teacher
from ndonnx.memory import release_freed_memory
from ndonnx.partition import Partition, partition
from ndonnx.config import SampleConfig
from ndonnx.sample import index_ranges, run_sample, with_dynamic_batch
from ndonnx.synthetic import SyntheticConfig, cached_inputs, resolve_method

if TYPE_CHECKING:
    from ndonnx.distill.job import Job

log = logging.getLogger(__name__)
BANK_ROWS = 256
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
            progress: Callable | None = None, check_sizes: Callable[[int, dict], None] | None = None,
            teacher: Teacher | None = None) -> list[dict]:
    """Prepare and run every job; returns the rows of candidates.json. `check_sizes(teacher params,
    {neighbourhood: (its own params, its candidates' counts)})` is called once the counts are known,
    before any training (it raises to stop: a budget that cannot be met). `teacher`: the model at
    `model_path`, already loaded. Every input is checked before torch is imported."""
    from ndonnx.candidates import DEFAULT_CANDIDATES, parse_candidates, with_multiple

    specs = with_multiple(parse_candidates(cfg.candidates or DEFAULT_CANDIDATES), cfg.channel_multiple)
    if data_path is None and not cfg.data_free:
        raise NdonnxError("give calibration data with --data FILE.npz, or use --data-free")
    if data_path is not None and cfg.data_free and cfg.data_free_method == "bn-stats":
        raise NdonnxError("--data-free-method bn-stats makes inputs where there is no data; with --data, "
                          "--data-free trains on Gaussian noise matched to it")
    teacher = with_dynamic_batch(teacher or load_teacher(model_path))
    data = load_data(data_path, teacher, cfg.labels) if data_path is not None else None  # checked before any write
    if cfg.backend == "ray":
        from ndonnx.distill.ray_backend import preflight

        preflight()  # a missing extra or a cluster that is not there: usage errors, found before any work
        device = cfg.device  # the cluster's GPUs, not this machine's, decide: settled when it is joined
    else:
        device = resolve_device(cfg.device)
    part = partition(teacher, cfg.partition)
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        return _distill(teacher, part, data, run_dir, cfg, specs, device, progress, check_sizes)
    except Exception:
        if created and not Layout(run_dir).journal:  # nothing worth keeping: leave no stub
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _distill(teacher: Teacher, part: Partition, data: Dataset | None, run_dir: Path, cfg: DistillConfig, specs,
             device: str, progress: Callable | None, check_sizes: Callable | None) -> list[dict]:
    from ndonnx.candidates import REGISTRY
    from ndonnx.distill.job import Job, TrainSettings

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
    cache_dir = layout.cache
    names = sorted({n for nbh in part.neighbourhoods for n in (*nbh.inputs, *nbh.outputs, *nbh.side_inputs)}
                   | set(teacher.input_names) | {o.name for o in teacher.model.graph.output})
    shape_only = sorted({n for nbh in part.neighbourhoods for n in nbh.shape_inputs} - set(names))
    digest = teacher_hash(teacher.model)
    build_cache(teacher.model, names, data, cache_dir, cfg.seed, fingerprint(digest, data), progress=progress,
                shape_only=shape_only, cuda=_cuda_here(device))
    release_freed_memory()  # the cache pass's sessions
    reader = CacheReader(cache_dir)
    # families that build from the calibration data (vocab) read their neighbourhood's inputs of the
    # training split; synthetic stand-ins for data are no calibration data
    calibrates = real and any(REGISTRY[s.family].needs_sample for s in specs)
    records = _prepared(teacher, part, data, layout, specs, reader, calibrates, cfg, digest, progress)
    release_freed_memory()  # the sample run and the students made (the workers' memory comes next)
    if check_sizes is not None:  # a budget no candidate mix can meet fails here, before any training
        own = {nbh.id: nbh.params for nbh in part.neighbourhoods}
        check_sizes(teacher.params, {nid: (own[nid], [st["params"] for st in r.students if st["candidate"] != "teacher"])
                                     for nid, r in records.items() if r.convertible})

    rows_fixed: list[dict] = []  # neighbourhoods kept as the teacher without training
    jobs: list[Job] = []
    subs: dict[int, Path] = {}
    skipped: dict[str, dict[str, str]] = {}
    for nbh in part.neighbourhoods:
        rec = records[nbh.id]
        if not rec.convertible:
            rows_fixed.append(_teacher_row(nbh.id, nbh.params, f"kept as teacher: {rec.reason}"))
            continue
        path = layout.teacher(nbh.id)
        subs[nbh.id] = path
        skipped[str(nbh.id)] = rec.reasons
        for st in rec.students:
            name = st["candidate"]
            # The teacher's size is what it owns: weights it shares with other neighbourhoods are
            # counted once, outside (a student gets its own copy, so its count includes them).
            params = nbh.params if name == "teacher" else st["params"]
            nonzero = nbh.params if name == "teacher" else st["nonzero"]
            jobs.append(Job(
                neighbourhood=nbh.id, candidate=name, student=str(layout.student(nbh.id, name)), teacher=str(path),
                lookahead=(), cache=str(cache_dir), noise=None, sparsity=st["sparsity"],
                prunable=tuple(st["prunable"]), train=name != "teacher" and st["params"] > 0, params=params,
                nonzero=nonzero, note=st["note"], refit=st["refit"] and bool(rec.fit_samples),
                fit_samples=rec.fit_samples, weights_out=str(layout.weights(nbh.id, name)),
                result_out=str(layout.done(nbh.id, name)),
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


def _prepared(teacher: Teacher, part: Partition, data: Dataset, layout: Layout, specs, reader: CacheReader,
              calibrates: bool, cfg: DistillConfig, digest: str, progress: Callable | None) -> dict[int, Prepared]:
    """Every neighbourhood's preparation: read from its record where the keys match, else made (the
    sample run that it needs only then)."""
    from ndonnx.distill import prepare as prep

    fp = reader.fingerprint
    keys = {nbh.id: prep.piece_key(digest, cfg.partition.to_dict(), fp, nbh.id) for nbh in part.neighbourhoods}
    spec_names = [str(s) for s in specs]
    records = {nbh.id: prep.load(layout, nbh.id) for nbh in part.neighbourhoods}
    todo = [nbh for nbh in part.neighbourhoods if records[nbh.id] is None or records[nbh.id].piece != keys[nbh.id]
            or records[nbh.id].students_key != prep.students_key(keys[nbh.id], spec_names, fp)]
    if todo:
        sample = run_sample(teacher, feeds=data.head(SampleConfig.batch))
        for nbh in shown(todo, progress, label="prepare"):
            key = prep.students_key(keys[nbh.id], spec_names, fp)
            records[nbh.id] = prep.prepare(teacher, nbh, sample, layout, specs, keys[nbh.id], key, reader,
                                           calibrates, records[nbh.id])
    return records


def run_group(jobs: list[Job]) -> list[dict]:
    """`job.run_group` here (torch is imported when the first job runs, not with this module)."""
    from ndonnx.distill.job import run_group as run

    return run(jobs)


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
