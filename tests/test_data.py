"""Calibration data checks, the activation cache, and torch bindings of ONNX weights."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from ndonnx.convert import extract, rel_err
from ndonnx.data import load_data
from ndonnx.distill.cache import CacheReader, build_cache
from ndonnx.errors import NdonnxError
from ndonnx.graph import load_teacher
from ndonnx.partition import partition
from ndonnx.sample import make_inputs, run_sample
from ndonnx.trainable import Trainable, write_weights


def _images(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def test_lone_array_and_shards(zoo, tmp_path):
    t = load_teacher(zoo["resnet_legacy"])
    np.savez(tmp_path / "one.npz", _images(10))
    assert load_data(tmp_path / "one.npz", t).size == 10
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        np.savez(shards / f"{k}.npz", input=_images(4, k), y=np.arange(4))
    d = load_data(shards, t, labels_key="y")
    assert d.size == 12 and d.read_all()["y"].tolist() == [0, 1, 2, 3] * 3


@pytest.mark.parametrize("case,match", [
    ("name", "no array named 'ids'"), ("shape", "expects Nx7"), ("dtype", "dtype"),
    ("nan", "NaN"), ("empty", "empty data file"), ("object", "object arrays"), ("labels", "no labels array"),
])
def test_bad_data_refused(zoo, tmp_path, case, match):
    t = load_teacher(zoo["encoder"])
    good = make_inputs(t)
    arrays = dict(good)
    path = tmp_path / "d.npz"
    labels = None
    if case == "name":
        arrays = {"tokens": good["ids"], "mask": good["mask"]}
    elif case == "shape":
        arrays["ids"] = np.zeros((2, 9), np.int64)
    elif case == "dtype":
        arrays["mask"] = np.zeros((2, 7), np.float32)
    elif case == "nan":
        t = load_teacher(zoo["resnet_legacy"])
        arrays = {"input": np.full((2, 3, 16, 16), np.nan, np.float32)}
    elif case == "empty":
        arrays = {}
    elif case == "labels":
        labels = "y"
    if case == "object":
        np.savez(path, ids=np.array([object()] * 2, dtype=object), mask=good["mask"])
    else:
        np.savez(path, **arrays)
    with pytest.raises(NdonnxError, match=match):
        load_data(path, t, labels_key=labels)


def test_cache_roundtrip(zoo, tmp_path):
    t = load_teacher(zoo["resnet_legacy"])
    x = _images(50)
    np.savez(tmp_path / "d.npz", input=x)
    data = load_data(tmp_path / "d.npz", t)
    part = partition(t)
    names = sorted({n for nb in part.neighbourhoods for n in (*nb.inputs, *nb.outputs)})
    build_cache(t.model, names, data, tmp_path / "cache", seed=0, fingerprint="f", batch=16)
    r = CacheReader(tmp_path / "cache")
    assert r.size == 50 and len(r.holdout) == 5 and len(r.train) == 45
    assert not set(r.holdout) & set(r.train)
    idx = np.arange(50)
    np.testing.assert_allclose(r.read("input", idx), x, atol=2e-3, rtol=1e-3)  # float16 on disk
    logits = r.read("logits", idx)
    from ndonnx.sample import ort_session
    want = ort_session(t.model).run(["logits"], {"input": x})[0]
    assert rel_err(logits, want) < 1e-3


@pytest.mark.parametrize("name", ["resnet_legacy", "encoder", "mobilenet"])
def test_trainable_binds_every_weight_and_writes_back(zoo, name):
    t = load_teacher(zoo[name])
    s = run_sample(t)
    for nbh in partition(t).neighbourhoods:
        sub = extract(t, nbh, s)
        tr = Trainable(sub)
        assert not tr.frozen and tr.trainable
        with torch.no_grad():  # perturb, write back, and the ONNX model must follow
            for p in tr.named_weights().values():
                p.add_(0.01)
        new = write_weights(sub, tr.weights())
        onnx.checker.check_model(new)
        from ndonnx.sample import ort_session
        feeds = {n: s.values[n] for n in tr.input_names}
        want = ort_session(new).run(None, feeds)[0]
        got = tr(*[torch.from_numpy(s.values[n]) for n in tr.input_names])[0].detach().numpy()
        assert rel_err(got, want) < 1e-4
        assert rel_err(want, s.values[nbh.outputs[0]]) > 1e-4  # the change did reach the ONNX weights


def test_cache_keeps_large_values_in_float32(zoo, tmp_path):
    t = load_teacher(zoo["resnet_legacy"])
    x = _images(20) * 1e5  # activations beyond float16's range
    np.savez(tmp_path / "d.npz", input=x)
    build_cache(t.model, ["input", "logits"], load_data(tmp_path / "d.npz", t), tmp_path / "c", seed=0,
                fingerprint="f", batch=8)
    r = CacheReader(tmp_path / "c")
    assert r.arrays["input"].dtype == np.float32 and np.isfinite(r.read("logits", np.arange(20))).all()
    np.testing.assert_allclose(r.read("input", np.arange(20))[8:], x[8:], rtol=1e-6)


def test_cache_widens_a_tensor_that_overflows_float16_after_some_batches(zoo, tmp_path):
    """The first batch fits float16, a later one does not: rows already written are rewritten float32."""
    t = load_teacher(zoo["resnet_legacy"])
    x = _images(24)
    x[12:] *= 1e6
    np.savez(tmp_path / "d.npz", input=x)
    build_cache(t.model, ["input", "logits"], load_data(tmp_path / "d.npz", t), tmp_path / "c", seed=0,
                fingerprint="f", batch=8)
    r = CacheReader(tmp_path / "c")
    from ndonnx.sample import ort_session
    want = ort_session(t.model).run(["logits"], {"input": x})[0]
    files = json.loads((tmp_path / "c" / "manifest.json").read_text())["files"]
    assert np.abs(want).max() > 1e5 and files["logits"]["file"].endswith(".f32.npy")
    assert np.load(tmp_path / "c" / files["logits"]["file"]).dtype == np.float32
    got = r.read("logits", np.arange(24))
    assert rel_err(got[:8], want[:8]) < 1e-3  # written float16 first, then widened
    assert rel_err(got[8:], want[8:]) < 1e-5
    np.testing.assert_allclose(r.read("input", np.arange(24))[12:], x[12:], rtol=1e-6)
