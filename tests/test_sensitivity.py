"""`ndonnx sensitivity` on a tiny model: the table, thresholds, the plot, bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx

from ndonnx.sample import ort_session
from ndonnx.sensitivity import inject_noise
from ndonnx_cli.main import main


def test_sensitivity_table_json_and_plot(zoo, tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=x)
    png = tmp_path / "s.png"
    assert main(["sensitivity", str(zoo["resnet_legacy"]), "--data", str(tmp_path / "d.npz"), "--eps", "0,0.1,10",
                 "--plot", str(png), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["metric"] == "agreement" and r["eps"] == [0, 0.1, 10] and len(r["neighbourhoods"]) == 5
    for n in r["neighbourhoods"]:
        assert n["drops"][0] == 0.0  # no noise, no drop
    assert r["all"]["drops"][-1] > 0.3  # ten standard deviations everywhere destroy the prediction
    assert r["all"]["threshold"] in (0, 0.1)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["sensitivity", str(zoo["resnet_legacy"]), "--data", str(tmp_path / "d.npz")]) == 0
    assert "all" in capsys.readouterr().out
    assert main(["sensitivity", str(zoo["resnet_legacy"]), "--data", str(tmp_path / "d.npz"), "--eps", "a,b"]) == 2


def test_inject_noise_is_seeded_and_scaled(zoo):
    m = onnx.load(str(zoo["resnet_legacy"]))
    x = {"input": np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)}
    clean = ort_session(m).run(None, x)[0]
    a = ort_session(inject_noise(m, {"logits": 1.0}, 0)).run(None, x)[0]
    b = ort_session(inject_noise(m, {"logits": 1.0}, 0)).run(None, x)[0]
    np.testing.assert_array_equal(a, b)
    assert 0.5 < np.std(a - clean) < 1.5
