"""teacher: the block unchanged (BatchNormalization kept); always the first candidate."""

from __future__ import annotations

import onnx

from ndonnx.candidates.base import CandidateSpec, Student, register
from ndonnx.candidates.onnx_edit import copy_model, param_count


@register("teacher")
def generate(sub: onnx.ModelProto, spec: CandidateSpec) -> Student:
    model = copy_model(sub)
    n = param_count(model)
    return Student(spec, model, n, n)
