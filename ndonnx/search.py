"""Student search: score each trained candidate by the paper's partial model (the teacher with only
that neighbourhood replaced) on the held-out split, then pick one candidate per neighbourhood under
a parameter budget. Errors compound when many neighbourhoods change (the thresholding effect), so
the composed student is evaluated and the choice revised where it falls short of the prediction."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ndonnx.budget import parse_target  # noqa: F401  (moved: callers import it from here)
from ndonnx.distill.cache import CacheReader
from ndonnx.distill.layout import Layout
from ndonnx.files import atomic_write_text
from ndonnx.errors import NdonnxError
from ndonnx.graph import Teacher
from ndonnx.metrics import divergence, metric_name, rel_err, score_outputs  # noqa: F401  (callers import them here)
from ndonnx.partition import Neighbourhood, Partition, merge
from ndonnx.sample import Sample, ort_session, run_chunked
from ndonnx.splice import splice, write_weights


@dataclass
class Option:
    neighbourhood: int
    candidate: str
    params: int
    rel_mse: float | None
    loader: Callable[[], onnx.ModelProto] | None = field(default=None, repr=False)  # None: keep the teacher
    score: float | None = None  # the partial model's score (the run's metric: accuracy, agreement, ...)
    loss: float | None = None  # ... and its outputs' divergence from the teacher's (`metrics.divergence`)
    macs: int | None = None  # per sample, set when the budget counts MACs
    latency: float | None = None  # modelled seconds (ndonnx.latency), set when the budget counts latency
    note: str | None = None  # what the student was made from (`Student.note`), for the report

    @property
    def model(self) -> onnx.ModelProto | None:
        """The student, made each time it is asked for (a run's are read from its directory: held at
        once, a deep model's options are its weights many times over, BERT-base's 123 1.1 GiB on
        disk); None: keep the teacher."""
        return None if self.loader is None else self.loader()

    def with_model(self, model: onnx.ModelProto) -> Option:
        return replace(self, loader=lambda: model)


def load_options(run_dir: Path, rows: list[dict]) -> dict[int, list[Option]]:
    """Every usable candidate per neighbourhood; each student is read, its trained weights written
    in, when asked for."""
    out: dict[int, list[Option]] = {}
    for r in rows:
        if r["status"] == "failed":
            continue
        loader = None if r["candidate"] == "teacher" else functools.partial(_student, Path(run_dir), r)
        out.setdefault(r["neighbourhood"], []).append(
            Option(r["neighbourhood"], r["candidate"], r["params"], r["rel_mse"], loader, note=r.get("note")))
    return out


def _student(run_dir: Path, row: dict) -> onnx.ModelProto:
    layout = Layout(run_dir)
    model = onnx.load(str(layout.student(row["neighbourhood"], row["candidate"])))
    if row.get("weights"):
        from ndonnx.distill.job import load_weights

        model = write_weights(model, load_weights(layout.weights(row["neighbourhood"], row["candidate"])))
    return model


class Scorer:
    """Scores on the held-out split of the activation cache."""

    def __init__(self, teacher: Teacher, part: Partition, sample: Sample, cache: CacheReader, labels: bool):
        self.teacher, self.part, self.sample, self.cache = teacher, part, sample, cache
        idx = cache.holdout
        self.inputs = {n: cache.read(n, idx) for n in teacher.input_names}
        self.out_names = [o.name for o in teacher.model.graph.output]
        self.reference = [cache.read(n, idx) for n in self.out_names]
        self.labels = cache.labels(idx) if labels else None
        self.metric = metric_name(self.reference, self.labels)
        self.teacher_score = score_outputs(self.reference, self.reference, self.labels)
        self._idx = idx
        self._held: dict[str, np.ndarray] = {}  # boundary tensors of the held-out split, read once
        self._suffix: tuple[int, object] | None = None  # (neighbourhood, its suffix): one at a time

    def _held_out(self, name: str) -> np.ndarray:
        if name not in self._held:
            self._held[name] = self.cache.read(name, self._idx)
        return self._held[name]

    def _suffix_session(self, nbh: Neighbourhood):
        """The teacher from the end of `nbh` to its outputs, as an onnxruntime session. Only the last
        one is kept: options come neighbourhood by neighbourhood, and the suffixes of a deep model
        together hold its weights many times over (BERT-base's 25: about 5 GiB)."""
        if self._suffix is None or self._suffix[0] != nbh.id:
            self._suffix = None  # (the old session goes before the new one is made)
            later = [n for n in self.part.neighbourhoods if n.id > nbh.id]
            session = None
            if later:
                from ndonnx.convert import extract  # (torch: imported only when a suffix is scored)

                merged = merge(later, inputs=nbh.outputs)
                session = (ort_session(extract(self.teacher, merged, self.sample)), merged)
            self._suffix = (nbh.id, session)
        return self._suffix[1]

    def _judge(self, outs: list[np.ndarray]) -> tuple[float, float]:
        return score_outputs(outs, self.reference, self.labels), divergence(outs, self.reference)

    def single(self, opt: Option) -> tuple[float, float]:
        """The partial model (the teacher with only this neighbourhood replaced): score and divergence."""
        if opt.loader is None:
            return self.teacher_score, 0.0
        nbs = self.part.neighbourhoods
        if not all(self.part.feeds_next(k) for k in range(len(nbs) - 1)):
            return self.composed({opt.neighbourhood: opt})  # multi-tensor boundaries: the whole model
        nbh = next(n for n in nbs if n.id == opt.neighbourhood)
        feeds = {n: self._held_out(n) for n in nbh.feeds}
        outs = ort_session(opt.model).run(list(nbh.outputs), feeds)
        suffix = self._suffix_session(nbh)
        if suffix is not None:
            sess, merged = suffix
            feeds = dict(zip(nbh.outputs, outs))
            feeds.update({n: self._held_out(n) for n in merged.feeds if n not in feeds})
            outs = sess.run(list(merged.outputs), feeds)
        final = dict(zip(self.part.neighbourhoods[-1].outputs, outs))
        return self._judge([final[n] for n in self.out_names])

    def compose(self, choice: dict[int, Option]) -> onnx.ModelProto:
        students = {nid: o.model for nid, o in choice.items() if o.loader is not None}
        meta = {"choices": {str(nid): o.candidate for nid, o in sorted(choice.items())}}
        return splice(self.teacher.model, self.part, students, meta)

    def composed(self, choice: dict[int, Option]) -> tuple[float, float]:
        """The composed student's score and divergence."""
        return self._judge(run_chunked(ort_session(self.compose(choice)), self.out_names, self.inputs))

    def composed_with_error(self, choice: dict[int, Option]) -> tuple[float, float]:
        """The composed student's score, and its outputs' relative error against the teacher's: a
        continuous figure that still moves where a held-out accuracy does not."""
        outs = run_chunked(ort_session(self.compose(choice)), self.out_names, self.inputs)
        return score_outputs(outs, self.reference, self.labels), max(map(rel_err, outs, self.reference))


@dataclass
class SearchResult:
    choice: dict[int, Option]
    params: int
    score: float  # the composed student's
    predicted: float  # the teacher's score less each choice's partial-model drop
    pareto: list[dict]
    loss: float | None = None  # the composed student's divergence (what greedy minimises)
    predicted_loss: float | None = None  # the sum of the choices' partial-model divergences


def total_params(teacher_params: int, part: Partition, choice: dict[int, Option]) -> int:
    """The spliced model's parameters, or more: a weight tied between neighbourhoods stays counted
    although every neighbourhood reading it may be replaced (the file then drops it)."""
    by_id = {n.id: n for n in part.neighbourhoods}
    return teacher_params - sum(by_id[nid].params - o.params for nid, o in choice.items())


def _count(x) -> str:
    return f"{x:,}"


@dataclass(frozen=True)
class Budget:
    """What a target counts, per option and for a whole choice: parameters (the default), MACs or
    modelled latency (seconds)."""

    unit: str  # "parameters" | "MACs" | "latency"
    teacher_total: int | float
    own: dict[int, int | float]  # neighbourhood id -> the teacher's own amount in it
    size: Callable[[Option], int | float]
    show: Callable[[int | float], str] = _count  # an amount as the messages write it, without the unit

    def total(self, choice: dict[int, Option]) -> int | float:
        return self.teacher_total - sum(self.own[nid] - self.size(o) for nid, o in choice.items())


def params_budget(teacher_params: int, part: Partition) -> Budget:
    return Budget("parameters", teacher_params, {n.id: n.params for n in part.neighbourhoods}, lambda o: o.params)


def macs_budget(teacher_macs: int, options: dict[int, list[Option]]) -> Budget:
    """Every option's `macs` set; the teacher option's are the neighbourhood's own."""
    own = {nid: next(o.macs for o in opts if o.candidate == "teacher") for nid, opts in options.items()}
    return Budget("MACs", teacher_macs, own, lambda o: o.macs)


def latency_budget(model, options: dict[int, list[Option]]) -> Budget:
    """Modelled seconds (`ndonnx.latency.LatencyModel`): sets every option's `latency`."""
    from ndonnx.latency import fmt_seconds

    for nid, opts in options.items():
        for o in opts:
            o.latency = model.option(nid, o.candidate)
    return Budget("latency", model.teacher, {nid: model.own(nid) for nid in options}, lambda o: o.latency,
                  fmt_seconds)


THRESHOLD_MAX_DROP = 0.01  # --strategy threshold without --max-drop or tolerances


def search(scorer: Scorer, options: dict[int, list[Option]], target: int, strategy: str = "greedy",
           max_drop: float | None = None, rounds: int = 4, tolerances: dict[int, float] | None = None,
           progress: Callable | None = None, budget: Budget | None = None) -> SearchResult:
    """Pick one option per neighbourhood with a total (parameters, or what `budget` counts) <= target."""
    part, tparams = scorer.part, scorer.teacher.params
    budget = budget or params_budget(tparams, part)
    pending = [o for opts in options.values() for o in opts if o.score is None or o.loss is None]
    for o in pending if progress is None or not pending else progress(pending, len(pending), "score"):
        o.score, o.loss = scorer.single(o)
    teacher_opt = {nid: next(o for o in opts if o.candidate == "teacher") for nid, opts in options.items()}
    smallest = {nid: min(opts, key=budget.size) for nid, opts in options.items()}
    floor = budget.total(smallest)
    if floor > target:
        raise TargetUnreachable(target, floor, unit=budget.unit, show=budget.show)
    if strategy == "threshold":
        return _threshold(scorer, options, target, THRESHOLD_MAX_DROP if max_drop is None else max_drop, tolerances,
                          budget)
    if strategy != "greedy":
        raise NdonnxError(f"--strategy must be greedy or threshold, got {strategy!r}")
    # Costs are divergences from the teacher (continuous), not score drops: on a few hundred held-out
    # samples an accuracy moves in steps of one sample, and greedy then ranks changes by noise.
    pareto: list[dict] = []
    cost = {(o.neighbourhood, o.candidate): o.loss for opts in options.values() for o in opts}
    drop = {(o.neighbourhood, o.candidate): scorer.teacher_score - o.score for opts in options.values() for o in opts}
    best = None
    for k in range(rounds):
        choice = _greedy(options, teacher_opt, cost, budget, target)
        params = total_params(tparams, part, choice)
        score, loss = scorer.composed(choice)
        predicted = sum(cost[(o.neighbourhood, o.candidate)] for o in choice.values())
        pareto.append({"params": params, "size": budget.total(choice), "score": score, "loss": loss,
                       "predicted_loss": predicted, "choices": _names(choice)})
        if best is None or loss < best.loss:
            best = SearchResult(choice, params, score,
                                scorer.teacher_score - sum(drop[(o.neighbourhood, o.candidate)] for o in choice.values()),
                                pareto, loss, predicted)
        if loss <= predicted + 1e-12 or k == rounds - 1:
            break
        # Back off: measure each change's real cost inside the composed student (restore it to the
        # teacher and see what goes away), and search again with those costs.
        changed = [nid for nid, o in choice.items() if o.candidate != "teacher"]
        shown = changed if progress is None else progress(changed, len(changed), f"re-measure (round {k + 2})")
        for nid in shown:
            restored = dict(choice)
            restored[nid] = teacher_opt[nid]
            gain = loss - scorer.composed(restored)[1]
            key = (nid, choice[nid].candidate)
            cost[key] = max(cost[key], gain)
    best.pareto = _pareto(pareto)
    return best


def _threshold(scorer: Scorer, options, target: int, limit: float, tolerances, budget: Budget) -> SearchResult:
    """The paper's: the smallest candidate per neighbourhood within its tolerance (the sensitivity
    thresholds, else a partial-model drop within `limit`). Single tolerances compound, so when the
    composed student drops more than `limit` the neighbourhoods are grown back, the change that
    recovers most score per parameter first, while the total stays within the target."""
    part, tparams = scorer.part, scorer.teacher.params
    if tolerances is not None:
        # Noise of eps x std has MSE / variance = eps^2: a candidate whose held-out relative MSE
        # stays below eps^2 perturbs no more than tolerated noise.
        def ok(o):
            return (o.rel_mse or 0.0) <= tolerances.get(o.neighbourhood, 0.0) ** 2
        how = "with --strategy threshold and the sensitivity tolerances"
    else:
        def ok(o):
            return scorer.teacher_score - o.score <= limit
        how = f"with --strategy threshold and --max-drop {limit}"
    choice = {nid: min((o for o in opts if ok(o) or o.candidate == "teacher"), key=budget.size)
              for nid, opts in options.items()}
    params = total_params(tparams, part, choice)
    if budget.total(choice) > target:
        raise TargetUnreachable(target, budget.total(choice), how, budget.unit, budget.show)
    score, err = scorer.composed_with_error(choice)
    pareto = [{"params": params, "size": budget.total(choice), "score": score, "choices": _names(choice)}]
    while scorer.teacher_score - score > limit:
        best = None
        for nid, opts in options.items():  # one step up per neighbourhood: the next larger candidate
            size = budget.size(choice[nid])
            o = min((o for o in opts if budget.size(o) > size), key=budget.size, default=None)
            if o is None or budget.total({**choice, nid: o}) > target:
                continue
            s, e = scorer.composed_with_error({**choice, nid: o})
            key = (err - e) / (budget.size(o) - size)  # error removed per unit spent
            if best is None or key > best[0]:
                best = (key, nid, o, s, e)
        if best is None:  # nothing left that fits the target
            break
        _, nid, o, score, err = best
        choice = {**choice, nid: o}
        params = total_params(tparams, part, choice)
        pareto.append({"params": params, "size": budget.total(choice), "score": score, "choices": _names(choice)})
    predicted = scorer.teacher_score - sum(scorer.teacher_score - o.score for o in choice.values())
    return SearchResult(choice, params, score, predicted, _pareto(pareto))


def _greedy(options, teacher_opt, cost, budget: Budget, target) -> dict[int, Option]:
    """From the teacher, repeatedly take the change that loses the least score per unit saved."""
    choice = dict(teacher_opt)
    while budget.total(choice) > target:
        best, best_key = None, None
        for nid, opts in options.items():
            cur = choice[nid]
            for o in opts:
                saved = budget.size(cur) - budget.size(o)
                if saved <= 0:
                    continue
                lost = cost[(nid, o.candidate)] - cost[(nid, cur.candidate)]
                key = (lost / saved, -saved)
                if best_key is None or key < best_key:
                    best, best_key = o, key
        if best is None:
            break
        choice[best.neighbourhood] = best
    return choice


def _names(choice: dict[int, Option]) -> dict[str, str]:
    return {str(nid): o.candidate for nid, o in sorted(choice.items())}


def _pareto(points: list[dict]) -> list[dict]:
    pts = sorted(points, key=lambda p: (p.get("size", p["params"]), -p["score"]))
    out, best = [], -np.inf
    for p in pts:
        if p["score"] > best:
            out.append(p)
            best = p["score"]
    return out


class TargetUnreachable(NdonnxError):
    exit_code = 1

    def __init__(self, target: int, smallest: int, how: str = "with the candidates at hand", unit: str = "parameters",
                 show: Callable = _count):
        what = f"{show(target)} {unit}" if unit != "latency" else f"{show(target)} latency (modelled)"
        super().__init__(f"target of {what} cannot be met: the smallest model reachable {how} has {show(smallest)}")
        self.smallest = smallest


def save_scores(run_dir: Path, options: dict[int, list[Option]], scorer: Scorer) -> None:
    rows = [{"neighbourhood": o.neighbourhood, "candidate": o.candidate, "params": o.params, "score": o.score,
             "loss": o.loss}
            for opts in options.values() for o in opts]
    atomic_write_text(Layout(run_dir).scores_json, json.dumps({"metric": scorer.metric, "teacher": scorer.teacher_score,
                                                           "rows": rows}, indent=1))
