"""`ndonnx compress` end to end: distill (reusing the run directory) -> score and search -> splice
-> (fine-tune) -> validate -> report. `ndonnx search` is the same minus the distillation."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from ndonnx.config import DistillConfig, PartitionConfig, SampleConfig
from ndonnx.distill.cache import CacheReader, atomic_write_text
from ndonnx.data import load_data
from ndonnx.distill.runner import distill
from ndonnx.errors import GoalNotMet, NdonnxError
from ndonnx.graph import Teacher, load_teacher, restore_interface, with_dynamic_batch
from ndonnx.partition import Partition, partition
from ndonnx.sample import run_sample
from ndonnx.search import Scorer, load_options, parse_target, save_scores, search
from ndonnx.splice import check, save_atomic
from ndonnx.trainable import Trainable, write_weights
from ndonnx.validate import validate


@dataclass(frozen=True)
class CompressConfig:
    distill: DistillConfig = field(default_factory=DistillConfig)
    target: str = "50%"
    strategy: str = "greedy"
    max_drop: float | None = None
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    temperature: float = 4.0
    kd_lambda: float = 0.5  # weight of cross-entropy on labels next to the soft targets (Eq. 3)
    eval_data: str | None = None  # validate on this data (e.g. a test set) instead of the held-out split
    tolerances: str | None = None  # `ndonnx sensitivity --json` output: per-neighbourhood noise thresholds


def default_output(teacher_path: Path) -> Path:
    name = teacher_path.name[:-5] if teacher_path.name.endswith(".onnx") else teacher_path.name
    return teacher_path.with_name(f"{name}.ndonnx.onnx")


def compress(model_path: str | Path, run_dir: str | Path, cfg: CompressConfig, data_path: str | Path | None = None,
             output: str | Path | None = None, progress: Callable | None = None) -> dict:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model_path, run_dir = Path(model_path), Path(run_dir)
    parse_target(cfg.target, 1)  # refuse a malformed target before any training
    distill(model_path, run_dir, cfg.distill, data_path=data_path, progress=progress)
    timings["distill"] = time.perf_counter() - t0
    return build(run_dir, cfg, output or default_output(model_path), timings, progress)


def build(run_dir: Path, cfg: CompressConfig, output: str | Path | None, timings: dict | None = None,
          progress: Callable | None = None) -> dict:
    """Search, splice, fine-tune, validate: no distillation (what `ndonnx search RUN_DIR` runs)."""
    timings = dict(timings or {})
    run_dir = Path(run_dir)
    meta = _run_meta(run_dir)
    teacher_path = _teacher_path(run_dir, meta)
    output = Path(output) if output else default_output(teacher_path)
    if output.resolve() == teacher_path.resolve():
        raise NdonnxError(f"-o {output}: that is the teacher file; it is never overwritten")
    t0 = time.perf_counter()
    run = open_run(run_dir)
    declared, teacher, part, cache, scorer, options = (run.declared, run.teacher, run.part, run.cache, run.scorer,
                                                       run.options)
    target = parse_target(cfg.target, teacher.params)
    result = search(scorer, options, target, cfg.strategy, cfg.max_drop, tolerances=_tolerances(cfg, part))
    save_scores(run_dir, options, scorer)
    timings["search"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    student = scorer.compose(result.choice)
    _add_meta(student, {"settings": {"target": cfg.target, "strategy": cfg.strategy, "max_drop": cfg.max_drop,
                                     "finetune_steps": cfg.finetune_steps, **meta["settings"]}})
    check(student)
    timings["splice"] = time.perf_counter() - t0

    finetune_report = None
    if cfg.finetune_steps > 0:
        t0 = time.perf_counter()
        student, finetune_report = finetune(student, teacher.model, cache, scorer, cfg)
        check(student)
        timings["finetune"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    inputs, eval_labels = scorer.inputs, scorer.labels
    if cfg.eval_data:
        labels_key = meta["config"].get("labels")
        arrays = load_data(cfg.eval_data, teacher, labels_key).read_all()
        eval_labels = arrays.pop(labels_key) if labels_key else None
        inputs = arrays
    val = validate(student, teacher.model, inputs, eval_labels)
    val["data"] = str(cfg.eval_data) if cfg.eval_data else "held-out split of the calibration data"
    timings["validate"] = time.perf_counter() - t0
    drop = val["score_teacher"] - val["score_student"]
    report = {
        "teacher": str(teacher_path), "output": str(output), "target_params": target,
        "params_teacher": teacher.params, "params_student": val["params_student"], "metric": scorer.metric,
        "neighbourhoods": _table(part, options, result),
        "search": {"strategy": cfg.strategy, "predicted_score": result.predicted, "composed_score": result.score,
                   "pareto": result.pareto},
        "finetune": finetune_report, "validation": val, "timings": timings,
    }
    if cfg.max_drop is not None and drop > cfg.max_drop:
        report["error"] = f"{scorer.metric} dropped by {drop:.4f}, more than --max-drop {cfg.max_drop}"
        raise DropTooLarge(report["error"], report)
    t0 = time.perf_counter()
    save_atomic(restore_interface(student, declared.model), output)
    val["bytes_student"] = output.stat().st_size
    val["bytes_teacher"] = teacher_path.stat().st_size
    timings["save"] = time.perf_counter() - t0
    return report


@dataclass
class Run:
    """A finished run directory, opened: the teacher, its partition, the cache and every trained option."""

    dir: Path
    meta: dict
    declared: Teacher  # the teacher as loaded, with its declared interface
    teacher: Teacher  # the same with a dynamic batch, as the run used it
    part: Partition
    cache: CacheReader
    scorer: Scorer
    options: dict


def _run_meta(run_dir: Path) -> dict:
    meta_path = run_dir / "run.json"
    if not meta_path.exists() or not (run_dir / "candidates.json").exists():
        raise NdonnxError(f"{run_dir}: not a finished ndonnx run directory (no run.json / candidates.json)")
    return json.loads(meta_path.read_text())


def _teacher_path(run_dir: Path, meta: dict) -> Path:
    """The teacher a run was made from: stored absolute; older runs stored it relative to where
    they ran, which is tried first, then beside the run directory (its default place)."""
    path = Path(meta["teacher"])
    if path.is_absolute() or path.exists():
        return path
    return run_dir.resolve().parent / path.name


def open_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    meta = _run_meta(run_dir)
    declared = load_teacher(_teacher_path(run_dir, meta))
    teacher = with_dynamic_batch(declared)
    part = partition(teacher, PartitionConfig(**meta["config"]["partition"]))
    cache = CacheReader(run_dir / "cache")
    sample = run_sample(teacher, feeds={n: cache.read(n, cache.holdout[:SampleConfig.batch]) for n in teacher.input_names})
    scorer = Scorer(teacher, part, sample, cache, meta["config"].get("labels") is not None)
    options = load_options(run_dir, json.loads((run_dir / "candidates.json").read_text()))
    _load_scores(run_dir, options)
    return Run(run_dir, meta, declared, teacher, part, cache, scorer, options)


class DropTooLarge(GoalNotMet):
    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _tolerances(cfg: CompressConfig, part) -> dict[int, float] | None:
    if cfg.tolerances is None:
        return None
    if cfg.strategy != "threshold":
        raise NdonnxError("--tolerances applies to --strategy threshold")
    try:
        rows = json.loads(Path(cfg.tolerances).read_text())["neighbourhoods"]
        tol = {int(r["neighbourhood"]): float(r["threshold"] or 0.0) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NdonnxError(f"--tolerances {cfg.tolerances}: not the JSON of `ndonnx sensitivity --json` ({e})") from e
    if sorted(tol) != [n.id for n in part.neighbourhoods]:
        raise NdonnxError(f"--tolerances {cfg.tolerances}: made for another partition "
                          f"({len(tol)} neighbourhoods, this run has {len(part.neighbourhoods)})")
    return tol


def _load_scores(run_dir: Path, options) -> None:
    """Reuse partial-model scores of unchanged candidates (same params and held-out error)."""
    path = run_dir / "scores.json"
    if not path.exists():
        return
    cached = {(r["neighbourhood"], r["candidate"], r["params"]): r["score"] for r in json.loads(path.read_text())["rows"]}
    for opts in options.values():
        for o in opts:
            o.score = cached.get((o.neighbourhood, o.candidate, o.params))


def _add_meta(model: onnx.ModelProto, meta: dict) -> None:
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = f"ndonnx.{k}", json.dumps(v)


def _table(part, options, result) -> list[dict]:
    rows = []
    for nbh in part.neighbourhoods:
        o = result.choice[nbh.id]
        rows.append({"id": nbh.id, "teacher_params": nbh.params, "student_params": o.params,
                     "candidate": o.candidate, "score": o.score, "rel_mse": o.rel_mse,
                     "options": len(options.get(nbh.id, []))})
    return rows


def finetune(student: onnx.ModelProto, teacher: onnx.ModelProto, cache: CacheReader, scorer: Scorer,
             cfg: CompressConfig) -> tuple[onnx.ModelProto, dict]:
    """End-to-end KD of the spliced student (paper Eq. 3): soft targets at temperature T, plus
    lambda x cross-entropy when labels are known; MSE on outputs for models that are not classifiers."""
    seed = cfg.distill.seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    module = Trainable(student)
    if not module.trainable:
        return student, {"steps": 0, "reason": "nothing to train"}
    names = module.input_names
    out_names = [o.name for o in teacher.graph.output]
    classifier = scorer.metric in ("accuracy", "agreement")
    opt = torch.optim.Adam(module.named_weights().values(), lr=cfg.finetune_lr)
    train = cache.train
    T, lam = cfg.temperature, cfg.kd_lambda

    def loss_on(idx):
        xs = [torch.from_numpy(cache.read(n, idx)) for n in names]
        ys = [torch.from_numpy(cache.read(n, idx)) for n in out_names]
        out = module(*xs)
        if classifier:
            soft = torch.nn.functional.kl_div(torch.log_softmax(out[0] / T, -1), torch.softmax(ys[0] / T, -1),
                                              reduction="batchmean") * T * T
            lab = cache.labels(idx)
            if lab is not None:
                soft = soft + lam * torch.nn.functional.cross_entropy(out[0], torch.from_numpy(lab))
            return soft
        return sum(torch.mean((o - y) ** 2) / (y.var() + 1e-12) for o, y in zip(out, ys))

    def held_out_loss():
        with torch.no_grad():
            return float(np.mean([loss_on(cache.holdout[lo:lo + 256]).item() for lo in range(0, len(cache.holdout), 256)]))

    before = held_out_loss()
    for _ in range(cfg.finetune_steps):
        idx = np.sort(rng.choice(train, min(cfg.distill.batch, len(train)), replace=False))
        opt.zero_grad(set_to_none=True)
        loss = loss_on(idx)
        loss.backward()
        opt.step()
    after = held_out_loss()
    tuned = write_weights(student, module.weights())
    return tuned, {"steps": cfg.finetune_steps, "held_out_loss_before": before, "held_out_loss_after": after}


def report_json(report: dict, path: Path) -> None:
    atomic_write_text(Path(path), json.dumps(report, indent=2, default=float))
