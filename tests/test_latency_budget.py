"""The latency budget (--target-latency): parsing, the modelled latency, the search under it with
scripted timings, the timing cache in the run directory, the CLI's refusals, and one compress end to
end. Nothing here asserts on a measured time: latency is noisy, so timed figures are only checked
to exist and be positive."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import models
from ndonnx import latency as latency_mod
from ndonnx.compress import open_run
from ndonnx.errors import NdonnxError
from ndonnx.latency import LatencyModel, TimingCache, measure, parse_latency
from ndonnx.search import Option, TargetUnreachable, latency_budget, params_budget, search
from ndonnx.distill.layout import Layout
from ndonnx.sample import ort_session
from ndonnx_cli.main import main
from test_search import ScriptedScorer


def test_parse_latency():
    assert parse_latency("60%") == ("fraction", 0.6)
    assert parse_latency("100%") == ("fraction", 1.0)
    assert parse_latency("3ms")[0] == "seconds" and parse_latency("3ms")[1] == pytest.approx(3e-3)
    assert parse_latency("0.5 s")[1] == pytest.approx(0.5) and parse_latency("800us")[1] == pytest.approx(8e-4)
    for bad in ("0", "0%", "0ms", "abc", "150%", "-5ms", "3", "60", "3 fortnights", ""):
        with pytest.raises(NdonnxError, match="--target-latency"):
            parse_latency(bad)


def test_modelled_latency():
    # pieces 1 + 4 ms of a 5.5 ms teacher: 0.5 ms outside, constant
    m = LatencyModel(32, 1, teacher=5.5e-3, pieces={0: 1e-3, 1: 4e-3}, ratios={(0, "half"): 0.9, (1, "half"): 0.5})
    assert m.outside == pytest.approx(0.5e-3) and m.scale == 1.0
    assert m.predict({0: "teacher", 1: "teacher"}) == pytest.approx(5.5e-3)
    assert m.predict({1: "half"}) == pytest.approx(5.5e-3 - 2e-3)
    assert m.predict({0: "half", 1: "half"}) == pytest.approx(0.5e-3 + 0.9e-3 + 2e-3)
    # pieces adding up to more than the whole (each session's own overhead): scaled down, nothing outside
    over = LatencyModel(32, 1, teacher=4e-3, pieces={0: 1e-3, 1: 4e-3}, ratios={(1, "half"): 0.5})
    assert over.outside == 0.0 and over.scale == pytest.approx(0.8)
    assert over.predict({}) == pytest.approx(4e-3) and over.predict({1: "half"}) == pytest.approx(4e-3 - 1.6e-3)
    # every node in a neighbourhood: the gap is no node's time, the pieces are scaled up to the whole
    inside = LatencyModel(32, 1, teacher=5.5e-3, pieces={0: 1e-3, 1: 4e-3}, ratios={(1, "half"): 0.5},
                          has_outside=False)
    assert inside.outside == pytest.approx(0.0) and inside.scale == pytest.approx(1.1)
    assert inside.predict({}) == pytest.approx(5.5e-3) and inside.predict({1: "half"}) == pytest.approx(5.5e-3 - 2.2e-3)


def _two_neighbourhoods():
    """Neighbourhood 0 holds the parameters (1000) but 1 ms; neighbourhood 1 holds 100 parameters but
    4 ms. Each has a `half` candidate at half its parameters; 1 also a `lowrank` that scores best but
    runs slower than the teacher's piece."""
    scorer = ScriptedScorer(single={0: 0.02, 1: 0.02}, composed_cost={0: 0.02, 1: 0.02})
    scorer.teacher.params = 1100
    scorer.part.neighbourhoods = scorer.part.neighbourhoods[:2]
    scorer.part.neighbourhoods[0].params, scorer.part.neighbourhoods[1].params = 1000, 100
    scorer.single = lambda o: (1.0, 0.0) if o.candidate in ("teacher", "lowrank") else (0.98, 0.02)
    options = {0: [Option(0, "teacher", 1000, 0.0), Option(0, "half", 500, 0.1)],
               1: [Option(1, "teacher", 100, 0.0), Option(1, "half", 50, 0.1), Option(1, "lowrank", 60, 0.0)]}
    model = LatencyModel(32, 1, teacher=5.5e-3, pieces={0: 1e-3, 1: 4e-3},
                         ratios={(0, "half"): 0.9, (1, "half"): 0.5, (1, "lowrank"): 1.2})
    return scorer, options, model


def test_search_spends_where_the_time_is():
    scorer, options, model = _two_neighbourhoods()
    by_params = search(scorer, options, target=880, budget=params_budget(1100, scorer.part))
    assert {n: o.candidate for n, o in by_params.choice.items()} == {0: "half", 1: "teacher"}

    scorer, options, model = _two_neighbourhoods()
    budget = latency_budget(model, options)
    assert [o.latency for o in options[1]] == pytest.approx([4e-3, 2e-3, 4.8e-3])
    result = search(scorer, options, target=0.8 * model.teacher, budget=budget)
    choice = {n: o.candidate for n, o in result.choice.items()}
    assert choice == {0: "teacher", 1: "half"}  # saves 2 ms; neighbourhood 0's half would save 0.1 ms
    assert budget.total(result.choice) == pytest.approx(model.predict(choice)) == pytest.approx(3.5e-3)
    # slower than the teacher's piece: never taken, even though it scores best
    scorer, options, model = _two_neighbourhoods()
    result = search(scorer, options, target=model.teacher, budget=latency_budget(model, options))
    assert all(o.candidate == "teacher" for o in result.choice.values())


def test_unreachable_latency_says_milliseconds():
    scorer, options, model = _two_neighbourhoods()
    with pytest.raises(TargetUnreachable) as e:
        search(scorer, options, target=1e-3, budget=latency_budget(model, options))
    msg = str(e.value)
    assert "1.000 ms latency (modelled) cannot be met" in msg and "has 3.400 ms" in msg  # 0.5 outside + 0.9 + 2
    assert e.value.exit_code == 1


# ---- a tiny run directory, compressed once under a latency budget (real timings, nothing asserted on them)

STEPS = ["--candidates", "width:0.5,identity,teacher", "--steps", "10", "--batch", "16", "--jobs", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("latency")
    teacher = models.tiny_resnet(d / "teacher.onnx")
    x = np.random.default_rng(0).standard_normal((60, 3, 16, 16)).astype(np.float32)
    labels = ort_session(onnx.load(str(teacher))).run(None, {"input": x})[0].argmax(-1)
    np.savez(d / "calib.npz", input=x, labels=labels)
    report_path = d / "report.json"
    code = main(["compress", str(teacher), "--data", str(d / "calib.npz"), "--labels", "labels", "--run-dir",
                 str(d / "run"), *STEPS, "--target-latency", "80%", "--latency-batch", "4", "--finetune-steps", "3",
                 "--report", str(report_path)])
    return d, teacher, code, report_path


def test_compress_reports_modelled_and_measured_latency(run):
    d, _, code, report_path = run
    assert code == 0
    r = json.loads(report_path.read_text())
    assert r["target_latency"] == "80%" and Path(r["output"]).name == "teacher.ndonnx-80pct-latency.onnx"
    lat = r["latency"]
    assert lat["batch"] == 4 and lat["threads"] == 1 and lat["onnxruntime"]
    assert lat["target_ratio"] == pytest.approx(0.8)
    assert lat["predicted_ratio"] <= 0.8 + 1e-9  # the search met the modelled budget
    for key in ("teacher_ms", "student_ms", "measured_ratio", "predicted_ms", "teacher_ms_modelled"):
        assert math.isfinite(lat[key]) and lat[key] > 0, key
    assert lat["options_timed"] > 0
    rows = r["neighbourhoods"]
    assert all(n["teacher_ms"] > 0 and n["student_ms"] >= 0 for n in rows)
    assert sum(n["student_ms"] for n in rows) + lat["outside_ms"] == pytest.approx(lat["predicted_ms"])
    assert sum(n["teacher_ms"] for n in rows) + lat["outside_ms"] == pytest.approx(lat["teacher_ms_modelled"])
    settings = json.loads({p.key: p.value for p in onnx.load(r["output"]).metadata_props}["ndonnx.settings"])
    assert settings["target_latency"] == "80%" and settings["latency_batch"] == 4
    cache = json.loads(Layout(d / "run").latency_json.read_text())
    assert all("batch=4|threads=1|onnxruntime=" in k for k in cache["entries"])


class CountingTimer:
    """Scripted seconds (from the model's size) and a record of every timing asked for."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, models, feeds, threads):
        self.calls.append(len(models))
        for m, f in zip(models, feeds):  # the feeds fit the models they are for
            assert [i.name for i in m.graph.input if i.name in f] == list(f) and len(f) > 0
        return [1e-4 + 1e-9 * sum(int(np.prod(i.dims)) for i in m.graph.initializer) for m in models]


def test_timing_cache_reused_and_invalidated(run, tmp_path, monkeypatch):
    d = run[0]
    shutil.copytree(d / "run", tmp_path / "run")  # its files are changed below
    opened = open_run(tmp_path / "run")
    timer = CountingTimer()
    layout = Layout(tmp_path / "run")
    students = sum(1 for opts in opened.options.values() for o in opts
                   if o.candidate != "teacher" and layout.teacher(o.neighbourhood).exists())
    assert students > 0
    first = measure(opened, batch=7, threads=1, timer=timer)  # a batch the compress did not time
    assert timer.calls == [1 + len(first.pieces)] + [2] * students  # the profile, then each option with its piece
    assert first.timed == students
    again = measure(open_run(tmp_path / "run"), batch=7, threads=1, timer=timer)
    assert len(timer.calls) == 1 + students and again.timed == 0  # all from the cache
    assert again.ratios == first.ratios and again.teacher == first.teacher
    # another thread count: all timed again; the batch-7 entries stay beside the new ones
    measure(opened, batch=7, threads=2, timer=timer)
    assert len(timer.calls) == 2 * (1 + students)
    # one student file changed: only that option is timed again
    nid, cand = next((o.neighbourhood, o.candidate) for opts in opened.options.values() for o in opts
                     if o.candidate != "teacher" and layout.teacher(o.neighbourhood).exists())
    path = layout.student(nid, cand)
    m = onnx.load(str(path))
    m.doc_string = "changed"
    onnx.save(m, str(path))
    before = len(timer.calls)
    changed = measure(opened, batch=7, threads=1, timer=timer)
    assert timer.calls[before:] == [2] and changed.timed == 1
    # another onnxruntime: everything timed again
    monkeypatch.setattr(latency_mod, "ort_version", lambda: "0.0-other")
    measure(opened, batch=7, threads=1, timer=timer)
    assert len(timer.calls) == before + 1 + 1 + students
    # another CPU (the run directory copied to another machine): everything timed again
    here = latency_mod.cpu_id()
    monkeypatch.setattr(latency_mod, "cpu_id", lambda: "Other CPU x64")
    measure(opened, batch=7, threads=1, timer=timer)
    assert len(timer.calls) == before + 1 + 2 * (1 + students)
    keys = TimingCache(layout.latency_json).entries
    assert any("onnxruntime=0.0-other" in k for k in keys) and any("threads=2" in k for k in keys)
    assert any("|cpu=Other CPU x64|" in k for k in keys) and any(f"|cpu={here}|" in k for k in keys)


def test_search_reuses_the_timings(run, tmp_path, monkeypatch):
    """A search at the compress's batch and threads times no option again (only the final check)."""
    d = run[0]
    monkeypatch.setattr(latency_mod, "time_alternately", lambda *a, **k: pytest.fail("option timed again"))
    monkeypatch.setattr("ndonnx.validate._latency_ratio", lambda *a: 1.0)  # validation's own timing, not an option's
    calls = []
    monkeypatch.setattr("ndonnx.compress.measure_pair", lambda *a, **k: calls.append(1) or (1e-3, 2e-3))
    report = tmp_path / "r.json"
    assert main(["search", str(d / "run"), "--target-latency", "90%", "--latency-batch", "4", "-o",
                 str(tmp_path / "s.onnx"), "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert calls == [1] and r["latency"]["options_timed"] == 0 and r["latency"]["measured_ratio"] == 0.5


@pytest.mark.parametrize("argv,says", [
    (["--target-latency", "0"], "--target-latency '0'"),
    (["--target-latency", "0%"], "a percentage must be in (0, 100]"),
    (["--target-latency", "abc"], "--target-latency 'abc'"),
    (["--target-latency", "150%"], "a percentage must be in (0, 100]"),
    (["--target-latency=-2ms"], "--target-latency '-2ms'"),
    (["--target-latency", "60%", "--target-params", "50%"], "--target-latency and --target-params"),
    (["--target-latency", "60%", "--target-macs", "50%"], "--target-latency and --target-macs"),
    (["--target-latency", "60%", "--latency-batch", "0"], "--latency-batch and --threads must be >= 1"),
    (["--target-latency", "60%", "--threads", "0"], "--latency-batch and --threads must be >= 1"),
])
def test_cli_refusals(run, tmp_path, capsys, argv, says):
    d, teacher = run[:2]
    out = tmp_path / "x.onnx"
    assert main(["search", str(d / "run"), *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ndonnx: error:") and says in err[0], err
    assert not out.exists()
    assert main(["compress", str(teacher), "--data", str(d / "calib.npz"), "--run-dir", str(tmp_path / "r"), *argv,
                 "-o", str(out)]) == 2
    assert says in capsys.readouterr().err and not (tmp_path / "r").exists()  # refused before any work


def test_unreachable_latency_exit_1(run, tmp_path, capsys):
    d = run[0]
    out = tmp_path / "none.onnx"
    assert main(["search", str(d / "run"), "--target-latency", "1us", "--latency-batch", "4", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "cannot be met" in err and "latency (modelled)" in err and not out.exists()


def test_validate_reports_latency(run, capsys):
    d, teacher, _, report_path = run
    student = json.loads(report_path.read_text())["output"]
    assert main(["validate", student, "--reference", str(teacher), "--data", str(d / "calib.npz"),
                 "--latency-batch", "5", "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["latency_batch"] == 5 and v["latency_threads"] == 1
    assert v["latency_teacher_ms"] > 0 and v["latency_student_ms"] > 0 and v["latency_measured_ratio"] > 0


def test_validate_latency_fixed_batch():
    """A model whose batch is fixed is timed at that batch, and the report says so."""
    from types import SimpleNamespace

    from onnx import TensorProto, helper

    from ndonnx.latency import validate_latency

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = SimpleNamespace(model=helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
                            input_names=["x"])
    seen = []
    timer = lambda models, feeds, threads: seen.append(feeds[0]["x"].shape) or [2e-3, 4e-3]  # noqa: E731
    v = validate_latency(model, model, {"x": np.ones((10, 3), np.float32)}, batch=32, timer=timer)
    assert seen == [(1, 3)] and v["latency_batch"] == 1 and "fixed batch of 1" in v["latency_note"]
    assert v["latency_measured_ratio"] == pytest.approx(0.5) and v["latency_teacher_ms"] == pytest.approx(4.0)
