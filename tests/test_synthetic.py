"""Synthetic inputs for data-free distillation (ndonnx.synthetic): the BatchNormalization-statistics
generator moves the statistics toward the running ones, is seeded, is cached in the run directory
under its key; a classifier without BatchNormalization falls back to class inversion, a teacher with
nothing to optimise to noise, and the fallback is said once."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import pytest

import models
from ndonnx.config import DistillConfig
from ndonnx.distill import runner
from ndonnx.distill.runner import distill
from ndonnx.errors import NdonnxError
from ndonnx.graph import load_teacher
from ndonnx.sample import ort_session
from ndonnx.synthetic import (KEY, SyntheticConfig, bn_layers, bn_statistics_loss, cached_inputs, generate,
                              resolve_method)

SMALL = SyntheticConfig(count=24, batch=12, steps=15, seed=3)


@pytest.fixture(scope="module")
def bn_teacher(tmp_path_factory):
    return models.tiny_resnet_bn(tmp_path_factory.mktemp("bn") / "resnet_bn.onnx")


def test_bn_stats_moves_statistics_toward_running_values(bn_teacher):
    teacher = load_teacher(bn_teacher)
    assert len(bn_layers(teacher.model)) == 8  # stem, 2 per block, the projection shortcut
    before = bn_statistics_loss(teacher, generate(teacher, SyntheticConfig(method="noise", count=12, seed=3)))
    made = generate(teacher, SMALL)
    assert made["input"].shape == (24, 3, 16, 16) and made["input"].dtype == np.float32
    after = [bn_statistics_loss(teacher, {"input": made["input"][lo:lo + 12]}) for lo in (0, 12)]
    assert max(after) < 0.5 * before, (before, after)


def test_bn_stats_is_seeded(bn_teacher):
    teacher = load_teacher(bn_teacher)
    cfg = SyntheticConfig(count=8, batch=8, steps=3, seed=5)
    a, b = generate(teacher, cfg), generate(teacher, cfg)
    assert np.array_equal(a["input"], b["input"])
    other = generate(teacher, SyntheticConfig(count=8, batch=8, steps=3, seed=6))
    assert not np.array_equal(a["input"], other["input"])


def test_inputs_are_cached_under_their_key(bn_teacher, tmp_path, caplog):
    teacher = load_teacher(bn_teacher)
    path = tmp_path / "synthetic.npz"
    cfg = SyntheticConfig(count=8, batch=8, steps=2)
    cached_inputs(teacher, path, cfg, "digest")
    stamp, first = path.stat().st_mtime_ns, np.load(path)["input"]
    with caplog.at_level(logging.INFO, logger="ndonnx"):
        cached_inputs(teacher, path, cfg, "digest")
    assert path.stat().st_mtime_ns == stamp and "reusing" in caplog.text
    for changed, n in ((SyntheticConfig(count=10, batch=8, steps=2), 10),
                       (SyntheticConfig(count=8, batch=8, steps=2, seed=1), 8)):
        cached_inputs(teacher, path, changed, "digest")
        with np.load(path) as z:
            assert len(z["input"]) == n and str(z[KEY]) == changed.key("digest")
            assert changed.seed == 0 or not np.array_equal(z["input"], first)
        assert path.stat().st_mtime_ns != stamp
        stamp = path.stat().st_mtime_ns
    cached_inputs(teacher, path, SyntheticConfig(method="noise", count=8), "digest")  # another method
    with np.load(path) as z:
        assert json.loads(str(z[KEY]))["method"] == "noise"
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left beside it


def test_data_free_uses_bn_stats_inputs_through_the_data_path(bn_teacher, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(runner, "SyntheticConfig", functools.partial(SyntheticConfig, steps=4))
    cfg = DistillConfig(candidates="width:0.5,teacher", steps=4, batch=8, jobs=1, data_free=True, synthetic_count=20)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="ndonnx"):
        rows = distill(bn_teacher, run, cfg)
    assert any(r["status"] == "trained" for r in rows) and "falling back" not in caplog.text
    assert not list((run / "noise").iterdir())  # no noise statistics: the cached inputs are trained on
    job = json.loads(next((run / "done").iterdir()).read_text())
    assert job["status"] in ("trained", "frozen")
    with np.load(run / "synthetic.npz") as z:
        assert json.loads(str(z[KEY]))["method"] == "bn-stats" and len(z["input"]) == 20
    meta = json.loads((run / "run.json").read_text())
    assert meta["settings"]["data_free_method"] == "auto" and meta["settings"]["synthetic_count"] == 20
    stamp = (run / "synthetic.npz").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ndonnx"):
        distill(bn_teacher, run, cfg)  # a rerun reuses the inputs (and the cache and the journal)
    assert (run / "synthetic.npz").stat().st_mtime_ns == stamp and "reusing the synthetic inputs" in caplog.text


def test_no_batchnorm_falls_back_to_inversion_and_says_so(zoo, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(runner, "SyntheticConfig", functools.partial(SyntheticConfig, steps=4))
    teacher = load_teacher(zoo["resnet_legacy"])  # the legacy exporter folded BatchNormalization into the convs
    method, why = resolve_method(teacher, "auto")
    assert method == "inversion" and "no BatchNormalization" in why and "class inversion" in why
    assert resolve_method(teacher, "noise") == ("noise", None) and resolve_method(teacher, "inversion") == ("inversion", None)
    with pytest.raises(NdonnxError, match="bn-stats"):
        resolve_method(teacher, "bn-stats")
    cfg = DistillConfig(candidates="width:0.5,teacher", steps=2, batch=8, jobs=1, data_free=True, synthetic_count=16)
    with caplog.at_level(logging.INFO, logger="ndonnx"):
        distill(zoo["resnet_legacy"], tmp_path / "run", cfg)
    warnings = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert not list((tmp_path / "run" / "noise").iterdir())  # trained on the teacher's activations of the inputs
    with np.load(tmp_path / "run" / "synthetic.npz") as z:
        assert json.loads(str(z[KEY]))["method"] == "inversion" and len(z["input"]) == 16


def test_inversion_moves_predictions_to_the_target_classes(zoo):
    teacher = load_teacher(zoo["resnet_legacy"])
    # (random weights: the logits move slowly, hence the larger rate)
    made = generate(teacher, SyntheticConfig(method="inversion", count=20, batch=20, steps=30, lr=0.5))
    noise = generate(teacher, SyntheticConfig(method="noise", count=20))
    sess = ort_session(teacher.model)
    target = np.arange(20) % 10  # each class in turn

    def cross_entropy(x):
        z = sess.run(None, {"input": x["input"]})[0]
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(20), target])), float((z.argmax(1) == target).mean())

    (before, hits_before), (after, hits_after) = cross_entropy(noise), cross_entropy(made)
    assert after < before - 0.25 and hits_after >= hits_before + 0.15, (before, after, hits_before, hits_after)


def test_without_float_inputs_or_classes_noise_is_used(zoo):
    teacher = load_teacher(zoo["encoder"])  # token ids in: nothing to optimise
    method, why = resolve_method(teacher, "auto")
    assert method == "noise" and "no float input" in why and "Gaussian noise" in why
    with pytest.raises(NdonnxError, match="inversion"):
        resolve_method(teacher, "inversion")


def test_bn_stats_refused_with_data_and_for_bad_settings(bn_teacher, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.zeros((8, 3, 16, 16), np.float32))
    with pytest.raises(NdonnxError, match="with --data"):
        distill(bn_teacher, tmp_path / "run", DistillConfig(data_free=True, data_free_method="bn-stats"), data_path=calib)
    with pytest.raises(NdonnxError, match="--data-free-method"):
        DistillConfig(data_free=True, data_free_method="gan")
    with pytest.raises(NdonnxError, match="--synthetic-count"):
        DistillConfig(data_free=True, synthetic_count=1)


MOBILENET = Path(__file__).resolve().parent.parent / "models" / "mobilenetv2_fmnist.onnx"


@pytest.fixture
def one_thread():
    """Small batches: one torch thread is as fast on idle cores and far faster on shared ones."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bn_stats_on_the_bundled_trained_teacher(one_thread):
    """The bundled MobileNetV2 keeps its 25 trained BatchNormalization layers: auto picks bn-stats, and
    20 steps bring the statistics far closer to the running ones than the noise they start from (real
    images: about 0.35 on 16), the same way for the same seed."""
    teacher = load_teacher(MOBILENET)
    assert len(bn_layers(teacher.model)) == 25 and resolve_method(teacher, "auto") == ("bn-stats", None)
    made = generate(teacher, SyntheticConfig(count=16, batch=16, steps=20, seed=1))
    before = bn_statistics_loss(teacher, generate(teacher, SyntheticConfig(method="noise", count=16, seed=1)))
    after = bn_statistics_loss(teacher, made)
    assert made["input"].shape == (16, 1, 28, 28) and after < 0.3 * before, (before, after)
    cfg = SyntheticConfig(count=4, batch=4, steps=3, seed=2)
    assert np.array_equal(generate(teacher, cfg)["input"], generate(teacher, cfg)["input"])


def test_an_interrupted_generation_resumes_from_its_finished_batches(bn_teacher, tmp_path, monkeypatch):
    """Each optimised batch is kept as it finishes; a rerun optimises only the rest and gives the
    inputs an uninterrupted run gives."""
    import ndonnx.synthetic as synthetic

    teacher = load_teacher(bn_teacher)
    cfg = SyntheticConfig(count=24, batch=8, steps=3, seed=2)
    whole = cached_inputs(teacher, tmp_path / "a.npz", cfg, "digest")
    assert not (tmp_path / "a.parts").exists()  # the parts go once the whole is written
    real, calls = synthetic._keep, []

    def keep_then_stop(parts, lo, key, arrays):
        real(parts, lo, key, arrays)
        calls.append(lo)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_keep", keep_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cached_inputs(teacher, tmp_path / "b.npz", cfg, "digest")
    assert sorted(p.name for p in (tmp_path / "b.parts").iterdir()) == ["0000000.npz", "0000008.npz"]
    monkeypatch.setattr(synthetic, "_keep", lambda parts, lo, key, arrays: calls.append(lo) or real(parts, lo, key, arrays))
    calls.clear()
    resumed = cached_inputs(teacher, tmp_path / "b.npz", cfg, "digest")
    assert calls == [16]  # only the batch that was not finished
    assert np.array_equal(np.load(whole)["input"], np.load(resumed)["input"])


def test_a_loss_that_does_not_fall_stops_with_a_warning(tmp_path, caplog):
    """Inversion of a classifier whose logits ignore the input: the loss cannot move."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((12, 10), np.float32), "w")
    b = numpy_helper.from_array(np.arange(10, dtype=np.float32), "b")
    g = helper.make_graph([helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w", "b"], ["y"])],
                          "flat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], [w, b])
    path = tmp_path / "constant_classifier.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    teacher = load_teacher(path)
    with caplog.at_level(logging.WARNING, logger="ndonnx"):
        made = generate(teacher, SyntheticConfig(method="inversion", count=16, batch=8, steps=8, seed=0))
    warned = [r.getMessage() for r in caplog.records if "did not fall" in r.getMessage()]
    assert len(warned) == 1 and "--data-free-method noise" in warned[0]
    assert made["x"].shape == (16, 3, 2, 2) and np.isfinite(made["x"]).all()
