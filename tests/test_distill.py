"""The distillation runner: run directory, journal and resume, data-free and look-ahead, seeds."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from ndonnx.config import DistillConfig
from ndonnx.distill import runner
from ndonnx.distill.layout import job_stem
from ndonnx.distill.runner import distill
from ndonnx.errors import NdonnxError
from ndonnx_cli.main import main

FAST = dict(candidates="width:0.5,teacher", steps=15, batch=16, jobs=1)


@pytest.fixture(scope="module")
def calib(zoo, tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(path, input=rng.standard_normal((80, 3, 16, 16)).astype(np.float32), labels=rng.integers(0, 10, 80))
    return path


def _rows(run_dir):
    return json.loads((run_dir / "candidates.json").read_text())


def test_distill_writes_every_candidate(zoo, calib, tmp_path):
    rows = distill(zoo["resnet_legacy"], tmp_path / "run", DistillConfig(**FAST), data_path=calib)
    assert rows == _rows(tmp_path / "run")
    by = {(r["neighbourhood"], r["candidate"]): r for r in rows}
    for nid in range(5):
        assert by[(nid, "teacher")]["status"] == "frozen" and by[(nid, "teacher")]["rel_mse"] < 1e-6
    for nid in (1, 2, 3):  # the residual blocks have an inner channel group to halve
        r = by[(nid, "width:0.5")]
        assert r["status"] == "trained" and r["params"] < by[(nid, "teacher")]["params"]
        assert 0 <= r["rel_mse"] < 1 and r["seconds"] > 0
        assert load_file(str(tmp_path / "run" / "weights" / r["weights"]))
    keys = {"neighbourhood", "candidate", "params", "rel_mse", "status", "reason", "seconds"}
    assert all(keys <= r.keys() for r in rows)


def test_training_lowers_held_out_error(zoo, calib, tmp_path):
    short = distill(zoo["resnet_legacy"], tmp_path / "a", DistillConfig(**{**FAST, "steps": 1}), data_path=calib)
    long = distill(zoo["resnet_legacy"], tmp_path / "b", DistillConfig(**{**FAST, "steps": 60}), data_path=calib)
    err = lambda rows: {r["neighbourhood"]: r["rel_mse"] for r in rows if r["candidate"] == "width:0.5"}
    a, b = err(short), err(long)
    assert all(b[k] < a[k] for k in a), (a, b)


def test_same_seed_same_student(zoo, calib, tmp_path):
    for d in ("x", "y"):
        distill(zoo["resnet_legacy"], tmp_path / d, DistillConfig(**FAST), data_path=calib)
    for f in (tmp_path / "x" / "weights").iterdir():
        a, b = load_file(str(f)), load_file(str(tmp_path / "y" / "weights" / f.name))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_skips_finished_jobs(zoo, calib, tmp_path, monkeypatch):
    run = tmp_path / "run"
    distill(zoo["resnet_legacy"], run, DistillConfig(**FAST), data_path=calib)
    (run / "done" / "2__width_0.5.json").unlink()  # as if killed before this job finished
    trained = []
    real = runner.run_group
    monkeypatch.setattr(runner, "run_group", lambda jobs: trained.extend((j.neighbourhood, j.candidate) for j in jobs) or real(jobs))
    rows = distill(zoo["resnet_legacy"], run, DistillConfig(**FAST), data_path=calib)
    assert trained == [(2, "width:0.5")]
    assert len(rows) == len(_rows(run)) and any(r["neighbourhood"] == 2 and r["candidate"] == "width:0.5" for r in rows)


def _trained(run_dir, rows):
    return {(r["neighbourhood"], r["candidate"]): (r["rel_mse"], load_file(str(run_dir / "weights" / r["weights"])))
            for r in rows if r["status"] == "trained"}


def test_data_free_and_lookahead(zoo, calib, tmp_path):
    rows = distill(zoo["resnet_legacy"], tmp_path / "free", DistillConfig(**FAST, data_free=True))
    assert json.loads((tmp_path / "free" / "run.json").read_text())["settings"]["data_free"] is True
    assert any(r["status"] == "trained" for r in rows)
    # look-ahead is used: the same run (same seed, data, steps) with lookahead=1 trains other weights
    # wherever a next neighbourhood exists, and the very same weights for the last one (nothing ahead)
    rows = distill(zoo["resnet_legacy"], tmp_path / "plain", DistillConfig(**FAST), data_path=calib)
    plain, last = _trained(tmp_path / "plain", rows), max(r["neighbourhood"] for r in rows)
    look = _trained(tmp_path / "look", distill(zoo["resnet_legacy"], tmp_path / "look",
                                               DistillConfig(**FAST, lookahead=1), data_path=calib))
    settings = lambda d: json.loads((tmp_path / d / "run.json").read_text())["settings"]
    assert settings("look")["lookahead"] == 1 and settings("plain")["lookahead"] == 0
    assert {k: v for k, v in settings("look").items() if k != "lookahead"} == \
        {k: v for k, v in settings("plain").items() if k != "lookahead"}
    assert plain.keys() == look.keys() and plain
    for key, (rel, w) in plain.items():
        rel_look, w_look = look[key]
        same = w.keys() == w_look.keys() and all(np.array_equal(w[k], w_look[k]) for k in w)
        if key[0] == last:
            assert same and rel == rel_look, key
        else:
            assert not same and rel != rel_look, key
    rows = distill(zoo["encoder"], tmp_path / "enc", DistillConfig(**{**FAST, "candidates": "width:0.5,teacher"}, data_free=True))
    assert any(r["status"] == "trained" for r in rows)  # masks stay valid: feed-forward and attention run


def test_sparse_schedule_reaches_its_target(zoo, calib, tmp_path):
    """Zhu & Gupta's ramp ends at the target: after training `sparse:0.8`, every prunable weight
    (Conv/Gemm/MatMul weights of the student) is at least 80% zeros, and the record counts them."""
    import onnx

    from ndonnx.candidates.sparse import prunable_weights, pruned_count, zhu_gupta

    assert zhu_gupta(20, 20, 0.8) == 0.8 and zhu_gupta(0, 20, 0.8) == 0.0 and 0 < zhu_gupta(10, 20, 0.8) < 0.8
    run = tmp_path / "run"
    rows = distill(zoo["resnet_legacy"], run, DistillConfig(candidates="sparse:0.8,teacher", steps=20, batch=16,
                                                            jobs=1), data_path=calib)
    sparse = [r for r in rows if r["candidate"] == "sparse:0.8"]
    assert sparse and all(r["status"] == "trained" for r in sparse), sparse
    for r in sparse:
        student = onnx.load(str(run / "students" / f"{job_stem(r['neighbourhood'], r['candidate'])}.onnx"))
        names = prunable_weights(student)
        w = load_file(str(run / "weights" / r["weights"]))
        assert names and set(names) <= w.keys(), (names, list(w))
        for n in names:
            zeros = (w[n] == 0).mean()  # the count is rounded to whole weights: half a weight of slack
            assert zeros >= 0.8 - 0.5 / w[n].size, (r["neighbourhood"], n, zeros)
            assert (w[n] == 0).sum() >= pruned_count(w[n].size, 0.8)
        assert r["nonzero"] == r["params"] - sum(int((v == 0).sum()) for v in w.values())
        assert r["nonzero"] <= r["params"] - sum(pruned_count(w[n].size, 0.8) for n in names)


def test_run_dir_of_another_model_refused(zoo, calib, tmp_path):
    run = tmp_path / "run"
    distill(zoo["two_heads"], run, DistillConfig(**FAST, data_free=True))
    with pytest.raises(NdonnxError, match="another model"):
        distill(zoo["resnet_legacy"], run, DistillConfig(**FAST), data_path=calib)
    distill(zoo["resnet_legacy"], run, DistillConfig(**FAST, force=True), data_path=calib)


def test_cli_distill(zoo, calib, tmp_path, capsys):
    argv = ["distill", str(zoo["resnet_legacy"]), "--data", str(calib), "--run-dir", str(tmp_path / "r"),
            "--candidates", "width:0.5", "--steps", "5", "--batch", "8", "--jobs", "1"]
    assert main(argv) == 0
    assert "width:0.5" in capsys.readouterr().out
    assert main(["distill", str(zoo["resnet_legacy"]), "--run-dir", str(tmp_path / "r2")]) == 2
    assert capsys.readouterr().err == "ndonnx: error: give calibration data with --data FILE.npz, or use --data-free\n"
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((4, 3, 8, 8), np.float32))
    assert main(["distill", str(zoo["resnet_legacy"]), "--data", str(bad), "--run-dir", str(tmp_path / "r3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ndonnx: error:"), err  # one line, no traceback
    assert f"{bad}: 'input' has shape 4x3x8x8, the model expects Nx3x16x16" in err[0]
    assert not (tmp_path / "r3").exists()  # inputs are checked before the run directory is made


def test_sigkill_mid_run_then_resume(zoo, calib, tmp_path):
    """kill -9 while jobs run: the run directory stays consistent and a rerun keeps finished jobs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "ndonnx_cli", "distill", str(zoo["resnet_legacy"]), "--data", str(calib),
            "--run-dir", str(run), "--candidates", "width:0.5,lowrank:0.5", "--steps", "40",
            "--batch", "16", "--jobs", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((run / "done").glob("*.json")) if (run / "done").exists() else []) < 1:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.read_bytes() for p in (run / "done").glob("*.json")}
    assert finished, "no job finished before the kill"
    assert proc.returncode == -signal.SIGKILL
    for name in finished:  # every journalled job has its weights (written before the record)
        rec = json.loads(finished[name])
        if rec["weights"]:
            assert (run / "weights" / rec["weights"]).exists()
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name, data in finished.items():
        assert (run / "done" / name).read_bytes() == data  # not retrained
    rows = _rows(run)
    assert len(rows) == len(list((run / "done").glob("*.json")))


def test_parallel_workers_on_a_dynamo_export(zoo, tmp_path):
    """Worker processes start fresh: they must register ndonnx's converters (opset-18 ops) too."""
    rows = distill(zoo["resnet_dynamo"], tmp_path / "run",
                   DistillConfig(candidates="width:0.5,lowrank:0.5", steps=3, batch=8, jobs=2, data_free=True))
    assert "trained" in {r["status"] for r in rows} <= {"trained", "fitted", "frozen"}
    # the ReduceMean-18 head, trained or (fitted within the tolerance) evaluated in a worker
    assert any(r["neighbourhood"] == 4 and r["status"] in ("trained", "fitted") for r in rows)


def test_integer_boundary_outputs_are_not_in_the_loss():
    """An integer output (an index computed inside a neighbourhood) has no gradient and no variance
    to scale by: the loss and the held-out error compare the floating outputs only."""
    import torch

    from ndonnx.distill.job import _learnt, _loss

    out = [torch.tensor([[1.0, 2.0]], requires_grad=True), torch.tensor([3, 4])]
    want = [torch.tensor([[1.5, 2.0]]), torch.tensor([3, 5])]
    assert [t.dtype for _, t in _learnt(out, want)] == [torch.float32]
    loss = _loss(out, want, ["a", "b"], [], {}, [1.0])
    loss.backward()
    assert abs(loss.item() - 0.125) < 1e-7 and out[0].grad is not None


_FAULTS = """
import resource, sys
import numpy as np
from ndonnx.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(64 << 20, np.uint8)  # 64 MB: above glibc's largest mmap threshold
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_training_processes_keep_freed_memory():
    """With keep_freed_memory a freed 64 MB block is reused without page faults; without it (the
    control), every allocation faults its pages in again."""
    def run(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        applied, *faults = out.stdout.split()
        return applied, [int(f) for f in faults]

    applied, kept = run("keep")
    _, plain = run("plain")
    assert applied == "True"
    assert min(plain[1:]) > 8 and max(kept[1:]) <= max(2, plain[0] // 20), (kept, plain)


def test_fit_feeds_are_disjoint_evenly_spaced_and_capped_by_bytes(monkeypatch):
    """Students are fitted on some cached training samples and judged on others (`prepare.fit_feeds`):
    disjoint, spread over the training split, fewer when the neighbourhood's tensors are large."""
    from types import SimpleNamespace

    from onnx import TensorProto, helper

    from ndonnx.distill import prepare

    class Reader:
        arrays = {"x": None}
        shape_only: dict = {}
        train = np.arange(0, 2000, 2)  # 1,000 training samples

        def tensors(self, names, idx):
            return {"idx": np.asarray(idx)}

    sub = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])]))
    small = SimpleNamespace(values={"y": np.zeros((runner.SampleConfig.batch, 4), np.float32)})
    n = prepare.fit_samples(sub, small, len(Reader.train))
    fit, check = prepare.fit_feeds(Reader(), sub, n)
    assert (len(fit["idx"]), len(check["idx"])) == (prepare.FIT_SAMPLES, prepare.CHECK_SAMPLES)
    assert not set(fit["idx"]) & set(check["idx"]) and set(fit["idx"]) | set(check["idx"]) <= set(Reader.train)
    assert fit["idx"].min() < 100 and fit["idx"].max() > 1900 and check["idx"].max() > 1800  # spread
    monkeypatch.setattr(prepare, "FIT_BYTES", 64 * 16)  # 64 samples' worth of y
    fit, check = prepare.fit_feeds(Reader(), sub, prepare.fit_samples(sub, small, len(Reader.train)))
    assert len(fit["idx"]) + len(check["idx"]) == 64 and len(check["idx"]) >= 4
    assert prepare.fit_feeds(SimpleNamespace(arrays={}, shape_only={}), sub, n) is None  # x not cached
