"""Student candidates: each family turns a teacher neighbourhood sub-model (from
`ndonnx.convert.extract`) into a student ONNX sub-model with the same input/output names, shapes
and dtypes, initialised from the teacher's weights.

Families (one module each, registered explicitly below; registering a name twice is an error):

- ``teacher``   the block unchanged; always the first candidate.
- ``width:k``   bottleneck multiplier: inner channel groups shrink to round(k * size) (width.py).
- ``lowrank:r`` each Conv/Gemm/MatMul (and embedding Gather) factored by SVD into two ops of rank
                r * min(out, in) (lowrank.py).
- ``width:k@N``, ``lowrank:r@N``: kept channels / ranks rounded to a multiple of N (`--channel-multiple`).
- ``sparse:s``  the same graph with target sparsity s for magnitude pruning during training (sparse.py).
- ``identity``  a residual block x + f(x) reduced to x (identity.py).
- ``heads:k``   each attention sub-layer keeps round(k * H) of its H heads, by ||W_V,h|| * ||W_O,h|| (heads.py).
- ``vocab:k``   an embedding table cut to the calibration data's most frequent ids (at most k of
                its rows) plus one unknown row; ids remapped inside, interface unchanged (vocab.py).

Every student except ``teacher`` has each BatchNormalization that directly follows a Conv folded
into that Conv (students carry no BN: onnx2torch's BN would otherwise need care in training).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import replace

import numpy as np
import onnx

from ndonnx.candidates.base import (REGISTRY, CandidateSpec, Family, NotApplicable, Sample, Student, register,
                                    scaled)
from ndonnx.candidates.onnx_edit import ContractError, differs, fold_batchnorm, param_count
from ndonnx.errors import NdonnxError

# The explicit registry: importing each family module registers it (in this order).
from ndonnx.candidates import teacher as _teacher  # noqa: E402,F401
from ndonnx.candidates import width as _width  # noqa: E402,F401
from ndonnx.candidates import lowrank as _lowrank  # noqa: E402,F401
from ndonnx.candidates import sparse as _sparse  # noqa: E402,F401
from ndonnx.candidates import identity as _identity  # noqa: E402,F401
from ndonnx.candidates import heads as _heads  # noqa: E402,F401
from ndonnx.candidates import vocab as _vocab  # noqa: E402,F401

__all__ = ["REGISTRY", "CandidateSpec", "Family", "NotApplicable", "Student", "register", "scaled",
           "ContractError", "DEFAULT_CANDIDATES", "parse_candidates", "build_candidates"]

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = "width:0.25,width:0.5,width:0.75,lowrank:0.25,lowrank:0.5,heads:0.5,vocab:1,identity,teacher"
TEACHER = CandidateSpec("teacher")
MAX_RANGE_VALUES = 1000


def _number(text: str, item: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise NdonnxError(f"--candidates: {item!r}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise NdonnxError(f"--candidates: {item!r}: {text!r} is not a finite number")
    return v


def _values(text: str, item: str) -> list[float]:
    """'0.5' or an inclusive range 'lo-hi/step', rounded to 10 decimals against float noise."""
    m = re.fullmatch(r"\s*([^-/]+?)\s*-\s*([^/]+?)\s*/\s*(.+?)\s*", text)
    if m is None:
        if "/" in text:
            raise NdonnxError(f"--candidates: {item!r}: a range is written lo-hi/step, e.g. 0.1-0.9/0.1")
        return [round(_number(text.strip(), item), 10)]
    lo, hi, step = (_number(t, item) for t in m.groups())
    if step <= 0:
        raise NdonnxError(f"--candidates: {item!r}: the step must be positive")
    if hi < lo:
        raise NdonnxError(f"--candidates: {item!r}: the range's end is below its start")
    n = math.floor((hi - lo) / step + 1e-9)
    if n + 1 > MAX_RANGE_VALUES:
        raise NdonnxError(f"--candidates: {item!r}: more than {MAX_RANGE_VALUES} values")
    return [round(lo + i * step, 10) for i in range(n + 1)]


ROUNDED = ("width", "lowrank")  # the families whose sizes `@N` rounds


def _multiple(text: str, item: str, family: str) -> int:
    if family not in ROUNDED:
        raise NdonnxError(f"--candidates: {item!r}: only {' and '.join(ROUNDED)} round to a channel multiple (@N)")
    try:
        n = int(text)
    except ValueError:
        raise NdonnxError(f"--candidates: {item!r}: @{text} is not a whole number") from None
    if n < 1:
        raise NdonnxError(f"--candidates: {item!r}: the channel multiple must be >= 1")
    return n


def with_multiple(specs: list[CandidateSpec], multiple: int) -> list[CandidateSpec]:
    """`--channel-multiple N`: width and lowrank candidates without their own @N round to N."""
    if multiple <= 1:
        return specs
    out = [replace(s, multiple=multiple) if s.family in ROUNDED and s.multiple == 1 else s for s in specs]
    return list(dict.fromkeys(out))


def parse_candidates(text: str) -> list[CandidateSpec]:
    """'width:0.1-0.9/0.1,lowrank:0.5,sparse:0.8,identity,teacher' -> specs, in order, without
    repeats. Raises NdonnxError (one line) on unknown families and bad values."""
    specs: list[CandidateSpec] = []
    items = [t.strip() for t in (text or "").split(",")]
    if not any(items):
        raise NdonnxError("--candidates: no candidates given")
    for item in items:
        if not item:
            raise NdonnxError(f"--candidates: empty entry in {text!r}")
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        fam = REGISTRY.get(name)
        if fam is None:
            raise NdonnxError(f"--candidates: unknown family {name!r} (known: {', '.join(REGISTRY)})")
        if fam.values is None:
            if sep:
                raise NdonnxError(f"--candidates: {name!r} takes no value (got {item!r})")
            new = [CandidateSpec(name)]
        else:
            if not sep or not value.strip():
                raise NdonnxError(f"--candidates: {name!r} needs a value in {fam.describe_values()}, "
                                  f"e.g. {name}:0.5")
            value, _, mult = value.partition("@")
            multiple = _multiple(mult, item, name) if mult else 1
            vals = _values(value, item)
            bad = [v for v in vals if not fam.accepts(v)]
            if bad:
                raise NdonnxError(f"--candidates: {item!r}: {name} values must be in "
                                  f"{fam.describe_values()} (got {bad[0]:g})")
            new = [CandidateSpec(name, v, multiple) for v in vals]
        specs += [s for s in new if s not in specs]
    return specs


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def build_candidates(sub: onnx.ModelProto, specs: list[CandidateSpec], *, strict: bool = False,
                     sample: Sample | None = None,
                     feeds: dict[str, np.ndarray] | None = None,
                     fit: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None,
                     refit: bool = True) -> tuple[list[Student], dict[str, str]]:
    """Students for one teacher neighbourhood: the teacher first (always), then one per spec that
    applies and differs in size; {str(spec): reason} for the others. A generator bug (an
    exception other than NotApplicable, or a student that does not compute its `reference` on
    `feeds`, the neighbourhood's inputs of the teacher's sample run) is logged and recorded as a
    reason, or raised if strict. `sample`: the neighbourhood's inputs over the calibration data,
    for families that need it. `fit`: inputs to fit students on and to judge the fit on (`Student.refit`);
    `feeds` for both where not given. Without `refit` the students keep their `refit` to be applied
    later (a distillation job fits them, `ndonnx.distill.job`)."""
    teacher = REGISTRY["teacher"].generate(sub, TEACHER)
    students = [teacher]
    reasons: dict[str, str] = {}
    same_size = {teacher.params, param_count(fold_batchnorm(sub))}  # the teacher with BN folded too
    seen: dict[tuple[str, int, int], CandidateSpec] = {}
    for spec in specs:
        if spec.family == "teacher":
            continue
        fam = REGISTRY.get(spec.family)
        if fam is None:
            reasons[str(spec)] = f"unknown family {spec.family!r}"
            continue
        if fam.needs_sample and sample is None:
            reasons[str(spec)] = "needs calibration data (--data) to build from"
            continue
        try:
            st = fam.generate(sub, spec, sample) if fam.needs_sample else fam.generate(sub, spec)
        except NotApplicable as e:
            reasons[str(spec)] = e.reason
            continue
        except Exception as e:  # noqa: BLE001 - a generator bug must not sink the other candidates
            if strict:
                raise
            log.warning("candidate %s failed on %s", spec, sub.graph.name, exc_info=True)
            reasons[str(spec)] = f"failed: {_first_line(e)}"
            continue
        if st.reference is not None and feeds is not None:
            try:
                why = differs(st.model, st.reference, feeds)
            except Exception as e:  # noqa: BLE001 - a student onnxruntime cannot run is refused like one that differs
                why = f"onnxruntime cannot run it: {_first_line(e)}"
            st.reference = None
            if why and strict:
                raise ContractError(f"{spec}: {why}")
            if why:
                log.warning("candidate %s failed its check on %s: %s", spec, sub.graph.name, why)
                reasons[str(spec)] = f"failed its check: {why}"
                continue
        if refit and st.refit is not None and (fit or feeds) is not None:
            st.model, st.refit = st.refit(*(fit or (feeds, feeds))), None
        if st.params in same_size and st.nonzero == st.params:
            reasons[str(spec)] = f"same size as the teacher ({st.params} parameters)"
            continue
        key = (spec.family, st.params, st.nonzero)
        if key in seen:
            reasons[str(spec)] = f"same size as {seen[key]} ({st.params} parameters)"
            continue
        seen[key] = spec
        students.append(st)
    return students, reasons
