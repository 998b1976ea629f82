"""`ndonnx compress` end to end: distill (reusing the run directory) -> score and search -> splice
-> (fine-tune) -> (quantize) -> validate -> report. `ndonnx search` is the same minus the distillation."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ndonnx.config import STRATEGIES, CompressConfig, DistillConfig, PartitionConfig, SampleConfig  # noqa: F401
from ndonnx.distill.cache import CacheReader
from ndonnx.distill.layout import Layout
from ndonnx.files import atomic_write_text
from ndonnx.data import load_data, teacher_hash
from ndonnx.errors import GoalNotMet, NdonnxError
from ndonnx.graph import Teacher, load_teacher, restore_interface
from ndonnx.memory import release_freed_memory
from ndonnx.partition import Partition, partition
from ndonnx.quantize import calibration_feeds, quantize
from ndonnx.metrics import score_outputs
from ndonnx.sample import ort_session, run_chunked, run_sample, with_dynamic_batch
from ndonnx.latency import LatencyModel, batch_feeds, latency_target, measure_pair, ort_version
from ndonnx.latency import measure as measure_latency
from ndonnx.search import (THRESHOLD_MAX_DROP, Budget, Scorer, TargetUnreachable, latency_budget, load_options,
                           macs_budget, parse_target, save_scores, search)
from ndonnx.splice import check, save_atomic
from ndonnx.validate import validate

log = logging.getLogger(__name__)


def default_output(teacher_path: Path, target: str, quantize: str | None = None) -> Path:
    """`<teacher>.ndonnx-<budget>.onnx` beside the teacher: each budget its own file; a quantized
    student's ends in `-int8` (`<teacher>.ndonnx-50pct-int8.onnx`)."""
    name = teacher_path.name[:-5] if teacher_path.name.endswith(".onnx") else teacher_path.name
    budget = re.sub(r"[^0-9A-Za-z.-]", "", str(target).strip().replace("%", "pct"))
    return teacher_path.with_name(f"{name}.ndonnx-{budget}{'-int8' if quantize else ''}.onnx")


def _check_output(output: Path, teacher_path: Path, force: bool) -> None:
    if output.resolve() == teacher_path.resolve():
        raise NdonnxError(f"-o {output}: that is the teacher file; it is never overwritten")
    if output.exists() and not force:
        raise NdonnxError(f"{output} exists; pass --force to replace it, or -o to write another file")
    if not output.parent.is_dir():
        raise NdonnxError(f"-o {output}: no folder {output.parent}")


def compress(model_path: str | Path, run_dir: str | Path, cfg: CompressConfig, data_path: str | Path | None = None,
             output: str | Path | None = None, progress: Callable | None = None) -> dict:
    """Every input is checked before the run directory is touched: a typo costs nothing."""
    clock = _Clock()
    model_path, run_dir = Path(model_path), Path(run_dir)
    output = Path(output) if output else default_output(model_path, cfg.budget_text, cfg.quantize)
    _check_output(output, model_path, cfg.force)
    if cfg.tolerances:
        _read_tolerances(cfg.tolerances)
    teacher = load_teacher(model_path)
    if cfg.eval_data:
        load_data(cfg.eval_data, teacher, cfg.distill.labels)
    from ndonnx.distill.runner import distill

    check = None if cfg.target_macs or cfg.target_latency else lambda params, sizes: _reachable(cfg.target, params, sizes)
    distill(model_path, run_dir, cfg.distill, data_path=data_path, progress=progress, check_sizes=check, teacher=teacher)
    clock.stop("distill")
    return build(run_dir, cfg, output, clock, progress)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _Clock:
    """Wall and CPU seconds of each stage. CPU counts this process's threads and its worker processes
    once they have exited (os.times), so a parallel stage shows its CPU beside its wall time."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.start()

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), _cpu()

    def stop(self, stage: str) -> None:
        self.wall[stage] = time.perf_counter() - self._wall
        self.cpu[stage] = _cpu() - self._cpu


def _reachable(target: str, teacher_params: int, sizes: dict[int, tuple[int, list[int]]]) -> None:
    """A parameter budget below the smallest model the candidates can make is refused before any
    training: `sizes` holds each neighbourhood's own parameters and its candidates' counts."""
    want = parse_target(target, teacher_params)
    floor = teacher_params - sum(own - min([own, *counts]) for own, counts in sizes.values())
    if floor > want:
        raise TargetUnreachable(want, floor)


def build(run_dir: Path, cfg: CompressConfig, output: str | Path | None, clock: _Clock | None = None,
          progress: Callable | None = None) -> dict:
    """Search, splice, fine-tune, validate: no distillation (what `ndonnx search RUN_DIR` runs)."""
    clock = clock or _Clock()
    run_dir = Path(run_dir)
    meta = _run_meta(run_dir)
    teacher_path = _teacher_path(run_dir, meta)
    output = Path(output) if output else default_output(teacher_path, cfg.budget_text, cfg.quantize)
    _check_output(output, teacher_path, cfg.force)
    clock.start()
    run = open_run(run_dir)
    declared, teacher, part, cache, scorer, options = (run.declared, run.teacher, run.part, run.cache, run.scorer,
                                                       run.options)
    budget = latency = None
    if cfg.target_latency:  # a latency budget: every option timed in onnxruntime here (cached)
        latency = measure_latency(run, cfg.latency_batch, cfg.threads, progress)
        budget = latency_budget(latency, options)
        target = latency_target(cfg.target_latency, budget.teacher_total)
        clock.stop("latency_options")
        clock.start()
    elif cfg.target_macs:  # a compute budget replaces the parameter one
        budget = _macs_budget(run, teacher)
        target = parse_target(cfg.target_macs, budget.teacher_total, "--target-macs")
    else:
        target = parse_target(cfg.target, teacher.params)
    tolerances = _tolerances(cfg, part)
    limit = cfg.max_drop  # threshold: the drop it keeps within, by default the tolerances' own
    if limit is None and cfg.strategy == "threshold":
        limit = tolerances.max_drop if tolerances else THRESHOLD_MAX_DROP
    result = search(scorer, options, target, cfg.strategy, limit, tolerances=tolerances and tolerances.by_id,
                    progress=progress, budget=budget)
    save_scores(run_dir, options, scorer)
    release_freed_memory()  # the scoring sessions
    clock.stop("search")

    recompose_report = None
    if cfg.refit_steps > 0:
        clock.start()
        from ndonnx.recompose import recompose

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            choice, recompose_report = recompose(run, result.choice, cfg.refit_steps, cfg.refit_samples,
                                                 cfg.distill.batch, cfg.distill.lr, cfg.distill.seed, progress)
        result.choice = choice
        clock.stop("refit")

    clock.start()
    student = _with_meta(scorer.compose(result.choice), {"settings": {"target": cfg.target, "strategy": cfg.strategy, "max_drop": cfg.max_drop,
                                     "finetune_steps": cfg.finetune_steps, "refit_steps": cfg.refit_steps, "quantize": cfg.quantize,
                                     **({"target_latency": cfg.target_latency, "latency_batch": cfg.latency_batch,
                                         "threads": cfg.threads} if latency else {}),
                                     **meta["settings"]}})
    check(student)
    clock.stop("splice")

    inputs, eval_labels = scorer.inputs, scorer.labels
    if cfg.eval_data:
        labels_key = meta["config"].get("labels")
        arrays = load_data(cfg.eval_data, teacher, labels_key).read_all()
        eval_labels = arrays.pop(labels_key) if labels_key else None
        inputs = arrays
    finetune_report = None
    if cfg.finetune_steps > 0:
        clock.start()
        before = score_on(student, teacher.model, inputs, eval_labels)
        with warnings.catch_warnings():  # converter deprecation chatter would garble the progress display
            warnings.simplefilter("ignore")
            from ndonnx.finetune import finetune

            student, finetune_report = finetune(student, teacher.model, cache, scorer, cfg, progress)
        finetune_report["score_before"] = before
        check(student)
        clock.stop("finetune")

    float_val = quant = None
    if cfg.quantize:  # the float student is validated too: its figures stay in the report
        clock.start()
        float_val = validate(student, teacher.model, inputs, eval_labels)
        float_bytes = restore_interface(student, declared.model).ByteSize()
        clock.stop("validate_float")
        clock.start()
        student, quant = quantize(student, cfg.quantize, calibration_feeds(cache, student, cfg.distill.seed))
        clock.stop("quantize")

    clock.start()
    val = validate(student, teacher.model, inputs, eval_labels, torch_check=quant is None)
    val["data"] = str(cfg.eval_data) if cfg.eval_data else "held-out split of the calibration data"
    clock.stop("validate")
    latency_report = None
    if latency:  # the whole student against the whole teacher, timed alternately: independent of the model
        clock.start()
        latency_report = _latency_report(latency, run, student, budget.total(result.choice), target)
        clock.stop("latency")
    drop = val["score_teacher"] - val["score_student"]
    report = {
        "teacher": str(teacher_path), "output": str(output),
        **({"target_latency": cfg.target_latency, "latency": latency_report} if latency else
           {"target_macs": target, "macs_teacher": budget.teacher_total,
            "macs_student": _macs_of(restore_interface(student, declared.model), run)}
           if budget else {"target_params": target}),
        "params_teacher": teacher.params, "params_student": val["params_student"], "metric": scorer.metric,
        "neighbourhoods": _table(part, options, result, budget if latency else None),
        "search": {"strategy": cfg.strategy, "predicted_score": result.predicted, "composed_score": result.score,
                   "composed_divergence": result.loss, "predicted_divergence": result.predicted_loss,
                   "pareto": result.pareto},
        "refit": recompose_report, "finetune": finetune_report, "validation": val, "timings": clock.wall,
        "cpu_seconds": clock.cpu,
    }
    final = restore_interface(student, declared.model)
    if latency_report and latency_report["measured_ratio"] > latency_report["target_ratio"]:
        report["warning"] = (f"measured latency {latency_report['measured_ratio']:.1%} of the teacher's is over the "
                             f"target {latency_report['target_ratio']:.1%} (modelled "
                             f"{latency_report['predicted_ratio']:.1%}): timings on a busy machine vary; rerun "
                             f"`ndonnx search` (timings cached) or aim lower")
        log.warning(report["warning"])
    if quant is not None:
        report["quantize"] = _quantize_report(quant, float_val, val, float_bytes, final.ByteSize())
    if cfg.max_drop is not None and drop > cfg.max_drop:
        report["error"] = f"{scorer.metric} dropped by {drop:.4f}, more than --max-drop {cfg.max_drop}"
        raise DropTooLarge(report["error"], report)
    if limit is not None and drop > limit:  # the tolerances' own max-drop: a warning, the budget was met
        how = "the max-drop the tolerances were made for" if tolerances else "the threshold strategy's default"
        report["warning"] = (f"{scorer.metric} dropped by {drop:.4f}, more than {limit} ({how}) although the "
                             f"search grew neighbourhoods back within the target: try a larger --target-params")
        log.warning(report["warning"])
    clock.start()
    save_atomic(final, output)
    val["bytes_student"] = output.stat().st_size
    val["bytes_teacher"] = teacher_path.stat().st_size
    clock.stop("save")
    return report


def _quantize_report(quant: dict, float_val: dict, val: dict, bytes_float: int, bytes_int8: int) -> dict:
    """The quantized student next to its float model: how it was quantized, and both validations'
    figures (the float model's whole validation under 'float_validation')."""
    both = {"bytes_float": bytes_float, "bytes_int8": bytes_int8, "size_ratio": bytes_int8 / bytes_float,
            "score_float": float_val["score_student"], "score_int8": val["score_student"]}
    for key in ("top1_agreement", "accuracy_student", "rel_err", "latency_ratio"):
        if key in val:
            name = key.removesuffix("_student")
            both[f"{name}_float"], both[f"{name}_int8"] = float_val[key], val[key]
    return {**quant, **both, "float_validation": float_val}


def _dims(run: "Run") -> dict:
    """One held-out sample of every graph input: the sizes of the symbolic dims MACs are counted at."""
    return {n: run.cache.read(n, run.cache.holdout[:1]) for n in run.teacher.input_names}


def _macs_of(model: onnx.ModelProto, run: "Run", feeds: dict | None = None) -> int:
    from ndonnx.macs import concrete_dims, count_macs

    count = count_macs(model, concrete_dims(model, feeds if feeds is not None else _dims(run)))
    if count.uncounted:
        raise NdonnxError(f"--target-macs: cannot count the MACs of {count.uncounted[0][1]}")
    return count.total


def _macs_budget(run: "Run", teacher: Teacher) -> Budget:
    """MACs per sample of the teacher and of every option, each counted on its own sub-model (the
    teacher's piece from the run directory) so that all options of a neighbourhood compare alike."""
    layout = Layout(run.dir)
    for nid, opts in run.options.items():
        teacher_sub = layout.teacher(nid)
        for o in opts:
            if not teacher_sub.exists():  # kept as the teacher, never converted: no alternative to count
                o.macs = 0
                continue
            model = o.model if o.loader is not None else onnx.load(str(teacher_sub))
            feeds = {i.name: run.cache.read(i.name, run.cache.holdout[:1]) for i in model.graph.input
                     if i.name not in run.cache.shape_only}
            o.macs = _macs_of(model, run, feeds)
    return macs_budget(_macs_of(teacher.model, run), run.options)


def score_on(student: onnx.ModelProto, teacher: onnx.ModelProto, inputs: dict, labels) -> float:
    """The student's score against the teacher's outputs on `inputs` (onnxruntime)."""
    names = [o.name for o in teacher.graph.output]
    reference = run_chunked(ort_session(teacher), names, inputs)
    return score_outputs(run_chunked(ort_session(student), names, inputs), reference, labels)


@dataclass
class Run:
    """A finished run directory, opened: the teacher, its partition, the cache and every trained option."""

    dir: Path
    declared: Teacher  # the teacher as loaded, with its declared interface
    teacher: Teacher  # the same with a dynamic batch, as the run used it
    part: Partition
    cache: CacheReader
    scorer: Scorer
    options: dict

    def teacher_piece(self, nid: int) -> onnx.ModelProto:
        """Neighbourhood `nid` of the teacher as a standalone model (kept in the run directory when it
        converts; cut from the teacher again when it was kept as the teacher)."""
        path = Layout(self.dir).teacher(nid)
        if path.exists():
            return onnx.load(str(path))
        from ndonnx.convert import extract

        return extract(self.teacher, next(n for n in self.part.neighbourhoods if n.id == nid), self.scorer.sample)


def _run_meta(run_dir: Path) -> dict:
    layout = Layout(run_dir)
    meta_path = layout.run_json
    if not meta_path.exists() or not layout.candidates_json.exists():
        raise NdonnxError(f"{run_dir}: not a finished ndonnx run directory (no run.json / candidates.json)")
    return json.loads(meta_path.read_text())


def _teacher_path(run_dir: Path, meta: dict) -> Path:
    """The teacher a run was made from: where run.json says (absolute; older runs stored it relative
    to where they ran), else by name beside the run directory (its default place): a run directory
    moved together with its teacher still works. Which file it is, the hash decides (`open_run`)."""
    path = Path(meta["teacher"])
    if path.exists():
        return path
    beside = run_dir.resolve().parent / path.name
    if beside.exists():
        return beside
    raise NdonnxError(f"{run_dir}: its teacher {path} is gone (and no {path.name} beside the run directory)")


def open_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    meta = _run_meta(run_dir)
    path = _teacher_path(run_dir, meta)
    declared = load_teacher(path)
    teacher = with_dynamic_batch(declared)
    if teacher_hash(teacher.model) != meta.get("teacher_hash"):  # students of another teacher would splice in
        raise NdonnxError(f"{path} is not the teacher {run_dir} was distilled from (its hash differs): "
                          f"put that file back, or distil this one into a new run directory")
    part = partition(teacher, PartitionConfig(**meta["config"]["partition"]))
    cache = CacheReader(Layout(run_dir).cache)
    if cache.teacher_hash != meta["teacher_hash"]:  # the cache of an earlier teacher left behind
        raise NdonnxError(f"{run_dir}: its activation cache was made from another teacher; rerun the distillation")
    sample = run_sample(teacher, feeds={n: cache.read(n, cache.holdout[:SampleConfig.batch]) for n in teacher.input_names})
    scorer = Scorer(teacher, part, sample, cache, meta["config"].get("labels") is not None)
    options = load_options(run_dir, json.loads(Layout(run_dir).candidates_json.read_text()))
    _load_scores(run_dir, options)
    return Run(run_dir, declared, teacher, part, cache, scorer, options)


class DropTooLarge(GoalNotMet):
    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Tolerances:
    by_id: dict[int, float]  # neighbourhood -> largest noise eps it tolerates
    max_drop: float  # the score drop they were measured for


def _read_tolerances(path: str) -> Tolerances:
    try:
        report = json.loads(Path(path).read_text())
        tol = {int(r["neighbourhood"]): float(r["threshold"] or 0.0) for r in report["neighbourhoods"]}
        return Tolerances(tol, float(report.get("max_drop", 0.01)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NdonnxError(f"--tolerances {path}: not the JSON of `ndonnx sensitivity --json` ({e})") from e


def _tolerances(cfg: CompressConfig, part) -> Tolerances | None:
    if cfg.tolerances is None:
        return None
    tol = _read_tolerances(cfg.tolerances)
    if sorted(tol.by_id) != [n.id for n in part.neighbourhoods]:
        raise NdonnxError(f"--tolerances {cfg.tolerances}: made for another partition "
                          f"({len(tol.by_id)} neighbourhoods, this run has {len(part.neighbourhoods)})")
    return tol


def _load_scores(run_dir: Path, options) -> None:
    """Reuse partial-model scores of unchanged candidates (same params and held-out error)."""
    path = Layout(run_dir).scores_json
    if not path.exists():
        return
    cached = {(r["neighbourhood"], r["candidate"], r["params"]): (r["score"], r.get("loss"))
              for r in json.loads(path.read_text())["rows"]}
    for opts in options.values():
        for o in opts:
            o.score, o.loss = cached.get((o.neighbourhood, o.candidate, o.params), (None, None))


def _with_meta(model: onnx.ModelProto, meta: dict) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k, v in meta.items():
        p = out.metadata_props.add()
        p.key, p.value = f"ndonnx.{k}", json.dumps(v)
    return out


def _table(part, options, result, latency: Budget | None = None) -> list[dict]:
    rows = []
    for nbh in part.neighbourhoods:
        o = result.choice[nbh.id]
        rows.append({"id": nbh.id, "teacher_params": nbh.params, "student_params": o.params,
                     "candidate": o.candidate, "score": o.score, "rel_mse": o.rel_mse,
                     "options": len(options.get(nbh.id, []))} | ({"note": o.note} if o.note else {})
                    | ({"teacher_ms": 1e3 * latency.own[nbh.id], "student_ms": 1e3 * latency.size(o)}
                       if latency else {}))
    return rows


def _latency_report(model: LatencyModel, run: "Run", student: onnx.ModelProto, predicted: float,
                    target: float) -> dict:
    """The modelled latency of the choice next to the whole student and teacher timed alternately
    on `model.batch` held-out samples (the student as written: fine-tuned, quantized)."""
    pool = run.cache.holdout if len(run.cache.holdout) else run.cache.train
    feeds = batch_feeds(run.cache.read, run.teacher.input_names, pool, model.batch)
    s, t = measure_pair(student, run.teacher.model, feeds, model.threads)
    return {"batch": model.batch, "threads": model.threads, "onnxruntime": ort_version(),
            "target_ms": 1e3 * target, "target_ratio": target / model.teacher,
            "teacher_ms_modelled": 1e3 * model.teacher, "outside_ms": 1e3 * model.outside,
            "pieces_ms_timed": 1e3 * sum(model.pieces.values()), "pieces_scale": model.scale,
            "predicted_ms": 1e3 * predicted, "predicted_ratio": predicted / model.teacher,
            "teacher_ms": 1e3 * t, "student_ms": 1e3 * s, "measured_ratio": s / t,
            "options_timed": model.timed}


def report_json(report: dict, path: Path) -> None:
    atomic_write_text(Path(path), json.dumps(report, indent=2, default=float))
