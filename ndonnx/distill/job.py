"""A distillation job: (student sub-model, cache reference, settings) -> trained weights + metrics.

Jobs are plain JSON-serialisable records holding file paths only, so they can run in another
process or on another machine. The candidates of one neighbourhood are trained together from the
same batches (`train_group`), so the cache is read once per step for all of them. Training returns
weights and records; only the driver writes them (`write_results`), so a worker on another machine
or a worker killed mid-write never touches the run directory.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.numpy import load_file, save_file

from ndonnx.config import DistillConfig
from ndonnx.distill.cache import CacheReader
from ndonnx.files import atomic_path, atomic_write_text
from ndonnx.memory import keep_freed_memory, release_freed_memory
from ndonnx.trainable import Trainable

EVAL_BATCH = 256
CHECK_EVERY = 25  # steps between held-out checks of the loss (each costs about one training step)
NOISE_EVAL = 512  # held-out noise samples in data-free mode without real data


@dataclass(frozen=True)
class TrainSettings:
    """How one job trains; the defaults are `DistillConfig`'s (ndonnx.config), the one place they are set."""

    steps: int = DistillConfig.steps  # at most
    batch: int = DistillConfig.batch
    lr: float = DistillConfig.lr
    seed: int = DistillConfig.seed
    device: str = "cpu"
    lookahead: int = 0
    data_free: bool = False
    threads: int = 1
    min_steps: int = DistillConfig.min_steps
    patience: int = DistillConfig.patience
    min_gain: float = DistillConfig.min_gain
    fit_tolerance: float = DistillConfig.fit_tolerance
    dominated: float = DistillConfig.dominated


@dataclass(frozen=True)
class Job:
    neighbourhood: int
    candidate: str
    student: str  # student sub-model (.onnx), initial weights
    teacher: str  # the teacher's sub-model, for data-free targets and identity of shapes
    lookahead: tuple[str, ...]  # teacher sub-models of the next neighbourhoods
    cache: str | None  # activation cache folder (None: data-free without real data)
    noise: str | None  # data-free: safetensors with per-channel mean/std and side-input banks
    sparsity: float | None
    prunable: tuple[str, ...]  # sparse students: the weights the plan counts, and so the ones masked
    train: bool  # False: evaluate only (teacher, identity)
    params: int
    nonzero: int
    weights_out: str  # safetensors written when the job finishes
    result_out: str  # the journal record, written last
    settings: TrainSettings = field(default_factory=TrainSettings)
    note: str | None = None  # the student's note for the user (`Student.note`), carried to the record
    refit: bool = False  # fitted to the teacher before training (`Student.refit`), on `fit_samples` cached samples
    fit_samples: int = 0


class Batches:
    """Inputs and teacher targets of one neighbourhood: from the cache, or Gaussian noise pushed
    through the teacher's own sub-model (data-free). A batch is (main input, side inputs by name,
    targets); side inputs cover the look-ahead neighbourhoods too."""

    def __init__(self, job: Job, teacher: Trainable, look: list[Trainable], device: torch.device):
        self.job, self.teacher, self.device = job, teacher, device
        self.main, self.outputs = teacher.input_names[0], teacher.output_names
        # the look-ahead pieces read what this one makes, and the rest (a multi-tensor boundary's
        # other tensors, their masks) from the cache like side inputs
        made = {n for m in [teacher, *look] for n in m.output_names}
        self.sides = sorted({*teacher.input_names[1:], *(n for m in look for n in m.input_names if n not in made)})
        self.rng = np.random.default_rng(job.settings.seed + 1000 * job.neighbourhood)
        self.gen = torch.Generator().manual_seed(job.settings.seed + 1000 * job.neighbourhood)
        self.cache = CacheReader(Path(job.cache)) if job.cache else None
        self.noise = {k: torch.from_numpy(v) for k, v in load_file(job.noise).items()} if job.noise else None

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        if a.size and not any(a.strides):  # a shape-only input: zero-stride, no memory behind it
            return torch.zeros((), dtype=torch.from_numpy(np.zeros(1, a.dtype)).dtype, device=self.device).expand(a.shape)
        return torch.from_numpy(a if a.ndim and a.flags.c_contiguous else np.array(a)).to(self.device)

    def _from_cache(self, idx: np.ndarray):
        x = self._tensor(self.cache.read(self.main, idx))
        sides = {n: self._tensor(self.cache.read(n, idx)) for n in self.sides}
        ys = [self._tensor(self.cache.read(n, idx)) for n in self.outputs]
        return x, sides, ys

    def _from_noise(self, n: int):
        shape = self.noise[f"shape:{self.main}"].tolist()
        axis = int(self.noise[f"axis:{self.main}"])
        shape[axis] = n
        if f"high:{self.main}" in self.noise:
            x = torch.randint(int(self.noise[f"high:{self.main}"]), shape, generator=self.gen).to(self.device)
        else:
            mean, std = self.noise[f"mean:{self.main}"], self.noise[f"std:{self.main}"]
            x = (torch.randn(shape, generator=self.gen) * std + mean).to(self.device)
        sides = {}
        for name in self.sides:  # side inputs stay valid: rows drawn from real ones (stored batch-first)
            if f"const:{name}" in self.noise:
                sides[name] = self.noise[f"const:{name}"].to(self.device)
                continue
            if self.cache is not None and name in self.cache.shape_only:
                sides[name] = self._tensor(self.cache.read(name, np.arange(n)))
                continue
            bank = self.noise[f"bank:{name}"]
            rows = bank[torch.randint(len(bank), (n,), generator=self.gen)]
            sides[name] = torch.movedim(rows, 0, int(self.noise[f"axis:{name}"])).to(self.device)
        with torch.no_grad():
            ys = call(self.teacher, x, sides)
        return x, sides, ys

    def train_batch(self):
        b = self.job.settings.batch
        if self.job.settings.data_free:
            return self._from_noise(b)
        train = self.cache.train
        return self._from_cache(np.sort(self.rng.choice(train, b, replace=len(train) < b)))

    def holdout(self, most: int | None = None):
        """Yields held-out batches: the cache's 10% (in data-free runs without data, of seeded
        synthetic inputs), or a fixed noise set when there is no cache at all; its first `most`
        samples only, if given (the checks during training)."""
        if self.cache is None:
            state = self.gen.get_state()
            self.gen.manual_seed(self.job.settings.seed + 7)
            for _ in range(0, min(NOISE_EVAL, most or NOISE_EVAL), EVAL_BATCH):
                yield self._from_noise(EVAL_BATCH)
            self.gen.set_state(state)
            return
        hold = self.cache.holdout[:most]
        for lo in range(0, len(hold), EVAL_BATCH):
            yield self._from_cache(hold[lo:lo + EVAL_BATCH])


def call(module: Trainable, x: torch.Tensor, sides: dict) -> list[torch.Tensor]:
    return module(x, *[sides[n] for n in module.input_names[1:]])


def _learnt(outs, targets):
    """The (student, teacher) output pairs a loss compares: floating ones. Integer boundary outputs
    (token positions, masks) come from weightless ops that every student keeps as they are."""
    return [(o, t) for o, t in zip(outs, targets) if t.is_floating_point()]


def evaluate(module: Trainable, batches: Batches, most: int | None = None) -> float:
    """Held-out relative MSE: MSE / variance of the teacher's output (on the first `most` samples)."""
    se = ss = 0.0
    with torch.no_grad():
        for x, sides, ys in batches.holdout(most):
            for o, t in _learnt(call(module, x, sides), ys):
                se += float(((o - t) ** 2).sum())
                ss += float(((t - t.mean()) ** 2).sum())
    return se / ss if ss > 0 else se


def _loss(out, targets, names, lookahead, sides, scale) -> torch.Tensor:
    loss = sum(torch.mean((o - t) ** 2) / s for (o, t), s in zip(_learnt(out, targets), scale))
    s_vals, t_vals = dict(zip(names, out)), dict(zip(names, targets))
    for look in lookahead:  # paper Eq. 4-5: the next teacher neighbourhoods applied to the student's output
        s_out = look(*[s_vals.get(n, sides.get(n)) for n in look.input_names])
        with torch.no_grad():
            t_out = look(*[t_vals.get(n, sides.get(n)) for n in look.input_names])
        s_vals.update(zip(look.output_names, s_out))
        t_vals.update(zip(look.output_names, t_out))
        loss = loss + sum(torch.mean((s - t) ** 2) / (t.var() + 1e-12) for s, t in _learnt(s_out, t_out))
    return loss


def run_group(jobs: list[Job]) -> list[dict]:
    """Train every job of one neighbourhood here and write the results (the in-process path)."""
    results = train_group(jobs)
    write_results(jobs, results)
    return [rec for rec, _, _ in results]


def write_results(jobs: list[Job], results: list[tuple[dict, dict, bytes | None]]) -> None:
    """The driver's side: each job's student as fitted (where its job fitted it), its weights, then its
    journal record (last: a record means done), all atomically."""
    for job, (rec, weights, fitted) in zip(jobs, results):
        if fitted is not None:
            with atomic_path(job.student) as tmp:
                Path(tmp).write_bytes(fitted)
        if weights:
            with atomic_path(job.weights_out) as tmp:
                save_file(weights, str(tmp))
        atomic_write_text(Path(job.result_out), json.dumps(rec))


def train_group(jobs: list[Job]) -> list[tuple[dict, dict[str, np.ndarray], bytes | None]]:
    """Fit (`Job.refit`) and train every job of one neighbourhood from the same batches. Returns
    (journal record, trained weights, the fitted student's model or None) per job and writes nothing.

    Each student trains for quality, not for a count of steps: every CHECK_EVERY steps its held-out
    error is measured (on up to EVAL_BATCH held-out samples), and it stops when that error fell by
    less than `min_gain` (relative) over the last `patience` steps, after `min_steps`, or at `steps`.
    A student already within `fit_tolerance` before training (fitted to the teacher) does not train;
    one whose error after `min_steps` is `dominated` times that of a sibling of no more parameters
    stops there (it would never be chosen for a parameter budget). The best weights seen are kept.
    Sparse students follow their pruning schedule to the end. Constant learning rate: measured on
    the bundled ResNet-20, it reached after 200 steps a lower error than cosine decay over 300."""
    import warnings

    warnings.simplefilter("ignore")  # converter deprecation chatter would garble the progress display
    s = jobs[0].settings
    torch.set_num_threads(max(1, s.threads))
    release_freed_memory()  # what the previous group held
    keep_freed_memory()
    torch.manual_seed(s.seed + 1000 * jobs[0].neighbourhood)
    device = torch.device(s.device)
    t0 = time.perf_counter()
    teacher = Trainable(onnx.load(jobs[0].teacher)).to(device)
    look = [Trainable(onnx.load(p)).to(device) for p in jobs[0].lookahead[: s.lookahead]]
    batches = Batches(jobs[0], teacher, look, device)
    for m in [teacher, *look]:
        m.requires_grad_(False)
    fitted = _fitted(jobs, batches.cache)
    students = [Trainable(fitted.get(j.candidate) or onnx.load(j.student)).to(device) for j in jobs]
    setup = (time.perf_counter() - t0) / len(jobs)
    runs = [_Run(j, st, s, setup) for j, st in zip(jobs, students)]
    for r in runs:
        if r.training:
            r.check(0, evaluate(r.student, batches, EVAL_BATCH))
    scale = None
    for step in range(1, s.steps + 1):
        active = [r for r in runs if r.training]
        if not active:
            break
        x, sides, ys = batches.train_batch()
        if scale is None:  # variance of the teacher's outputs, fixed from the first batch
            scale = [float(y.var()) + 1e-12 for y in ys if y.is_floating_point()]
        for r in active:
            t1 = time.perf_counter()
            r.opt.zero_grad(set_to_none=True)
            loss = _loss(call(r.student, x, sides), ys, batches.outputs, look, sides, scale)
            loss.backward()
            r.opt.step()
            if r.job.sparsity:
                r.masks = _apply_sparsity(r.student, r.job, step - 1, r.masks)
            r.train_loss.append(loss.item())
            if step % CHECK_EVERY == 0 or step in (s.steps, s.min_steps):
                r.check(step, evaluate(r.student, batches, EVAL_BATCH))
            r.seconds += time.perf_counter() - t1
        if step == s.min_steps:
            _stop_dominated(active)
    records = []
    for job, r in zip(jobs, runs):
        t1 = time.perf_counter()
        r.restore_best()
        r.student.eval()
        rel = evaluate(r.student, batches)
        r.seconds += time.perf_counter() - t1
        w = r.student.weights() if r.trained else {}
        nonzero = job.nonzero
        if job.sparsity and w:
            nonzero = job.params - sum(int((v == 0).sum()) for v in w.values())
        tail = r.train_loss[-max(1, len(r.train_loss) // 10):]
        rec = {"neighbourhood": job.neighbourhood, "candidate": job.candidate, "params": job.params,
               "nonzero": nonzero, "rel_mse": rel, "train_rel_mse": float(np.mean(tail)) if tail else None,
               "status": "trained" if r.trained else "fitted" if r.curve else "frozen", "reason": None,
               "weights": Path(job.weights_out).name if w else None, "seconds": round(r.seconds, 3),
               "host": socket.gethostname()}
        if r.curve:
            rec["training"] = {"steps": r.steps, "stopped": r.stopped, "best_step": r.best_step,
                               "curve": [[a, round(b, 6)] for a, b in r.curve],
                               "rules": {"steps": s.steps, "min_steps": s.min_steps, "patience": s.patience,
                                         "min_gain": s.min_gain, "fit_tolerance": s.fit_tolerance,
                                         "dominated": s.dominated, "check_every": CHECK_EVERY}}
        if job.note:
            rec["note"] = job.note
        if job.candidate in fitted:
            rec["fitted"] = True
        model = fitted.get(job.candidate)
        records.append((rec, w, model.SerializeToString() if model is not None else None))
    return records


def _fitted(jobs: list[Job], cache: CacheReader | None) -> dict[str, onnx.ModelProto]:
    """The students of `jobs` that are fitted to the teacher before training, fitted: each made
    again from the teacher's piece (generators are deterministic; the closure that fits it does not
    travel) and fitted on the cached samples. Where the cache lacks what it needs, none."""
    todo = [j for j in jobs if j.refit]
    if not todo or cache is None:
        return {}
    from ndonnx.candidates import REGISTRY, parse_candidates
    from ndonnx.distill.prepare import fit_feeds
    from ndonnx.sample import threads

    sub = onnx.load(todo[0].teacher)
    feeds = fit_feeds(cache, sub, todo[0].fit_samples)
    if feeds is None:
        return {}
    out = {}
    with threads(todo[0].settings.threads):
        for job in todo:
            (spec,) = parse_candidates(job.candidate)
            if REGISTRY[spec.family].needs_sample:  # (no family that fits builds from the calibration data)
                continue
            student = REGISTRY[spec.family].generate(sub, spec)
            if student.refit is not None:
                out[job.candidate] = student.refit(*feeds)
    return out


class _Run:
    """One student's training: its optimiser, held-out curve, best weights and why it stopped."""

    def __init__(self, job: Job, student: Trainable, s: TrainSettings, seconds: float):
        self.job, self.student, self.s, self.seconds = job, student, s, seconds
        self.training = job.train and bool(student.trainable)
        self.trained = self.training
        self.opt = torch.optim.Adam(student.named_weights().values(), lr=s.lr) if self.training else None
        self.masks: dict | None = None
        self.train_loss: list[float] = []
        self.curve: list[tuple[int, float]] = []
        self.best, self.best_step, self.best_weights = float("inf"), 0, None
        self.steps, self.stopped = 0, None

    def check(self, step: int, err: float) -> None:
        """Record the held-out error at `step`; stop when a rule says so."""
        self.curve.append((step, err))
        self.steps = step
        if err < self.best or self.job.sparsity:  # a sparse student's best is its last (the schedule's end)
            self.best, self.best_step = err, step
            self.best_weights = {n: p.detach().clone() for n, p in self.student.named_weights().items()}
        s = self.s
        if step == 0 and err <= s.fit_tolerance and not self.job.sparsity:  # (sparse: the teacher, before pruning)
            self.stop(f"fitted within the tolerance ({s.fit_tolerance:g}) before training")
            self.trained = False
        elif step >= s.steps:
            self.stop("reached the step limit")
        elif not self.job.sparsity and step >= max(s.min_steps, s.patience):
            before = [e for t, e in self.curve if t <= step - s.patience]
            if before and min(before) < (1 + s.min_gain) * self.best:
                self.stop(f"converged: held-out error fell by less than {s.min_gain:.0%} in {s.patience} steps")

    def stop(self, why: str) -> None:
        self.training, self.stopped = False, why

    def restore_best(self) -> None:
        if self.best_weights is not None and self.best_step != self.steps:
            with torch.no_grad():
                for n, p in self.student.named_weights().items():
                    p.copy_(self.best_weights[n])
        self.best_weights = None


def _stop_dominated(runs: list[_Run]) -> None:
    """After `min_steps`: a student whose held-out error is `dominated` times that of a sibling with
    no more parameters stops (sparse ones excepted: they only reach their size at the end)."""
    for r in runs:
        if not r.training or r.job.sparsity:
            continue
        for o in runs:
            if o is not r and not o.job.sparsity and o.job.params <= r.job.params and o.curve \
                    and o.curve[-1][1] * r.s.dominated < r.curve[-1][1]:
                r.stop(f"dominated: {r.curve[-1][1] / o.curve[-1][1]:.1f}x the held-out error of {o.job.candidate} "
                       f"({o.job.params} parameters) at step {r.steps}")
                break


def _apply_sparsity(st: Trainable, job: Job, step: int, masks: dict | None) -> dict:
    """Zhu & Gupta: sparsity grows on a cubic schedule; masks are recomputed by magnitude every
    tenth of the run and reapplied after every step."""
    from ndonnx.candidates.sparse import magnitude_masks, zhu_gupta

    steps = job.settings.steps
    every = max(1, steps // 10)
    weights = st.named_weights()
    if masks is None or step % every == 0 or step == steps - 1:
        target = zhu_gupta(step + 1, steps, job.sparsity)
        masks = {n: torch.as_tensor(np.asarray(m)) for n, m in
                 magnitude_masks({n: weights[n].detach().cpu().numpy() for n in job.prunable}, target).items()}
    with torch.no_grad():
        for n, m in masks.items():
            weights[n].mul_(m.to(weights[n].device, weights[n].dtype))
    return masks


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    return load_file(str(path))
