"""Latency budgets: every option's student sub-model timed in onnxruntime on this machine, against
the teacher's piece of the same neighbourhood, and the whole model's latency modelled from them.

The model. The teacher's whole latency T and each neighbourhood's sub-model time t_n are timed in
one round-robin (so machine load hits them alike). Where the teacher has nodes outside every
neighbourhood (or a neighbourhood without a sub-model, kept as it is), their time is T - sum t_n,
measured once and kept constant; pieces adding up to more than the whole are scaled down to it,
with nothing outside. Where every node lies in a neighbourhood, nothing is outside and the pieces
are scaled to the whole, T / sum t_n, in either direction: a piece timed alone differs from the
same nodes inside the whole model (its own session's per-run overhead, its input hot in the cache,
and on a loaded machine long runs are preempted more often than short ones), and that gap is
not time of other nodes. An option's time is its ratio to the teacher's sub-model, timed
alternately with it (warm-up, then the median of repeated runs), times the teacher's scaled t_n: a
ratio measured side by side is stable against machine load where a bare time is not. A choice's
modelled latency is the outside time plus its options' times; the teacher's own choice models to
T exactly.

Timings are cached in the run directory (`latency.json`), keyed by batch, threads, onnxruntime's
version, the CPU and the hashes of the files timed, so a later search at the same settings on the
same machine times nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from ndonnx.errors import NdonnxError
from ndonnx.files import atomic_write_text

DEFAULT_BATCH = 32
DEFAULT_THREADS = 1
WARMUP = 3  # untimed runs of each model before timing
ROUNDS = 4  # alternations of the models timed together (order reversed every other round)
BLOCK = 0.02  # seconds of runs per model and round: sets the repeats, within REPEATS
REPEATS = (5, 50)
WHOLE_ROUNDS, WHOLE_BLOCK = 6, 0.25  # the whole student against the whole teacher: ~3 s each, once
CACHE_VERSION = 1

# (models, feeds per model, threads) -> each model's median seconds per run
Timer = Callable[[Sequence[onnx.ModelProto], Sequence[dict], int], list[float]]


def parse_latency(text: str, flag: str = "--target-latency") -> tuple[str, float]:
    """'60%' -> ('fraction', 0.6); '3ms', '0.5 s', '800us' -> ('seconds', ...). Nothing else."""
    t = str(text).strip().lower().replace("µ", "u")
    m = re.fullmatch(r"([+-]?\d+(?:\.\d*)?(?:e[+-]?\d+)?|[+-]?\.\d+)\s*(%|ms|s|us)", t)
    if not m:
        raise NdonnxError(f"{flag} {text!r}: expected a share of the teacher's latency like 60% or a time "
                          f"like 3ms, 0.5s or 800us")
    value, unit = float(m.group(1)), m.group(2)
    if unit == "%":
        if not 0 < value <= 100:
            raise NdonnxError(f"{flag} {text!r}: a percentage must be in (0, 100]")
        return "fraction", value / 100
    if not value > 0 or not math.isfinite(value):
        raise NdonnxError(f"{flag} {text!r}: a time must be > 0")
    return "seconds", value * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]


def latency_target(text: str, teacher_seconds: float) -> float:
    kind, value = parse_latency(text)
    return value * teacher_seconds if kind == "fraction" else value


def fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-4 else f"{s * 1e6:.1f} us"


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def cpu_id() -> str:
    """The processor timings were taken on: its model name and logical cores (a run directory copied
    to another machine, or shared by a cluster's nodes, must not reuse another CPU's timings)."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} x{os.cpu_count()}"


def session(model: onnx.ModelProto, threads: int):
    """A CPU session as timed: `threads` intra-op threads, one inter-op, nothing else running in it."""
    import onnxruntime as ort

    from ndonnx.sample import session_of

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4
    return session_of(model, opts, ["CPUExecutionProvider"])


def time_alternately(models: Sequence[onnx.ModelProto], feeds: Sequence[dict], threads: int,
                     rounds: int = ROUNDS, block: float = BLOCK) -> list[float]:
    """Each model's median seconds per run: all warmed up, then `rounds` rounds in which every model
    runs a block of repeats in turn (the order reversed every other round), so that a change in
    machine load hits each alike. Repeats per block: about `block` seconds, within REPEATS."""
    sessions = [session(m, threads) for m in models]
    feeds = [{k: np.ascontiguousarray(v) for k, v in f.items()} for f in feeds]
    repeats = []
    for sess, f in zip(sessions, feeds):
        for _ in range(WARMUP):
            sess.run(None, f)
        t0 = time.perf_counter()
        sess.run(None, f)
        once = max(time.perf_counter() - t0, 1e-7)
        repeats.append(int(min(max(math.ceil(block / once), REPEATS[0]), REPEATS[1])))
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for r in range(rounds):
        for i in (order if r % 2 == 0 else order[::-1]):
            sess, f = sessions[i], feeds[i]
            for _ in range(repeats[i]):
                t0 = time.perf_counter()
                sess.run(None, f)
                times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class TimingCache:
    """`latency.json` in a run directory: timings by key; written whole and atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == CACHE_VERSION:
                    self.entries = dict(data.get("entries", {}))
            except (OSError, ValueError):  # a damaged cache is only a slower search
                self.entries = {}

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"version": CACHE_VERSION, "entries": self.entries}, indent=1))


def settings_key(batch: int, threads: int) -> str:
    return f"batch={batch}|threads={threads}|onnxruntime={ort_version()}|cpu={cpu_id()}"


def batch_feeds(read: Callable[[str, np.ndarray], np.ndarray], names: Sequence[str], pool: np.ndarray,
                batch: int) -> dict[str, np.ndarray]:
    """`batch` samples of `names` from a sample pool (repeated when the pool is smaller)."""
    idx = np.sort(np.resize(np.asarray(pool), batch)) if len(pool) else np.zeros(batch, np.int64)
    return {n: np.ascontiguousarray(read(n, idx)) for n in names}


def input_names(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


@dataclass
class LatencyModel:
    """The timings a latency budget counts with (seconds at `batch`, `threads`)."""

    batch: int
    threads: int
    teacher: float  # the whole teacher, timed
    pieces: dict[int, float]  # neighbourhood -> the teacher's sub-model, timed with the whole
    ratios: dict[tuple[int, str], float]  # (neighbourhood, candidate) -> option / teacher's sub-model
    has_outside: bool = True  # nodes outside every neighbourhood's sub-model (else pieces are scaled to T)
    timed: int = 0  # options timed now (the others came from the cache)

    @property
    def scale(self) -> float:
        """Pieces are scaled to the whole where nothing is outside, and down to it where they exceed it."""
        total = sum(self.pieces.values())
        if total <= 0:
            return 1.0
        return self.teacher / total if not self.has_outside else min(1.0, self.teacher / total)

    @property
    def outside(self) -> float:
        """Seconds of the nodes outside neighbourhoods: constant whatever the choice."""
        return max(0.0, self.teacher - self.scale * sum(self.pieces.values()))

    def own(self, nid: int) -> float:
        return self.pieces.get(nid, 0.0) * self.scale

    def option(self, nid: int, candidate: str) -> float:
        if candidate == "teacher" or nid not in self.pieces:
            return self.own(nid)
        return self.own(nid) * self.ratios[(nid, candidate)]

    def predict(self, choice: dict[int, str]) -> float:
        """The modelled latency of a choice (neighbourhood -> candidate; absent ones stay the teacher)."""
        return self.teacher - sum(self.own(nid) - self.option(nid, cand) for nid, cand in choice.items())


def measure(run, batch: int = DEFAULT_BATCH, threads: int = DEFAULT_THREADS, progress: Callable | None = None,
            timer: Timer | None = None) -> LatencyModel:
    """Time the teacher, its neighbourhoods' sub-models and every option of an opened run directory
    (`ndonnx.compress.Run`), reusing and extending its timing cache."""
    from ndonnx.distill.layout import Layout

    if batch < 1 or threads < 1:
        raise NdonnxError("--latency-batch and --threads must be >= 1")
    timer = timer or time_alternately
    layout = Layout(run.dir)
    cache = TimingCache(layout.latency_json)
    settings = settings_key(batch, threads)
    pool = run.cache.holdout if len(run.cache.holdout) else run.cache.train
    subs = {nid: layout.teacher(nid) for nid in run.options if layout.teacher(nid).exists()}
    sub_hash = {nid: file_hash(p) for nid, p in subs.items()}

    def feeds_for(model: onnx.ModelProto) -> dict:
        return batch_feeds(run.cache.read, input_names(model), pool, batch)

    key = f"{settings}|profile|{run.cache.teacher_hash}|" + ",".join(f"{nid}:{h}" for nid, h in sorted(sub_hash.items()))
    profile = cache.get(key)
    if profile is None:
        models = [run.teacher.model] + [onnx.load(str(subs[nid])) for nid in sorted(subs)]
        secs = timer(models, [feeds_for(m) for m in models], threads)
        profile = {"teacher": secs[0], "pieces": {str(nid): s for nid, s in zip(sorted(subs), secs[1:])}}
        cache.put(key, profile)
        cache.save()
    pending = []
    ratios: dict[tuple[int, str], float] = {}
    for nid, opts in run.options.items():
        for o in opts:
            if o.candidate == "teacher" or nid not in subs:
                continue
            student = layout.student(nid, o.candidate)
            okey = f"{settings}|option|{file_hash(student)}|{sub_hash[nid]}"
            hit = cache.get(okey)
            if hit is None:
                pending.append((nid, o.candidate, student, okey))
            else:
                ratios[(nid, o.candidate)] = hit["ratio"]
    todo = pending if progress is None or not pending else progress(pending, len(pending), "latency")
    for n, (nid, cand, student, okey) in enumerate(todo):
        teacher_sub = onnx.load(str(subs[nid]))
        model = onnx.load(str(student))
        s, t = timer([model, teacher_sub], [feeds_for(model), feeds_for(teacher_sub)], threads)
        ratios[(nid, cand)] = s / t
        cache.put(okey, {"ratio": s / t, "student": s, "teacher": t, "neighbourhood": nid, "candidate": cand})
        if n % 8 == 7:  # an interrupted timing keeps what it measured
            cache.save()
    if pending:
        cache.save()
    return LatencyModel(batch, threads, profile["teacher"], {int(k): v for k, v in profile["pieces"].items()},
                        ratios, has_outside=_has_outside(run, subs), timed=len(pending))


def _has_outside(run, subs: dict) -> bool:
    """Whether the teacher has nodes that no timed sub-model holds."""
    held = set()
    for n in run.part.neighbourhoods:
        if n.id not in subs:
            return True
        held.update(n.nodes, n.shape_nodes)
    return len(held) < len(run.teacher.model.graph.node)


def measure_pair(student: onnx.ModelProto, teacher: onnx.ModelProto, feeds: dict, threads: int,
                 timer: Timer | None = None) -> tuple[float, float]:
    """The whole student and the whole teacher timed alternately on the same feeds, longer than an
    option (WHOLE_ROUNDS rounds of about WHOLE_BLOCK seconds each): (student, teacher) seconds."""
    if timer is None:
        s, t = time_alternately([student, teacher], [feeds, feeds], threads, rounds=WHOLE_ROUNDS, block=WHOLE_BLOCK)
        return s, t
    s, t = timer([student, teacher], [feeds, feeds], threads)
    return s, t


def validate_latency(student, teacher, data: dict[str, np.ndarray], batch: int = DEFAULT_BATCH,
                     threads: int = DEFAULT_THREADS, timer: Timer | None = None) -> dict:
    """`ndonnx validate`'s latency figures: both models (`Teacher`s) timed alternately on the first
    `batch` samples of `data` (repeated when fewer). A model whose batch is fixed is timed at it."""
    if batch < 1 or threads < 1:
        raise NdonnxError("--latency-batch and --threads must be >= 1")
    firsts = [i.type.tensor_type.shape.dim[0] for m in (student.model, teacher.model) for i in m.graph.input
              if i.name in teacher.input_names and i.type.tensor_type.shape.dim]
    fixed = {d.dim_value for d in firsts if d.HasField("dim_value")}
    if len(fixed) > 1:
        return {"latency_note": f"not timed: fixed batch sizes differ ({sorted(fixed)})"}
    at = fixed.pop() if fixed else batch
    n = len(next(iter(data.values())))
    feeds = {k: np.ascontiguousarray(np.resize(data[k], (at, *data[k].shape[1:]))) if n != at else data[k]
             for k in teacher.input_names}
    s, t = measure_pair(student.model, teacher.model, feeds, threads, timer=timer)
    out = {"latency_batch": at, "latency_threads": threads, "latency_teacher_ms": 1e3 * t,
           "latency_student_ms": 1e3 * s, "latency_measured_ratio": s / t}
    if at != batch:
        out["latency_note"] = f"timed at the models' fixed batch of {at}, not --latency-batch {batch}"
    return out
