"""The types every student family shares: what a candidate is, what a generator returns, and the
registry generators join. `ndonnx.candidates` re-exports all of it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

import onnx

from ndonnx.errors import NdonnxError


@dataclass(frozen=True)
class CandidateSpec:
    """One student to try on a neighbourhood: a family and, for width/lowrank/sparse, its value."""

    family: str
    value: float | None = None
    multiple: int = 1  # width/lowrank: kept channels (ranks) rounded to a multiple of this ("width:0.5@8")

    def __str__(self) -> str:
        text = self.family if self.value is None else f"{self.family}:{self.value:g}"
        return text + (f"@{self.multiple}" if self.multiple > 1 else "")


@dataclass
class Student:
    """A student sub-model with the teacher neighbourhood's boundary names, shapes and dtypes.

    params: dense float weights (`ndonnx.graph.weight_counts`); nonzero: the non-zeros it will hold
    after training (below params only for sparse students); sparsity: the sparse family's target;
    prunable: the initializers the trainer masks (sparse students only); note: one line for the
    user about what the student was made from (e.g. how much of the calibration data it covers),
    carried to candidates.json; reference: a model with the teacher's boundary that the student must
    compute exactly (the teacher with what the student drops set to zero), checked by
    `build_candidates` on the neighbourhood's sample inputs before the student is trained; refit:
    given inputs to fit on and inputs to judge on, the student adjusted to them (width: weights and
    biases that make up for the dropped channels, `candidates.refit`), applied by `build_candidates`
    after the check.
    """

    spec: CandidateSpec
    model: onnx.ModelProto
    params: int
    nonzero: int
    sparsity: float | None = None
    prunable: tuple[str, ...] = ()
    note: str | None = None
    reference: onnx.ModelProto | None = None
    refit: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], onnx.ModelProto] | None = None


class NotApplicable(Exception):
    """A family does not apply to this neighbourhood; the message says why (one line)."""

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else "not applicable"


# The neighbourhood's input tensors by name over the calibration data (read on first use).
Sample = Mapping[str, np.ndarray]
# (sub, spec) -> Student; a family registered with needs_sample=True: (sub, spec, sample) -> Student
Generator = Callable[..., Student]


@dataclass(frozen=True)
class Family:
    """A registered student family: its generator and the values it accepts."""

    name: str
    generate: Generator
    # None: takes no value; else (lo, hi, lo_inclusive, hi_inclusive)
    values: tuple[float, float, bool, bool] | None
    needs_sample: bool = False  # the generator also takes the neighbourhood's calibration inputs

    def accepts(self, value: float) -> bool:
        lo, hi, lo_in, hi_in = self.values  # type: ignore[misc]
        return (lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)

    def describe_values(self) -> str:
        lo, hi, lo_in, hi_in = self.values  # type: ignore[misc]
        return f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


# family name -> Family. Filled by `register` as ndonnx.candidates imports each family module by name.
REGISTRY: dict[str, Family] = {}


def register(family: str, *, values: tuple[float, float, bool, bool] | None = None, needs_sample: bool = False):
    """Decorator: add a generator under `family`. Registering a name twice is an error. With
    needs_sample, the generator is called (sub, spec, sample): `Sample`, the neighbourhood's inputs."""

    def deco(fn: Generator) -> Generator:
        if family in REGISTRY:
            raise NdonnxError(f"student family {family!r} is already registered")
        REGISTRY[family] = Family(family, fn, values, needs_sample)
        return fn

    return deco


def scaled(size: int, k: float, multiple: int = 1) -> int:
    """round(k * size), halves rounded up (not to even), at least 1; with `multiple`, rounded to the
    nearest multiple of it (at least one), never above `size`. onnxruntime's blocked convolutions take
    channel counts in multiples of 8 or 16; others fall back to slower kernels."""
    n = max(1, int(math.floor(k * size + 0.5 + 1e-9)))
    if multiple > 1:
        n = multiple * max(1, int(math.floor(n / multiple + 0.5 + 1e-9)))
    return min(n, size)
