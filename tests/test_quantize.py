"""`--quantize`: the int8 student of compress/search, the method rule, and `check` on quantized models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime.quantization
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import models
from ndonnx.compress import CompressConfig, DropTooLarge, build, compress, default_output
from ndonnx.config import DistillConfig
from ndonnx.errors import NdonnxError
from ndonnx.graph import load_teacher, weight_counts, weight_nonzeros
from ndonnx.macs import count_macs
from ndonnx.quantize import choose_method, quantize
from ndonnx.sample import ort_session
from ndonnx_cli.main import main

DCFG = DistillConfig(candidates="width:0.5,teacher", steps=10, batch=16, jobs=1, labels="labels")

# Outputs of the int8 student against its float model: relative L2 error of the logits. Each quantized
# tensor is rounded to 1/255 of its range (uint8 activations, min/max calibrated) or of its channel's
# largest weight (int8 per channel): a uniform error of at most half a step, ~0.1-0.2% RMS of the
# tensor's range. The tiny ResNet has ~10 quantized tensors in sequence; independent errors add in
# quadrature to well under 2% (measured: ~0.6%). 5% leaves room for activations whose range is set by
# a few outliers (then one step is coarser) while still catching a wrong scale, axis or zero point,
# which errs by tens of percent.
REL_ERR_BOUND = 0.05


def _io(model: onnx.ModelProto) -> list:
    return [[(v.name, v.type.SerializeToString()) for v in vs] for vs in (model.graph.input, model.graph.output)]


@pytest.fixture(scope="module")
def run(zoo, tmp_path_factory):
    """A distilled run of the tiny ResNet (few steps), and its float student at 70%."""
    d = tmp_path_factory.mktemp("quantize")
    teacher = d / "teacher.onnx"
    shutil.copy(zoo["resnet_legacy"], teacher)
    x = np.random.default_rng(0).standard_normal((96, 3, 16, 16)).astype(np.float32)
    labels = ort_session(onnx.load(str(teacher))).run(None, {"input": x})[0].argmax(-1)
    np.savez(d / "calib.npz", input=x, labels=labels)
    compress(teacher, d / "run", CompressConfig(distill=DCFG, target="70%"), data_path=d / "calib.npz",
             output=d / "float.onnx")
    return d, teacher


@pytest.fixture(scope="module")
def static(run):
    d, teacher = run
    report = build(d / "run", CompressConfig(target="70%", quantize="int8"), None)
    return Path(report["output"]), report


def test_static_student_valid_smaller_and_close(run, static):
    d, teacher = run
    out, report = static
    assert out.name == "teacher.ndonnx-70pct-int8.onnx" and out.exists()
    q, f = onnx.load(str(out)), onnx.load(str(d / "float.onnx"))
    onnx.checker.check_model(q, full_check=True)
    assert {n.op_type for n in q.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert _io(q) == _io(f) == _io(onnx.load(str(teacher)))  # names, dtypes and shapes as the float student's
    x = np.load(d / "calib.npz")["input"]
    yq, yf = ort_session(q).run(None, {"input": x})[0], ort_session(f).run(None, {"input": x})[0]
    assert yq.dtype == yf.dtype and yq.shape == yf.shape
    assert np.linalg.norm(yq - yf) / np.linalg.norm(yf) < REL_ERR_BOUND
    r = report["quantize"]
    assert r["method"] == "static" and r["requested"] == "int8" and r["conv_share"] > 0.5
    assert r["calibration_samples"] == 86  # the training split (90% of 96): fewer than 256 samples
    assert r["bytes_int8"] == out.stat().st_size == report["validation"]["bytes_student"]
    # the same float student (not written here); its settings metadata differs only in "quantize": "int8"
    assert 0 <= r["bytes_float"] - (d / "float.onnx").stat().st_size <= len('"int8"') - len("null")
    weight_bytes = [sum(len(i.raw_data) for i in m.graph.initializer) for m in (q, f)]
    assert weight_bytes[0] < 0.35 * weight_bytes[1]  # the file: test_int8_file_smaller (this one is all names)
    v = report["validation"]
    assert r["score_int8"] == v["score_student"] and r["score_float"] == r["float_validation"]["score_student"]
    assert {"top1_agreement_float", "top1_agreement_int8", "latency_ratio_float", "latency_ratio_int8"} <= set(r)
    assert v["params_student"] == r["float_validation"]["params_student"] == report["params_student"]
    assert "torch_rel_err" not in v and "torch_rel_err" in r["float_validation"]


def test_int8_file_smaller(tmp_path):
    """Where weights outweigh the graph's names (a 32-channel ResNet, 100K parameters), the int8 file is
    under a third of the float one (the bundled 128K-parameter student: 36%)."""
    torch.manual_seed(0)
    path = models.export(models.TinyResNet(width=32), (torch.randn(2, 3, 16, 16),), tmp_path / "w32.onnx")
    model = load_teacher(path).model
    x = np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)
    q, info = quantize(model, "int8", {"input": x})
    assert info["method"] == "static" and info["calibration_samples"] == 32
    assert q.ByteSize() < model.ByteSize() / 3
    yq, yf = ort_session(q).run(None, {"input": x})[0], ort_session(model).run(None, {"input": x})[0]
    assert np.linalg.norm(yq - yf) / np.linalg.norm(yf) < REL_ERR_BOUND


def test_static_on_an_older_opset(zoo):
    """Per-channel QDQ needs opset 13: an opset-11 student is converted first; its interface stays."""
    model = load_teacher(zoo["resnet_opset11"]).model
    x = np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32)
    q, info = quantize(model, "int8", {"input": x})
    assert info["opset"].startswith("11 -> 13") and _io(q) == _io(model)
    yq, yf = ort_session(q).run(None, {"input": x})[0], ort_session(model).run(None, {"input": x})[0]
    assert np.linalg.norm(yq - yf) / np.linalg.norm(yf) < REL_ERR_BOUND


def test_method_rule(zoo, tmp_path):
    """int8: static for a conv net, dynamic for a transformer; the forced methods win."""
    resnet, encoder = load_teacher(zoo["resnet_legacy"]).model, load_teacher(zoo["encoder"]).model
    assert choose_method(resnet)[0] == "static" and choose_method(encoder)[0] == "dynamic"
    assert choose_method(encoder)[1]["conv_params"] == 0 and choose_method(resnet)[1]["conv_share"] > 0.9
    assert choose_method(resnet, "int8-dynamic")[0] == "dynamic" and choose_method(encoder, "int8-static")[0] == "static"
    q, info = quantize(encoder, "int8", None)  # dynamic: no calibration data needed
    assert info["method"] == "dynamic" and "MatMulInteger" in {n.op_type for n in q.graph.node}
    assert sum(weight_counts(q).values()) == sum(weight_counts(encoder).values())
    assert q.ByteSize() < encoder.ByteSize()
    rng = np.random.default_rng(0)
    feeds = {"ids": rng.integers(0, 50, (8, 7)), "mask": np.ones((8, 7), bool)}
    yq, yf = ort_session(q).run(None, feeds)[0], ort_session(encoder).run(None, feeds)[0]
    assert np.linalg.norm(yq - yf) / np.linalg.norm(yf) < REL_ERR_BOUND
    with pytest.raises(NdonnxError, match="needs calibration data"):
        quantize(resnet, "int8", None)


def test_bad_value_exit_2(run, capsys):
    d, _ = run
    for argv in (["search", str(d / "run"), "--quantize", "int4"], ["compress", "x.onnx", "--quantize", "int4"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--quantize" in err[0] and "int4" in err[0]
    with pytest.raises(NdonnxError, match="--quantize must be int8, int8-static, int8-dynamic"):
        CompressConfig(quantize="int4")


def test_failed_quantization_writes_nothing(run, tmp_path, monkeypatch, capsys):
    d, _ = run

    def broken(model, out, *a, **k):  # fails half way through writing its file
        Path(out).write_bytes(b"half a model")
        raise RuntimeError("quantizer exploded\nsecond line")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", broken)
    out = tmp_path / "q.onnx"
    assert main(["search", str(d / "run"), "--target-params", "70%", "--quantize", "int8", "-o", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "━" not in line]  # not the bars
    assert len(err) == 1 and "static quantizer failed: quantizer exploded" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_max_drop_applies_to_the_int8_student(run, static, tmp_path):
    """Quantized after fine-tuning; the int8 student's score is the one --max-drop judges."""
    d, _ = run
    with pytest.raises(DropTooLarge) as e:
        build(d / "run", CompressConfig(target="70%", quantize="int8-dynamic", max_drop=-1, finetune_steps=2),
              tmp_path / "q.onnx")
    r = e.value.report
    assert r["finetune"]["steps"] == 2 and list(r["timings"]).index("finetune") < list(r["timings"]).index("quantize")
    assert r["quantize"]["method"] == "dynamic" and not (tmp_path / "q.onnx").exists()
    assert r["error"].startswith(f"accuracy dropped by {1 - r['quantize']['score_int8']:.4f}")
    assert default_output(Path("m.onnx"), "50%", "int8").name == "m.ndonnx-50pct-int8.onnx"


def test_check_gates_on_the_int8_student(run, static, capsys):
    """The int8 student has its float model's parameters and MACs, and at most its non-zeros."""
    d, teacher = run
    out, report = static
    float_student = load_teacher(d / "float.onnx").model
    figures = {"--max-params": report["params_student"], "--max-macs": count_macs(float_student).total,
               "--max-nonzero": sum(weight_nonzeros(load_teacher(out, quantized=True).model).values())}
    assert figures["--max-nonzero"] <= sum(weight_nonzeros(float_student).values())
    for gate, value in figures.items():
        assert main(["check", str(out), gate, str(value)]) == 0, gate
        assert main(["check", str(out), gate, str(value - 1)]) == 1, gate
    data = ["--reference", str(teacher), "--data", str(d / "calib.npz"), "--labels", "labels"]
    assert main(["check", str(out), *data, "--max-accuracy-drop", "1", "--json"]) == 0
    capsys.readouterr()
    assert main(["validate", str(out), *data, "--json"]) == 0  # a quantized student validates too
    v = json.loads(capsys.readouterr().out)
    assert v["params_student"] == report["params_student"] and v["bytes_student"] == out.stat().st_size
    assert "torch_rel_err" not in v  # no torch round trip for an int8 graph


def _tiny_qdq(path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """y = x @ W + b in QDQ form: W int8 (4x3) per column with zero points (1, 0, -2), b int32; and
    the same model in floats (the dequantized weights) as the reference."""
    w_q = np.array([[1, 5, -2], [1, 0, 3], [7, 0, -2], [-4, 2, 0]], np.int8)
    w_zp = np.array([1, 0, -2], np.int8)  # column 0: two values at its zero point; 1: two zeros; 2: two -2s
    w_scale = np.array([0.1, 0.2, 0.05], np.float32)
    b_q = np.array([0, 3, -1], np.int32)
    b_scale = np.array([0.01, 0.01, 0.01], np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w_q, "w_q"), (w_zp, "w_zp"), (w_scale, "w_scale"),
                                                          (b_q, "b_q"), (b_scale, "b_scale"),
                                                          (np.array(0.05, np.float32), "x_scale"),
                                                          (np.array(128, np.uint8), "x_zp"))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=1),
             helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["b"], axis=0),
             helper.make_node("MatMul", ["xd", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    q = helper.make_model(helper.make_graph(nodes, "qdq", *io, inits), opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(q, str(path))
    w = (w_q.astype(np.float32) - w_zp) * w_scale
    b = b_q.astype(np.float32) * b_scale
    ref = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["xw"]),
                                               helper.make_node("Add", ["xw", "b"], ["y"])], "float", *io,
                                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]),
                            opset_imports=[helper.make_opsetid("", 13)])
    ref_path = path.with_name("reference.onnx")
    onnx.save(ref, str(ref_path))
    return path, ref_path, w_q, w_zp


def test_check_counts_a_quantized_model_by_hand(tmp_path, capsys):
    q, ref, w_q, w_zp = _tiny_qdq(tmp_path / "q.onnx")
    # by hand: W 12 values + b 3 values are parameters; the scales (3 + 3 + 1) and zero points are not.
    # Non-zeros: W minus its values equal to their column's zero point (col 0: rows 0,1; col 1: rows 1,2;
    # col 2: rows 0,2) = 12 - 6 = 6; b has one zero: 2. Total 8. MACs for one sample: 4 x 3 = 12.
    assert int((w_q != w_zp).sum()) == 6
    model = load_teacher(q, quantized=True).model
    assert weight_counts(model) == {"w_q": 12, "b_q": 3}
    assert weight_nonzeros(model) == {"w_q": 6, "b_q": 2}
    for gate, ok, bad in (("--max-params", "15", "14"), ("--max-nonzero", "8", "7"), ("--max-macs", "12", "11"),
                          ("--max-size", str(q.stat().st_size), str(q.stat().st_size - 1))):
        assert main(["check", str(q), gate, ok]) == 0, gate
        assert main(["check", str(q), gate, bad]) == 1, gate
    capsys.readouterr()
    x = np.random.default_rng(0).uniform(-2, 2, (64, 4)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    assert main(["check", str(q), "--reference", str(ref), "--data", str(tmp_path / "x.npz"), "--min-agreement",
                 "0.9", "--max-rel-err", "0.05", "--json"]) == 0
    gates = json.loads(capsys.readouterr().out)["gates"]
    assert [g["name"] for g in gates] == ["min-agreement", "max-rel-err"] and 0 < gates[1]["measured"] < 0.05
    with pytest.raises(NdonnxError, match="quantized models are not supported"):
        load_teacher(q)  # as a teacher it is still refused


def test_check_of_a_quantized_model_needs_no_torch(tmp_path):
    """The light CI install gates quantized models too (the counting imports neither torch nor the quantizer)."""
    from test_light_gate import _run

    q, ref, _, _ = _tiny_qdq(tmp_path / "q.onnx")
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).uniform(-2, 2, (16, 4)).astype(np.float32))
    r = _run(["check", str(q), "--max-params", "15", "--max-nonzero", "8", "--max-macs", "12", "--reference", str(ref),
              "--data", str(tmp_path / "x.npz"), "--max-rel-err", "0.05"],
             after="print('QUANTIZER', 'onnxruntime.quantization' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok ") == 4 and r.stdout.strip().endswith("QUANTIZER False")
