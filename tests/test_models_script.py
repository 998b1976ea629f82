"""models/train_resnet20.py end to end on a tiny budget: 256 training images, 1 epoch, 300 test images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "models" / "train_resnet20.py"
DATA = Path("/usr/share/datasets/fashion-mnist")
KEYS = {"test_accuracy", "subset_test_accuracy", "params", "epochs", "seconds", "seed", "mean", "std", "torch"}


@pytest.mark.skipif(
    not (DATA / "train-images-idx3-ubyte.gz").exists() and not (DATA / "train-images-idx3-ubyte").exists(),
    reason="Fashion-MNIST absent: apt-get update && apt-get install -y dataset-fashion-mnist",
)
def test_train_resnet20_smoke(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--limit", "256", "--epochs", "1", "--test-limit", "300",
           "--npz-count", "300", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    onnx_path = tmp_path / "resnet20_fmnist.onnx"
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for name in ("fmnist_subset.npz", "fmnist_test.npz"):
        with np.load(tmp_path / name, allow_pickle=False) as z:
            x, y = z["input"], z["labels"]
        assert x.dtype == np.float32 and x.shape == (300, 1, 28, 28)
        assert y.dtype == np.int64 and y.shape == (300,) and set(np.unique(y)) <= set(range(10))
        logits = sess.run(["logits"], {"input": x})[0]
        assert logits.shape == (300, 10) and np.isfinite(logits).all()

    meta = json.loads((tmp_path / "resnet20_fmnist.json").read_text())
    assert KEYS <= meta.keys()
    assert meta["epochs"] == 1 and meta["test_images"] == 300 and meta["train_images"] == 256
    assert 0.0 <= meta["test_accuracy"] <= 1.0 and 0.0 <= meta["subset_test_accuracy"] <= 1.0
    assert 250_000 < meta["params"] < 300_000  # ResNet-20: ~0.27 M weights
    assert not list(tmp_path.glob("*.tmp")), "temp files left behind"


@pytest.mark.skipif(
    not (DATA / "train-images-idx3-ubyte.gz").exists() and not (DATA / "train-images-idx3-ubyte").exists(),
    reason="Fashion-MNIST absent: apt-get update && apt-get install -y dataset-fashion-mnist",
)
def test_train_mobilenetv2_keeps_batchnorm(tmp_path):
    cmd = [sys.executable, str(ROOT / "models" / "train_mobilenetv2.py"), "--limit", "256", "--epochs", "1",
           "--test-limit", "300", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    model = onnx.load(str(tmp_path / "mobilenetv2_fmnist.onnx"))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 25 and "Clip" in ops  # not folded into the convolutions; ReLU6
    assert any(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute) for n in model.graph.node)
    meta = json.loads((tmp_path / "mobilenetv2_fmnist.json").read_text())
    assert KEYS <= meta.keys() and meta["batchnorm_nodes"] == 25 and meta["train_images"] == 256
    assert 200_000 < meta["params"] < 220_000
    assert not list(tmp_path.glob("*.tmp")), "temp files left behind"
