"""`ndonnx check`: each gate passing and failing, JSON and JUnit output, bad input."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ndonnx.sample import ort_session
from ndonnx_cli.main import main


@pytest.fixture(scope="module")
def data(zoo, tmp_path_factory):
    path = tmp_path_factory.mktemp("check") / "d.npz"
    np.savez(path, input=np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32))
    return path


@pytest.mark.parametrize("gate,ok,bad", [
    ("--max-params", "6362", "6361"), ("--max-params", "7K", "6K"), ("--max-size", "1MB", "10KB"),
    ("--max-nonzero", "6362", "100"),
])
def test_size_gates(zoo, capsys, gate, ok, bad):
    m = str(zoo["resnet_legacy"])
    assert main(["check", m, gate, ok]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["check", m, gate, bad]) == 1
    out, err = capsys.readouterr()
    assert "FAIL" in out and "allowed" in out and "check failed" in err


def test_quality_gates(zoo, data, capsys):
    m = str(zoo["resnet_legacy"])
    same = ["check", m, "--reference", m, "--data", str(data)]
    assert main(same + ["--min-agreement", "1.0", "--max-rel-err", "1e-6"]) == 0
    other = ["check", str(zoo["resnet_opset11"]), "--reference", m, "--data", str(data)]
    assert main(other + ["--min-agreement", "0.99"]) == 0  # the same network, another opset
    assert main(["check", str(zoo["resnet_constants"]), "--reference", m, "--data", str(data), "--max-rel-err", "0"]) == 0


@pytest.fixture(scope="module")
def perturbed(zoo, data, tmp_path_factory):
    """The tiny ResNet with its classifier's weights flipped in sign, and labels its reference predicts."""
    model = onnx.load(str(zoo["resnet_legacy"]))
    head = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
    init = next(i for i in model.graph.initializer if i.name == head.input[1])
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    path = tmp_path_factory.mktemp("perturbed") / "perturbed.onnx"
    onnx.save(model, str(path))
    x = np.load(data)["input"]
    labels = ort_session(onnx.load(str(zoo["resnet_legacy"]))).run(None, {"input": x})[0].argmax(-1)
    labelled = path.with_name("labelled.npz")
    np.savez(labelled, input=x, labels=labels)
    return path, labelled


def test_quality_gates_fail_on_another_model(zoo, perturbed, capsys):
    path, labelled = perturbed
    ref = ["--reference", str(zoo["resnet_legacy"]), "--data", str(labelled)]
    assert main(["check", str(path), *ref, "--max-rel-err", "0.01", "--json"]) == 1
    r = json.loads(capsys.readouterr().out)
    assert r["gates"][0]["measured"] > 0.01 and not r["passed"]
    assert main(["check", str(path), *ref, "--labels", "labels", "--max-accuracy-drop", "0.0", "--json"]) == 1
    gate = json.loads(capsys.readouterr().out)["gates"][0]
    assert gate["name"] == "max-accuracy-drop" and 0 < gate["measured"] <= 1
    assert main(["check", str(path), *ref, "--labels", "labels", "--max-accuracy-drop", "1"]) == 0
    assert main(["check", str(zoo["resnet_legacy"]), *ref, "--labels", "labels", "--max-accuracy-drop", "0"]) == 0


def test_json_and_junit(zoo, tmp_path, capsys):
    m = str(zoo["resnet_legacy"])
    xml = tmp_path / "gates.xml"
    assert main(["check", m, "--max-params", "6K", "--max-size", "1MB", "--json", "--junit", str(xml)]) == 1
    r = json.loads(capsys.readouterr().out)
    assert r["passed"] is False and [g["passed"] for g in r["gates"]] == [False, True]
    suite = ET.parse(xml).getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == "1"


@pytest.mark.parametrize("argv, says", [
    (["--max-params", "lots"], "--max-params 'lots'"), (["--max-size", "big"], "--max-size 'big'"),
    ([], "no gate given"), (["--min-agreement", "0.9"], "need --reference"),
    (["--min-agreement", "98"], "a fraction between 0 and 1"), (["--max-rel-err", "-1"], ">= 0"),
    (["--labels", "y", "--max-params", "1M"], "--labels is used by --max-accuracy-drop only"),
    (["--max-accuracy-drop", "0.01"], "needs --labels"),
])
def test_bad_input_exit_2(zoo, capsys, argv, says):
    assert main(["check", str(zoo["resnet_legacy"]), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ndonnx: error:") and says in err[0]
