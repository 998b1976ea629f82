"""Where everything lives in a run directory: the one place that names its files.

    run.json                  teacher path and hash, settings (written when a distillation commits)
    teacher/N.onnx            neighbourhood N of the teacher as a standalone model
    prepared/N.json           neighbourhood N's preparation: its candidates, keyed by what they depend on
    students/N__CAND.onnx     each candidate before training (fitted to the teacher by its job)
    cache/                    the activation cache (its manifest.json is written last)
    noise/N.safetensors       data-free input statistics and side-input banks
    synthetic.npz             data-free runs without data: the seeded held-out inputs
    synthetic.parts/          ... the batches finished so far, while they are made (a rerun resumes)
    weights/N__CAND.safetensors   trained weights
    done/N__CAND.json         the journal: one record per finished job, written last and atomically
    candidates.json           every candidate with its error (rebuilt from the journal)
    skipped.json              candidates that do not apply to a neighbourhood, and why
    scores.json               partial-model scores of the search, reused by the next one
    latency.json              onnxruntime timings of the latency budget (ndonnx.latency), reused likewise
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SUBDIRS = ("teacher", "prepared", "students", "weights", "done", "noise")


def job_stem(nid: int, candidate: str) -> str:
    """File stem shared by a candidate's student, weights and journal record."""
    return f"{nid}__{candidate.replace(':', '_').replace('/', '_')}"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def candidates_json(self) -> Path:
        return self.root / "candidates.json"

    @property
    def skipped_json(self) -> Path:
        return self.root / "skipped.json"

    @property
    def scores_json(self) -> Path:
        return self.root / "scores.json"

    @property
    def latency_json(self) -> Path:
        return self.root / "latency.json"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def synthetic(self) -> Path:
        return self.root / "synthetic.npz"

    @property
    def journal(self) -> list[Path]:
        return sorted((self.root / "done").glob("*.json"))

    def teacher(self, nid: int) -> Path:
        return self.root / "teacher" / f"{nid}.onnx"

    def prepared(self, nid: int) -> Path:
        return self.root / "prepared" / f"{nid}.json"

    def noise(self, nid: int) -> Path:
        return self.root / "noise" / f"{nid}.safetensors"

    def student(self, nid: int, candidate: str) -> Path:
        return self.root / "students" / f"{job_stem(nid, candidate)}.onnx"

    def weights(self, nid: int, candidate: str) -> Path:
        return self.root / "weights" / f"{job_stem(nid, candidate)}.safetensors"

    def done(self, nid: int, candidate: str) -> Path:
        return self.root / "done" / f"{job_stem(nid, candidate)}.json"

    def make(self) -> None:
        for sub in SUBDIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
