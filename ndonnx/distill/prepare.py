"""Preparing a neighbourhood for distillation, kept in the run directory so that it is done once.

For each neighbourhood: the torch round trip (does it convert exactly?), its teacher piece as a
standalone model (`teacher/N.onnx`), and its student candidates (`students/N__CAND.onnx`, each
checked against its reference). What came of it is one record, `prepared/N.json`, keyed by what it
depends on: the teacher, the partition and the sample run (`piece`), then the candidate specs and
the calibration data (`students`). A rerun with the same keys reads the record and touches nothing
else; new specs rebuild only the students. Fitting students to the teacher (`Student.refit`) is not
done here but in the job that trains them (`ndonnx.distill.job`), in parallel with other work: it
reads the cache, costs most of what preparation did, and its result is part of the job's output.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ndonnx import __version__
from ndonnx.config import SampleConfig
from ndonnx.distill.layout import Layout
from ndonnx.files import atomic_path, atomic_write_text

FIT_SAMPLES, CHECK_SAMPLES = 256, 32  # cached samples students are fitted on / judged on before training (at most)
FIT_BYTES = 256 << 20  # ... and at most about this much of a neighbourhood's tensors at once
FORMAT = 1  # of the record; a record of another format is made again


@dataclass(frozen=True)
class Prepared:
    """One neighbourhood's preparation. `students`: the candidates that apply (the teacher first),
    each {candidate, params, nonzero, sparsity, prunable, note, refit}; `reasons`: why the others
    do not; `fit_samples`: how many cached samples its students are fitted on and judged on."""

    neighbourhood: int
    piece: str  # key of the round trip and the teacher piece
    students_key: str  # key of the candidates
    convertible: bool
    reason: str | None = None  # why it does not convert (it is then kept as the teacher)
    students: list[dict] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    fit_samples: int = 0

    def save(self, layout: Layout) -> None:
        atomic_write_text(layout.prepared(self.neighbourhood), json.dumps({"format": FORMAT, **asdict(self)}, indent=1))


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def piece_key(teacher_digest: str, partition: dict, data_fingerprint: str, nid: int) -> str:
    """What the round trip and the teacher piece depend on: the teacher, how it was cut, the sample
    run's inputs (the first samples of the data) and the code that did it."""
    return digest(__version__, teacher_digest, partition, data_fingerprint, SampleConfig.batch, nid)


def students_key(piece: str, specs: list[str], data_fingerprint: str) -> str:
    return digest(piece, specs, data_fingerprint)


def load(layout: Layout, nid: int) -> Prepared | None:
    path = layout.prepared(nid)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing, or cut short: made again
    if rec.pop("format", None) != FORMAT:
        return None
    try:
        return Prepared(**rec)
    except TypeError:
        return None


def prepare(teacher, nbh, sample, layout: Layout, specs, piece: str, key: str, reader=None,
            calibrates: bool = False, old: Prepared | None = None) -> Prepared:
    """Round trip, teacher piece and students of `nbh` (what `old`, a record with the same piece,
    already holds is not redone), saved and recorded."""
    from ndonnx.candidates import build_candidates
    from ndonnx.convert import extract, round_trip

    path = layout.teacher(nbh.id)
    if old is None or old.piece != piece or not (path.exists() or not old.convertible):
        rt = round_trip(teacher, nbh, sample)
        if not rt.convertible:
            rec = Prepared(nbh.id, piece, key, False, rt.reason)
            rec.save(layout)
            return rec
        _save_model(extract(teacher, nbh, sample), path)
    elif not old.convertible:
        rec = Prepared(nbh.id, piece, key, False, old.reason)
        rec.save(layout)
        return rec
    sub = onnx.load(str(path))
    ins = [i.name for i in sub.graph.input]
    calib = reader.tensors(ins, reader.train) if calibrates else None
    feeds = {n: sample.values[n] for n in ins} if all(n in sample.values for n in ins) else None
    built, reasons = build_candidates(sub, specs, sample=calib, feeds=feeds, refit=False)
    students = []
    for st in built:
        name = str(st.spec)
        spath = layout.student(nbh.id, name)
        if not layout.done(nbh.id, name).exists():  # a finished job's student is the one it was trained from
            _save_model(st.model, spath)
        students.append({"candidate": name, "params": st.params, "nonzero": st.nonzero, "sparsity": st.sparsity,
                         "prunable": list(st.prunable), "note": st.note, "refit": st.refit is not None})
    fit = fit_samples(sub, sample, len(reader.train)) if reader is not None and _cached(reader, ins) else 0
    rec = Prepared(nbh.id, piece, key, True, None, students, reasons, fit)
    rec.save(layout)
    return rec


def _cached(reader, names: list[str]) -> bool:
    return all(n in reader.arrays or n in reader.shape_only for n in names)


def fit_samples(sub: onnx.ModelProto, sample, train: int) -> int:
    """How many training samples students of `sub` are fitted and judged on: FIT_SAMPLES +
    CHECK_SAMPLES at most, and no more than FIT_BYTES of the neighbourhood's tensors (their size
    per sample read off the sample run, of SampleConfig.batch samples)."""
    per = sum(sample.values[o].nbytes for node in sub.graph.node for o in node.output if o in sample.values)
    n = max(2, min(FIT_SAMPLES + CHECK_SAMPLES, FIT_BYTES * SampleConfig.batch // max(per, 1)))
    return min(n, train)


def fit_feeds(reader, sub: onnx.ModelProto, n: int) -> tuple[dict, dict] | None:
    """Inputs of the neighbourhood to fit students on before training and to judge that fit on
    (`Student.refit`): `n` evenly spaced training samples, split disjointly (about one in nine
    judges). None where the cache lacks an input."""
    ins = [i.name for i in sub.graph.input]
    if not n or not _cached(reader, ins):
        return None
    idx = reader.train[np.linspace(0, len(reader.train) - 1, min(n, len(reader.train))).astype(int)]
    if len(idx) < 4:
        return reader.tensors(ins, idx), reader.tensors(ins, idx)
    every = max(2, round(len(idx) / max(1, round(len(idx) * CHECK_SAMPLES / (FIT_SAMPLES + CHECK_SAMPLES)))))
    check = np.zeros(len(idx), bool)
    check[every - 1::every] = True
    return reader.tensors(ins, idx[~check]), reader.tensors(ins, idx[check])


def _save_model(model: onnx.ModelProto, path: Path) -> None:
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
