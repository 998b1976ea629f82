"""Large models reach onnxruntime as light graphs (ndonnx.light): the same results as from their
serialized bytes, no copy of the weights in the caller, nothing left on disk."""

from __future__ import annotations

import glob
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ndonnx import light
from ndonnx.graph import load_teacher
from ndonnx.sample import ort_session, with_outputs


def _leftovers() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "ndonnx-light-*")))


@pytest.fixture
def everything_is_large(monkeypatch):
    monkeypatch.setattr(light, "LIGHT_BYTES", 0)
    monkeypatch.setattr(light, "EXTERNAL_BYTES", 16)  # the tiny teachers' weights go to the file too


def _feeds(teacher) -> dict:
    from ndonnx.sample import make_inputs

    return make_inputs(teacher)


def test_light_session_gives_what_the_bytes_give(zoo, everything_is_large):
    teacher = load_teacher(zoo["resnet_legacy"])
    inner = [o for n in teacher.model.graph.node for o in n.output][:5]
    feeds = _feeds(teacher)
    before = _leftovers()
    cast = helper.make_node("Cast", [inner[0]], ["half"], to=TensorProto.FLOAT16)
    got_sess = ort_session(teacher.model, outputs=[*inner, "half"], nodes=[cast])
    assert _leftovers() == before  # the folder is gone once the session exists
    want_model = with_outputs(teacher.model, [*inner, "half"], [cast])
    want_sess = ort.InferenceSession(want_model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [o.name for o in got_sess.get_outputs()] == [o.name for o in want_sess.get_outputs()]
    for g, w in zip(got_sess.run(None, feeds), want_sess.run(None, feeds)):
        np.testing.assert_array_equal(g, w)
    assert not any(n.op_type == "Cast" and n.output == ["half"] for n in teacher.model.graph.node)  # caller's untouched
    assert len(teacher.model.graph.output) == 1


def test_light_graph_points_into_one_aligned_file(zoo, everything_is_large):
    model = load_teacher(zoo["resnet_legacy"]).model
    with light.light_path(model) as path:
        saved = onnx.load(path, load_external_data=False)
        ext = [t for t in saved.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        assert ext and os.path.getsize(path) < model.ByteSize() / 4  # the graph holds no weights
        offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in ext]
        assert all(o % light.ALIGN == 0 for o in offsets)
        onnx.load_external_data_for_model(saved, os.path.dirname(path))
        originals = {t.name: t for t in model.graph.initializer}
        for t in saved.graph.initializer:
            assert onnx.numpy_helper.to_array(t).tobytes() == onnx.numpy_helper.to_array(originals[t.name]).tobytes()
    assert not os.path.exists(os.path.dirname(path))


def test_small_models_go_as_bytes(zoo, monkeypatch):
    """Below LIGHT_BYTES nothing is written (the tiny teachers of the tests take this path)."""
    def refuse(*a, **k):
        raise AssertionError("a small model went through a light graph")

    monkeypatch.setattr(light, "light_path", refuse)
    teacher = load_teacher(zoo["resnet_legacy"])
    assert ort_session(teacher.model).run(None, _feeds(teacher))
