"""Paying only for new work: training rules that stop a student when it stops improving, preparation
kept in the run directory, budgets refused before training, inputs checked before torch, the
sequential refit after search, and the divergence the search minimises."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from ndonnx.compress import CompressConfig, build, compress
from ndonnx.config import DistillConfig
from ndonnx.distill import prepare, runner
from ndonnx.distill.job import TrainSettings, _Run, _stop_dominated
from ndonnx.metrics import divergence
from ndonnx.sample import ort_session
from ndonnx.search import TargetUnreachable

FAST = DistillConfig(candidates="width:0.25,width:0.5,lowrank:0.5,identity,teacher", steps=20, batch=16, jobs=1)


# ---- the training rules, on scripted held-out curves (no training)

class _Student:
    trainable = ["w"]

    def named_weights(self):
        import torch

        return {"w": torch.nn.Parameter(torch.zeros(1))}


def _run(params: int = 10, sparsity=None, **settings) -> _Run:
    job = SimpleNamespace(train=True, sparsity=sparsity, params=params, candidate=f"c{params}")
    return _Run(job, _Student(), TrainSettings(**{"steps": 300, "min_steps": 50, "patience": 50, "min_gain": 0.1,
                                                  **settings}), 0.0)


def test_a_student_stops_when_its_error_stops_falling():
    r = _run()
    for step, err in [(0, 1.0), (25, 0.5), (50, 0.3), (75, 0.25), (100, 0.2)]:
        r.check(step, err)
        assert r.training, step  # fell by more than 10% over every 50 steps
    r.check(125, 0.195)  # 0.25 -> 0.195 over the last 50: still more than 10%
    assert r.training
    r.check(150, 0.19)  # 0.2 -> 0.19: 5%
    assert not r.training and r.stopped.startswith("converged") and r.best_step == 150


def test_no_stop_before_min_steps_nor_past_the_step_limit():
    r = _run(min_steps=100)
    for step in (0, 25, 50, 75):
        r.check(step, 1.0)  # flat, but before min_steps
    assert r.training
    r.check(100, 1.0)
    assert not r.training
    r = _run(steps=60)
    r.check(0, 1.0)
    r.check(50, 0.1)
    r.check(60, 0.01)
    assert r.stopped == "reached the step limit"


def test_min_gain_zero_never_converges_and_the_best_weights_are_kept():
    r = _run(min_gain=0.0)
    errs = [1.0, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    for k, err in enumerate(errs):
        r.check(25 * k, err)
    assert r.training and r.best == 0.5 and r.best_step == 25


def test_a_fitted_student_within_tolerance_is_not_trained():
    r = _run(fit_tolerance=1e-3)
    r.check(0, 5e-4)
    assert not r.training and not r.trained and "fitted within the tolerance" in r.stopped
    sparse = _run(fit_tolerance=1e-3, sparsity=0.8)  # a sparse student starts as the teacher: it must train
    sparse.check(0, 0.0)
    assert sparse.training


def test_dominated_students_stop_and_the_others_do_not():
    small, big, close = _run(params=10), _run(params=20), _run(params=30)
    for r, err in ((small, 0.1), (big, 0.25), (close, 0.15)):
        r.check(50, err)
    _stop_dominated([small, big, close])
    assert not big.training and "dominated: 2.5x" in big.stopped and "c10" in big.stopped
    assert small.training and close.training  # 1.5x: within the factor 2
    sparse = _run(params=20, sparsity=0.5)
    sparse.check(50, 1.0)
    _stop_dominated([small, sparse])
    assert sparse.training


def test_journal_records_how_each_student_trained(zoo, tmp_path, calib):
    rows = runner.distill(zoo["resnet_legacy"], tmp_path / "run", FAST, data_path=calib)
    trained = [r for r in rows if r["status"] in ("trained", "fitted")]
    assert trained
    for r in trained:
        t = r["training"]
        assert t["curve"][0][0] == 0 and t["steps"] <= FAST.steps and t["stopped"]
        assert t["rules"]["min_gain"] == FAST.min_gain and t["rules"]["steps"] == FAST.steps
        assert r["rel_mse"] <= min(e for _, e in t["curve"]) * 1.5 + 1e-6  # the best weights, on all held-out
    # the fitted families are fitted by their job, which writes the fitted student back
    assert any(r.get("fitted") for r in rows if r["candidate"].startswith(("width", "lowrank")))


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(path, input=rng.standard_normal((80, 3, 16, 16)).astype(np.float32), labels=rng.integers(0, 10, 80))
    return path


# ---- preparation kept in the run directory

def test_rerun_reads_the_preparation_and_new_candidates_rebuild_only_students(zoo, tmp_path, calib, monkeypatch):
    run = tmp_path / "run"
    runner.distill(zoo["resnet_legacy"], run, FAST, data_path=calib)
    records = sorted((run / "prepared").glob("*.json"))
    assert records and all(json.loads(p.read_text())["format"] == prepare.FORMAT for p in records)
    monkeypatch.setattr(prepare, "prepare", lambda *a, **k: pytest.fail("prepared again"))
    monkeypatch.setattr(runner, "run_sample", lambda *a, **k: pytest.fail("sample run again"))
    runner.distill(zoo["resnet_legacy"], run, FAST, data_path=calib)
    monkeypatch.undo()

    import ndonnx.convert

    monkeypatch.setattr(ndonnx.convert, "round_trip", lambda *a, **k: pytest.fail("round trip again"))
    more = DistillConfig(**{**FAST.__dict__, "candidates": FAST.candidates + ",width:0.75"})
    rows = runner.distill(zoo["resnet_legacy"], run, more, data_path=calib)
    assert any(r["candidate"] == "width:0.75" for r in rows)


def test_a_cut_short_record_is_made_again(zoo, tmp_path, calib):
    run = tmp_path / "run"
    runner.distill(zoo["resnet_legacy"], run, FAST, data_path=calib)
    path = run / "prepared" / "1.json"
    path.write_text(path.read_text()[:20])
    assert prepare.load(runner.Layout(run), 1) is None
    runner.distill(zoo["resnet_legacy"], run, FAST, data_path=calib)
    assert prepare.load(runner.Layout(run), 1) is not None


# ---- budgets and inputs checked first

def test_unreachable_budget_refused_before_any_training(zoo, tmp_path, calib, monkeypatch):
    monkeypatch.setattr(runner, "run_group", lambda jobs: pytest.fail("trained for a budget it cannot meet"))
    cfg = CompressConfig(distill=DistillConfig(**{**FAST.__dict__, "jobs": 1}), target="1%")
    with pytest.raises(TargetUnreachable) as e:
        compress(zoo["resnet_legacy"], tmp_path / "run", cfg, data_path=calib, output=tmp_path / "s.onnx")
    assert e.value.exit_code == 1 and "cannot be met" in str(e.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "s.onnx").exists()  # nothing left behind


@pytest.mark.parametrize("argv", [
    ["compress", "missing.onnx", "--data", "x.npz"],
    ["compress", "{model}", "--data", "missing.npz"],
    ["compress", "{model}", "--data", "x.npz", "--target-params", "0"],
])
def test_bad_input_found_before_torch_is_imported(zoo, tmp_path, argv):
    argv = [a.replace("{model}", str(zoo["resnet_legacy"])) for a in argv]
    code = ("import sys\nfrom ndonnx_cli.main import main\ncode = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nsys.exit(code)")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("ndonnx: error:") and len(r.stderr.strip().splitlines()) == 1


def test_a_learning_rate_of_zero_is_a_usage_error(zoo, tmp_path):
    np.savez(tmp_path / "x.npz", input=np.zeros((4, 3, 16, 16), np.float32))
    r = subprocess.run([sys.executable, "-m", "ndonnx_cli", "compress", str(zoo["resnet_legacy"]), "--data", "x.npz",
                        "--finetune-lr", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "ndonnx: error: --finetune-lr must be > 0, got 0.0", r.stderr


# ---- the sequential refit after search

@pytest.fixture(scope="module")
def done(zoo, tmp_path_factory):
    d = tmp_path_factory.mktemp("refit")
    teacher = d / "teacher.onnx"
    shutil.copy(zoo["resnet_legacy"], teacher)
    x = np.random.default_rng(1).standard_normal((120, 3, 16, 16)).astype(np.float32)
    np.savez(d / "calib.npz", input=x)
    compress(teacher, d / "run", CompressConfig(distill=FAST, target="60%", refit_steps=0), data_path=d / "calib.npz")
    return d


def test_refit_in_order_keeps_only_what_comes_closer(done, tmp_path):
    plain = build(done / "run", CompressConfig(target="45%", refit_steps=0), tmp_path / "a.onnx")
    refit = build(done / "run", CompressConfig(target="45%", refit_steps=30, refit_samples=64), tmp_path / "b.onnx")
    assert plain["refit"] is None
    rows = refit["refit"]["neighbourhoods"]
    chosen = [r for r in plain["neighbourhoods"] if r["candidate"] != "teacher"]
    assert [r["id"] for r in rows] == [r["id"] for r in chosen]  # every chosen student, in order
    assert all(r["kept"] == (r["rel_mse_after"] < r["rel_mse_before"]) for r in rows)
    assert refit["refit"]["samples"] == 64 and "refit" in refit["timings"]
    assert set(refit["cpu_seconds"]) == set(refit["timings"]) and all(v >= 0 for v in refit["cpu_seconds"].values())
    # same choice, same parameters: only weights changed, and only where the held-out error fell
    assert refit["params_student"] == plain["params_student"]
    a, b = (onnx.load(str(tmp_path / f)) for f in ("a.onnx", "b.onnx"))
    changed = {i.name for i, j in zip(a.graph.initializer, b.graph.initializer) if i.raw_data != j.raw_data}
    assert bool(changed) == any(r["kept"] for r in rows)


# ---- what the search minimises

def test_divergence_is_zero_for_the_teacher_and_continuous():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 10)).astype(np.float32)
    assert divergence([logits], [logits]) == pytest.approx(0.0, abs=1e-9)
    small, large = (divergence([logits + e * rng.standard_normal(logits.shape)], [logits]) for e in (0.01, 0.5))
    assert 0 < small < large
    # a change that moves no argmax moves the divergence anyway (accuracy would not see it)
    assert divergence([logits * 1.1], [logits]) > 0 and (logits * 1.1).argmax(-1).tolist() == logits.argmax(-1).tolist()
    emb = rng.standard_normal((20, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert divergence([emb], [emb]) == pytest.approx(0.0, abs=1e-9) and divergence([-emb], [emb]) == pytest.approx(2.0)
    y = rng.standard_normal((5, 3, 4))
    assert divergence([y * 0.9], [y]) == pytest.approx(0.1, rel=1e-6)  # the relative error


def test_search_report_has_the_divergences(done, tmp_path):
    r = build(done / "run", CompressConfig(target="50%", refit_steps=0), tmp_path / "c.onnx")
    s = r["search"]
    assert s["composed_divergence"] >= 0 and s["predicted_divergence"] >= 0
    assert all("loss" in p for p in s["pareto"])
    assert ort_session(onnx.load(str(tmp_path / "c.onnx"))) is not None
