"""Calibration data checks, the activation cache, and torch bindings of ONNX weights."""

from __future__ import annotations

import errno
import fcntl
import json
import os

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
from ndonnx.sample import make_inputs, run_sample, with_outputs
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
    files = json.loads((tmp_path / "c" / "manifest.json").read_text())["files"]
    assert np.load(tmp_path / "c" / files["input"]["file"], mmap_mode="r").dtype == np.float32  # on disk
    assert np.isfinite(r.read("logits", np.arange(20))).all()
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


@pytest.mark.parametrize("direct", [True, False])
def test_cache_holds_every_tensor_as_the_teacher_gives_it(zoo, tmp_path, monkeypatch, direct):
    """Every boundary of every sample, through both the aligned direct writes and plain ones (tmpfs
    and other file systems refuse O_DIRECT), batches bound to our buffers and a shorter last one."""
    from ndonnx.distill import cache
    from ndonnx.sample import ort_session
    if not direct:
        monkeypatch.setattr(cache, "_O_DIRECT", 0)
    t = load_teacher(zoo["resnet_legacy"])
    x = _images(53)
    np.savez(tmp_path / "d.npz", input=x)
    names = sorted({n for nb in partition(t).neighbourhoods for n in (*nb.inputs, *nb.outputs)})
    build_cache(t.model, names, load_data(tmp_path / "d.npz", t), tmp_path / "c", seed=0, fingerprint="f", batch=16)
    r = CacheReader(tmp_path / "c")
    run = [n for n in names if n != "input"]
    want = dict(zip(run, ort_session(with_outputs(t.model, run)).run(run, {"input": x})))
    for n in run:
        assert rel_err(r.read(n, np.arange(53)), want[n]) < 1e-3, n
    for f in (tmp_path / "c").glob("0*.npy"):  # the header padded to one block, the length exact
        a = np.load(f, mmap_mode="r")
        assert a.offset == cache.BLOCK and f.stat().st_size == cache.BLOCK + a.nbytes


def test_direct_rows_split_any_chunks_into_whole_blocks(tmp_path, monkeypatch):
    """Rows of odd sizes, aligned or not, read back whole; a file system that takes O_DIRECT at open
    but refuses the writes (EINVAL) gets plain writes instead."""
    from ndonnx.distill import cache
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((k, 3, 5)).astype(np.float16) for k in (1, 7, 300, 0, 1000, 2)]
    aligned = cache._aligned((1000, 3, 5), np.float16)
    aligned[:] = rows[4]
    rows[4] = aligned  # page-aligned memory goes uncopied
    f = cache._Rows(tmp_path / "a.npy", np.float16, (1310, 3, 5))
    for v in rows:
        f.write(v)
    f.close()
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.concatenate(rows))

    real_write, refused = os.write, []

    def picky(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & cache._O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(cache.os, "write", picky)
    f = cache._Rows(tmp_path / "b.npy", np.float16, (1310, 3, 5))
    for v in rows:
        f.write(v)
    f.close()
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), np.concatenate(rows))
    assert refused or not cache._O_DIRECT


@pytest.mark.parametrize(("most", "sample_bytes", "want"), [(256, 158_388, 64), (256, 10, 256), (16, 158_388, 16),
                                                            (256, 50 << 20, 1), (256, 0, 256)])
def test_cache_batches_are_powers_of_two_of_about_batch_bytes(most, sample_bytes, want):
    from ndonnx.distill import cache
    assert cache._batch_size(most, sample_bytes) == want


def test_cache_refuses_shards_whose_samples_differ_in_shape(tmp_path):
    """Token shards padded to different lengths: one clear error naming the shard, not a cache whose
    rows no longer line up (found on a folder of shards: reads then failed in numpy's mmap)."""
    import models
    t = load_teacher(models.bert_style(tmp_path / "b.onnx"))
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    for name, seq in (("a", 7), ("b", 5)):
        np.savez(tmp_path / "data" / f"{name}.npz", input_ids=rng.integers(0, 60, (6, seq)),
                 attention_mask=np.ones((6, seq), np.int64))
    names = sorted({n for nb in partition(t).neighbourhoods for n in (*nb.inputs, *nb.outputs)})
    open_fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(NdonnxError, match=r"b\.npz: 'input_ids' has samples of shape \[5\], the first shard's are \[7\]"):
        build_cache(t.model, names, load_data(tmp_path / "data", t), tmp_path / "c", seed=0, fingerprint="f", batch=4)
    assert not (tmp_path / "c" / "manifest.json").exists()
    assert open_fds is None or len(os.listdir("/proc/self/fd")) == open_fds  # the files' descriptors closed


def test_cache_keeps_tiny_values_in_float32(tmp_path):
    """Activations all below 2^-10 lose their bits in float16 (subnormal under 6.1e-5, zero under 6e-8;
    met on an exported detector, 1e-9 to 1e-6 after a few blocks on random inputs): stored float32."""
    from onnx import TensorProto, helper

    from ndonnx.graph import load_teacher

    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "small"], ["tiny"]), helper.make_node("Mul", ["tiny", "large"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor("small", TensorProto.FLOAT, [], [1e-7]), helper.make_tensor("large", TensorProto.FLOAT, [], [1e7])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    t = load_teacher(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    build_cache(t.model, ["x", "tiny", "y"], load_data(tmp_path / "d.npz", t), tmp_path / "c", seed=0, fingerprint="f", batch=8)
    r = CacheReader(tmp_path / "c")
    files = json.loads((tmp_path / "c" / "manifest.json").read_text())["files"]
    stored = {k: np.load(tmp_path / "c" / files[k]["file"], mmap_mode="r").dtype for k in ("x", "tiny", "y")}
    assert stored == {"x": np.float16, "tiny": np.float32, "y": np.float16}
    assert rel_err(r.read("tiny", np.arange(20)), x * np.float32(1e-7)) < 1e-6
    assert rel_err(r.read("y", np.arange(20)), x) < 1e-3
