"""Control flow kept as the teacher, a full disk while writing, models over 2 GB."""

from __future__ import annotations

import errno

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ndonnx import splice as splice_mod
from ndonnx.config import DistillConfig
from ndonnx.distill.runner import distill
from ndonnx.errors import NdonnxError
from ndonnx.graph import load_teacher
from ndonnx.splice import save_atomic


def _if_model(path):
    """Conv -> Relu, then a neighbourhood holding an If (both branches a Conv), then Conv."""
    rng = np.random.default_rng(0)
    w = {n: numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.2, n) for n in "ABCD"}

    def branch(name, weight):
        return helper.make_graph([helper.make_node("Conv", ["h", weight], [f"{name}_out"], pads=[1, 1, 1, 1])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])

    nodes = [
        helper.make_node("Conv", ["X", "A"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["m"], keepdims=0),
        helper.make_node("Greater", ["m", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["b"], then_branch=branch("then", "B"), else_branch=branch("else", "C")),
        helper.make_node("Relu", ["b"], ["r"]), helper.make_node("Conv", ["r", "D"], ["Y"], pads=[1, 1, 1, 1]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4, 8, 8])],
                          list(w.values()) + [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_control_flow_neighbourhood_stays_teacher(tmp_path):
    path = _if_model(tmp_path / "if.onnx")
    t = load_teacher(path)
    assert t.params == 4 * 144  # weights read inside the If branches count too
    rows = distill(path, tmp_path / "run", DistillConfig(candidates="width:0.5,teacher", steps=3, batch=4, jobs=1,
                                                         data_free=True))
    kept = [r for r in rows if r["reason"] and "If" in r["reason"]]
    assert kept and all(r["candidate"] == "teacher" and r["status"] == "frozen" for r in kept)


def test_full_disk_leaves_no_output(zoo, tmp_path, monkeypatch):
    model = onnx.load(str(zoo["resnet_legacy"]))
    out = tmp_path / "out.onnx"

    def full(model, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(splice_mod.onnx, "save", full)
    with pytest.raises(NdonnxError, match="No space left"):
        save_atomic(model, out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_large_model_written_with_external_data(zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(splice_mod, "TWO_GB", 1000)  # treat this small model as over the protobuf limit
    out = save_atomic(onnx.load(str(zoo["resnet_legacy"])), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists() and not list(tmp_path.glob("*.tmp"))
    assert load_teacher(out).params == 6362


def test_fixed_batch_of_one_is_relaxed_and_kept_in_the_output(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import models
    from ndonnx.compress import CompressConfig, compress

    path = models.tiny_resnet(tmp_path / "fixed.onnx", dynamic_batch=False)
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    path = models.export(models.TinyResNet(), (__import__("torch").randn(1, 3, 16, 16),), tmp_path / "one.onnx",
                         dynamic_batch=False)
    cfg = CompressConfig(distill=DistillConfig(candidates="width:0.5,teacher", steps=3, batch=8, jobs=1, data_free=True),
                         target="80%")
    r = compress(path, tmp_path / "run", cfg, output=tmp_path / "s.onnx")
    s = onnx.load(str(tmp_path / "s.onnx"))
    assert s.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # the teacher's interface
    assert r["params_student"] <= int(0.8 * r["params_teacher"])
    with pytest.raises(NdonnxError, match="fixed batch dimension"):  # batch fixed at 2: refused
        distill(tmp_path / "fixed.onnx", tmp_path / "run2", DistillConfig(steps=1, data_free=True, jobs=1))


def test_baked_batch_in_reshape_is_refused(tmp_path):
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import models

    torch.manual_seed(0)
    path = models.export(models.TinyEncoder(), (torch.randint(0, 50, (1, 7)), torch.ones(1, 7, dtype=torch.bool)),
                         tmp_path / "enc1.onnx", input_names=("ids", "mask"), dynamic_batch=False)
    with pytest.raises(NdonnxError, match="does not run on other batch sizes"):
        distill(path, tmp_path / "run", DistillConfig(steps=1, data_free=True, jobs=1))
