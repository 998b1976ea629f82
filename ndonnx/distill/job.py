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

from ndonnx.distill.cache import CacheReader
from ndonnx.files import atomic_path, atomic_write_text
from ndonnx.memory import keep_freed_memory
from ndonnx.trainable import Trainable

EVAL_BATCH = 256
NOISE_EVAL = 512  # held-out noise samples in data-free mode without real data


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 300
    batch: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    lookahead: int = 0
    data_free: bool = False
    threads: int = 1


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

    def holdout(self):
        """Yields held-out batches: the cache's 10% (in data-free runs without data, of seeded
        synthetic inputs), or a fixed noise set when there is no cache at all."""
        if self.cache is None:
            state = self.gen.get_state()
            self.gen.manual_seed(self.job.settings.seed + 7)
            for _ in range(0, NOISE_EVAL, EVAL_BATCH):
                yield self._from_noise(EVAL_BATCH)
            self.gen.set_state(state)
            return
        hold = self.cache.holdout
        for lo in range(0, len(hold), EVAL_BATCH):
            yield self._from_cache(hold[lo:lo + EVAL_BATCH])


def call(module: Trainable, x: torch.Tensor, sides: dict) -> list[torch.Tensor]:
    return module(x, *[sides[n] for n in module.input_names[1:]])


def _learnt(outs, targets):
    """The (student, teacher) output pairs a loss compares: floating ones. Integer boundary outputs
    (token positions, masks) come from weightless ops that every student keeps as they are."""
    return [(o, t) for o, t in zip(outs, targets) if t.is_floating_point()]


def evaluate(module: Trainable, batches: Batches) -> float:
    """Held-out relative MSE: MSE / variance of the teacher's output."""
    se = ss = 0.0
    with torch.no_grad():
        for x, sides, ys in batches.holdout():
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
    return [rec for rec, _ in results]


def write_results(jobs: list[Job], results: list[tuple[dict, dict]]) -> None:
    """The driver's side: each job's weights, then its journal record (last: a record means done),
    both atomically."""
    for job, (rec, weights) in zip(jobs, results):
        if weights:
            with atomic_path(job.weights_out) as tmp:
                save_file(weights, str(tmp))
        atomic_write_text(Path(job.result_out), json.dumps(rec))


def train_group(jobs: list[Job]) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """Train every job of one neighbourhood from the same batches. Returns (journal record, trained
    weights) per job and writes nothing."""
    import warnings

    warnings.simplefilter("ignore")  # converter deprecation chatter would garble the progress display
    s = jobs[0].settings
    torch.set_num_threads(max(1, s.threads))
    keep_freed_memory()
    torch.manual_seed(s.seed + 1000 * jobs[0].neighbourhood)
    device = torch.device(s.device)
    t0 = time.perf_counter()
    teacher = Trainable(onnx.load(jobs[0].teacher)).to(device)
    look = [Trainable(onnx.load(p)).to(device) for p in jobs[0].lookahead[: s.lookahead]]
    batches = Batches(jobs[0], teacher, look, device)
    for m in [teacher, *look]:
        m.requires_grad_(False)
    students = [Trainable(onnx.load(j.student)).to(device) for j in jobs]
    setup = (time.perf_counter() - t0) / len(jobs)
    seconds = [setup] * len(jobs)
    train = [j.train and st.trainable for j, st in zip(jobs, students)]
    opts = [torch.optim.Adam(st.named_weights().values(), lr=s.lr) if t else None for st, t in zip(students, train)]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, max(1, s.steps)) if o else None for o in opts]
    masks: list[dict | None] = [None] * len(jobs)
    scale = None
    train_loss = [[] for _ in jobs]
    if any(train):
        for step in range(s.steps):
            x, sides, ys = batches.train_batch()
            if scale is None:  # variance of the teacher's outputs, fixed from the first batch
                scale = [float(y.var()) + 1e-12 for y in ys if y.is_floating_point()]
            for k, (job, st) in enumerate(zip(jobs, students)):
                if not train[k]:
                    continue
                t1 = time.perf_counter()
                opts[k].zero_grad(set_to_none=True)
                loss = _loss(call(st, x, sides), ys, batches.outputs, look, sides, scale)
                loss.backward()
                opts[k].step()
                scheds[k].step()
                if job.sparsity:
                    masks[k] = _apply_sparsity(st, job, step, masks[k])
                if step >= s.steps * 0.9:
                    train_loss[k].append(loss.item())
                seconds[k] += time.perf_counter() - t1
    records = []
    for k, (job, st) in enumerate(zip(jobs, students)):
        t1 = time.perf_counter()
        st.eval()
        rel = evaluate(st, batches)
        seconds[k] += time.perf_counter() - t1
        w = st.weights() if train[k] else {}
        nonzero = job.nonzero
        if job.sparsity and w:
            nonzero = job.params - sum(int((v == 0).sum()) for v in w.values())
        rec = {"neighbourhood": job.neighbourhood, "candidate": job.candidate, "params": job.params,
               "nonzero": nonzero, "rel_mse": rel,
               "train_rel_mse": float(np.mean(train_loss[k])) if train_loss[k] else None,
               "status": "trained" if train[k] else "frozen", "reason": None,
               "weights": Path(job.weights_out).name if w else None, "seconds": round(seconds[k], 3),
               "host": socket.gethostname()}
        if job.note:
            rec["note"] = job.note
        records.append((rec, w))
    return records


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
