"""compress / search / validate end to end on tiny teachers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from ndonnx.compress import CompressConfig, build, compress, default_output
from ndonnx.config import DistillConfig
from ndonnx.distill import runner
from ndonnx.errors import NdonnxError
from ndonnx.search import parse_target
from ndonnx.sample import ort_session
from ndonnx_cli.main import main

DCFG = DistillConfig(candidates="width:0.25,width:0.5,identity,teacher", steps=20, batch=16, jobs=1)


@pytest.fixture(scope="module")
def done(zoo, tmp_path_factory):
    """One distilled run of the tiny ResNet (with labels), shared by the tests below."""
    d = tmp_path_factory.mktemp("compress")
    teacher = d / "teacher.onnx"
    shutil.copy(zoo["resnet_legacy"], teacher)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 3, 16, 16)).astype(np.float32)
    labels = ort_session(onnx.load(str(teacher))).run(None, {"input": x})[0].argmax(-1)
    np.savez(d / "calib.npz", input=x, labels=labels)
    report = compress(teacher, d / "run", CompressConfig(distill=DistillConfig(**{**DCFG.__dict__, "labels": "labels"}),
                                                         target="70%"), data_path=d / "calib.npz")
    return d, teacher, report


def test_parse_target():
    assert parse_target("18M", 0) == 18_000_000 and parse_target("250K", 0) == 250_000
    assert parse_target("1.5e6", 0) == 1_500_000 and parse_target("60%", 1000) == 600
    for bad in ("abc", "0%", "150%", "-5"):
        with pytest.raises(NdonnxError):
            parse_target(bad, 1000)


def test_target_met_and_interface_kept(done):
    d, teacher, report = done
    out = d / "teacher.ndonnx-70pct.onnx"
    assert out.exists() and report["output"] == str(out)
    assert report["params_student"] <= int(0.7 * report["params_teacher"])
    s, t = onnx.load(str(out)), onnx.load(str(teacher))
    onnx.checker.check_model(s, full_check=True)
    assert [(i.name, i.type) for i in s.graph.input] == [(i.name, i.type) for i in t.graph.input]
    assert [(o.name, o.type) for o in s.graph.output] == [(o.name, o.type) for o in t.graph.output]
    counted = sum(int(np.prod(i.dims)) for i in s.graph.initializer if np.prod(i.dims) > 1)
    assert counted == report["params_student"] == report["validation"]["params_student"]
    meta = {p.key: p.value for p in s.metadata_props}
    assert "ndonnx.version" in meta and json.loads(meta["ndonnx.choices"])
    assert report["validation"]["torch_rel_err"] < 1e-4
    assert report["metric"] == "accuracy"


def test_generous_budget_keeps_agreement(done, tmp_path):
    d, teacher, _ = done
    report = build(d / "run", CompressConfig(target="95%", eval_data=str(d / "calib.npz")), tmp_path / "big.onnx")
    v = report["validation"]
    assert v["top1_agreement"] >= 0.99 and v["samples"] == 120 and v["accuracy_teacher"] == 1.0


def test_search_trains_nothing_and_meets_a_new_target(done, tmp_path, monkeypatch):
    d, teacher, _ = done
    monkeypatch.setattr(runner, "run_group", lambda jobs: pytest.fail("search must not train"))
    out = tmp_path / "small.onnx"
    assert main(["search", str(d / "run"), "--target-params", "55%", "-o", str(out), "--report", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["params_student"] <= int(0.55 * r["params_teacher"]) and out.exists()


def test_unreachable_target_exit_1_no_file(done, tmp_path, capsys):
    d, teacher, _ = done
    out = tmp_path / "none.onnx"
    assert main(["search", str(d / "run"), "--target-params", "100", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "cannot be met" in err and "smallest model reachable" in err and not out.exists()


def _threshold_picks(scores: dict, limit: float) -> dict[str, str]:
    """The threshold rule, from scores.json: per neighbourhood the smallest candidate whose partial
    model drops at most `limit` below the teacher (the teacher itself always qualifies)."""
    by: dict[int, list[dict]] = {}
    for r in scores["rows"]:
        by.setdefault(r["neighbourhood"], []).append(r)
    ok = lambda r: r["candidate"] == "teacher" or scores["teacher"] - r["score"] <= limit
    return {str(nid): min((r for r in rows if ok(r)), key=lambda r: r["params"])["candidate"]
            for nid, rows in sorted(by.items())}


def test_threshold_strategy_and_max_drop(done, tmp_path):
    d, teacher, _ = done
    scores = json.loads((d / "run" / "scores.json").read_text())  # the partial-model scores the search uses
    drops = sorted({scores["teacher"] - r["score"] for r in scores["rows"] if r["candidate"] != "teacher"})
    assert drops[-1] > 0  # some candidate costs score: a limit below it must leave that one out
    limits = sorted({0.0, *(x for D in drops if D > 0 for x in (D - 1e-6, D))})
    picks = {}
    for limit in limits:
        r = build(d / "run", CompressConfig(target="100%", strategy="threshold", max_drop=limit),
                  tmp_path / f"t{limit}.onnx")
        want = _threshold_picks(scores, limit)
        start = r["search"]["pareto"][0]  # the first choice, before any growing back (the fewest params)
        assert start["choices"] == want, (limit, start, scores)
        assert start["params"] == min(p["params"] for p in r["search"]["pareto"])
        final = {str(n["id"]): n["candidate"] for n in r["neighbourhoods"]}
        v = r["validation"]
        assert v["score_teacher"] - v["score_student"] <= limit + 1e-9  # grown back until within --max-drop
        if scores["teacher"] - start["score"] <= limit + 1e-9:
            assert final == want and r["params_student"] == start["params"]  # nothing to grow back
        picks[limit] = tuple(want.values())
    assert len(set(picks.values())) > 1, picks  # the limit decides: a looser one picks smaller candidates
    assert main(["search", str(d / "run"), "--target-params", "40%", "--max-drop", "-1", "-o", str(tmp_path / "x.onnx")]) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_finetune_does_not_worsen_its_loss(done, tmp_path):
    d, teacher, _ = done
    r = build(d / "run", CompressConfig(target="45%", finetune_steps=30), tmp_path / "ft.onnx")
    ft = r["finetune"]
    assert ft["steps"] == 30 and ft["held_out_loss_after"] <= ft["held_out_loss_before"] + 1e-6
    plain = build(d / "run", CompressConfig(target="45%"), tmp_path / "plain.onnx")  # the same student, untuned
    assert ft["score_before"] == plain["validation"]["score_student"]
    assert r["validation"]["torch_rel_err"] < 1e-4


def test_same_seed_same_student(done, tmp_path):
    d, teacher, _ = done
    a = build(d / "run", CompressConfig(target="60%"), tmp_path / "a.onnx")
    b = build(d / "run", CompressConfig(target="60%"), tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert a["neighbourhoods"] == b["neighbourhoods"]


def test_teacher_never_overwritten(done, capsys):
    d, teacher, _ = done
    before = teacher.read_bytes()
    assert main(["search", str(d / "run"), "--target-params", "60%", "-o", str(teacher)]) == 2
    assert teacher.read_bytes() == before
    assert main(["compress", str(teacher), "--target-params", "lots", "--data-free"]) == 2
    assert main(["compress"]) == 2 and "ndonnx compress models/" in capsys.readouterr().err


def test_validate_command(done, tmp_path, capsys):
    """The figures `ndonnx validate` prints are those of both models run in onnxruntime here."""
    import onnxruntime as ort

    d, teacher, _ = done
    student = d / "teacher.ndonnx-70pct.onnx"
    x = np.load(d / "calib.npz")["input"]
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    s_out, t_out = run(student), run(teacher)
    labels = (t_out.argmax(-1) + (np.arange(len(x)) % 3 == 0)) % 10  # labels the teacher gets two thirds right
    data = tmp_path / "eval.npz"
    np.savez(data, input=x, labels=labels)
    assert main(["validate", str(student), "--reference", str(teacher), "--data", str(data), "--labels", "labels",
                 "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    agreement = float((s_out.argmax(-1) == t_out.argmax(-1)).mean())
    acc_s, acc_t = float((s_out.argmax(-1) == labels).mean()), float((t_out.argmax(-1) == labels).mean())
    assert v["samples"] == 120 and v["metric"] == "accuracy"
    assert v["top1_agreement"] == pytest.approx(agreement, abs=1e-12)
    assert v["accuracy_teacher"] == pytest.approx(acc_t, abs=1e-12) and acc_t == pytest.approx(80 / 120)
    assert v["accuracy_student"] == pytest.approx(acc_s, abs=1e-12) == v["score_student"]
    assert v["score_teacher"] == v["accuracy_teacher"]
    diff = s_out.astype(np.float64) - t_out
    assert v["max_abs_err"] == pytest.approx(np.abs(diff).max(), rel=1e-6)
    assert v["rel_err"] == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(t_out), rel=1e-6)
    assert v["params_student"] == sum(int(np.prod(i.dims)) for i in onnx.load(str(student)).graph.initializer
                                      if np.prod(i.dims) > 1)


def test_params_exact_with_tied_weights(zoo, tmp_path):
    """The encoder's layers share LayerNorm weights (outside params): the reported count must be
    the count of the written file, whichever candidates are chosen."""
    cfg = CompressConfig(distill=DistillConfig(candidates="width:0.5,teacher", steps=3, batch=8, jobs=1,
                                               data_free=True), target="85%")
    r = compress(zoo["encoder"], tmp_path / "run", cfg, output=tmp_path / "enc.onnx")
    assert r["params_student"] == r["validation"]["params_student"] <= int(0.85 * r["params_teacher"])
    assert any(n["candidate"] == "teacher" for n in r["neighbourhoods"])
    assert any(n["candidate"] != "teacher" for n in r["neighbourhoods"])
    for t in (0.97, 0.9):
        b = build(tmp_path / "run", CompressConfig(target=f"{int(t * 100)}%"), tmp_path / f"e{t}.onnx")
        assert b["params_student"] == b["validation"]["params_student"]


def test_sensitivity_tolerances_drive_threshold_search(done, tmp_path, capsys):
    d, teacher, _ = done
    assert main(["sensitivity", str(teacher), "--data", str(d / "calib.npz"), "--eps", "0.1,0.3,1", "--json"]) == 0
    sens = tmp_path / "sens.json"
    sens.write_text(capsys.readouterr().out)
    tol = {n["neighbourhood"]: n["threshold"] or 0.0 for n in json.loads(sens.read_text())["neighbourhoods"]}
    r = build(d / "run", CompressConfig(target="100%", strategy="threshold", tolerances=str(sens)), tmp_path / "t.onnx")
    changed = [n for n in r["neighbourhoods"] if n["candidate"] != "teacher"]
    assert all(n["rel_mse"] <= tol[n["id"]] ** 2 for n in changed)
    # and every neighbourhood left as the teacher had no candidate within its tolerance
    rows = json.loads((d / "run" / "candidates.json").read_text())
    for n in r["neighbourhoods"]:
        if n["candidate"] == "teacher":
            assert not [c for c in rows if c["neighbourhood"] == n["id"] and c["candidate"] != "teacher"
                        and c["params"] < n["teacher_params"] and c["rel_mse"] <= tol[n["id"]] ** 2]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"neighbourhoods": [{"neighbourhood": 0, "threshold": 0.1}]}))
    assert main(["search", str(d / "run"), "--strategy", "threshold", "--tolerances", str(bad), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "another partition" in capsys.readouterr().err


def test_search_from_another_folder(done, tmp_path, monkeypatch):
    """run.json names the teacher by an absolute path; a run written by an older version (relative
    to where it ran) is found beside its run directory, so `search` works from any folder."""
    d, teacher, _ = done
    monkeypatch.chdir(d)
    runner._open_run_dir(tmp_path / "new", runner.load_teacher("teacher.onnx"), DCFG)
    assert Path(json.loads((tmp_path / "new" / "run.json").read_text())["teacher"]) == (d / "teacher.onnx").resolve()
    old = tmp_path / "copy" / "run"
    shutil.copytree(d / "run", old)
    shutil.copy(teacher, old.parent / "teacher.onnx")
    meta = json.loads((old / "run.json").read_text())
    (old / "run.json").write_text(json.dumps({**meta, "teacher": "teacher.onnx"}))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "elsewhere.onnx"
    assert main(["search", str(old), "--target-params", "70%", "-o", str(out)]) == 0 and out.exists()


def test_failed_compress_changes_nothing(done, tmp_path, monkeypatch, capsys):
    """Every input is checked before the run directory is touched; a directory the failed command
    made itself is removed."""
    d, teacher, _ = done
    before = {p: p.read_bytes() for p in (d / "run").glob("*.json")}
    (tmp_path / "notes.md").write_text("# not data\n")
    base = ["compress", str(teacher), "--labels", "labels", "--candidates", DCFG.candidates, "--steps", "20",
            "--batch", "16", "--jobs", "1"]
    cases = [(["--data", str(tmp_path / "nope.npz")], "no such data file"),
             (["--data", str(tmp_path / "notes.md")], "not an .npz file"),
             (["--data", str(d / "calib.npz"), "--eval-data", str(tmp_path / "nope.npz")], "no such data file"),
             (["--data", str(d / "calib.npz"), "--strategy", "threshold", "--tolerances", str(tmp_path / "notes.md")],
              "not the JSON of `ndonnx sensitivity"),
             (["--data", str(d / "calib.npz"), "-o", str(teacher.with_name("teacher.ndonnx-70pct.onnx"))], "exists")]
    for extra, says in cases:
        for run_dir in (d / "run", tmp_path / "new"):
            assert main(base + extra + ["--run-dir", str(run_dir)]) == 2, extra
            assert says in capsys.readouterr().err
        assert {p: p.read_bytes() for p in (d / "run").glob("*.json")} == before
        assert not (tmp_path / "new").exists()
    # a failure after the directory was made: it goes, as nothing in it is worth keeping
    monkeypatch.setattr(runner, "build_cache", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        compress(teacher, tmp_path / "new", CompressConfig(distill=DCFG), data_path=d / "calib.npz",
                 output=tmp_path / "x.onnx")
    assert not (tmp_path / "new").exists()


def test_reuse_is_announced(done, caplog):
    d, teacher, _ = done
    cfg = DistillConfig(**{**DCFG.__dict__, "labels": "labels"})
    with caplog.at_level("INFO", logger="ndonnx"):
        rows = runner.distill(teacher, d / "run", cfg, data_path=d / "calib.npz")
    n = len([r for r in rows if r["reason"] is None])
    assert f"{n} of {n} jobs done" in caplog.text


def test_outputs_named_per_budget_never_overwritten(done, tmp_path):
    d, teacher, _ = done
    first = build(d / "run", CompressConfig(target="65%"), None)
    out = d / "teacher.ndonnx-65pct.onnx"
    assert first["output"] == str(out) and out.exists()
    out.write_bytes(b"mine")
    with pytest.raises(NdonnxError, match="exists; pass --force"):
        build(d / "run", CompressConfig(target="65%"), None)
    assert out.read_bytes() == b"mine"
    build(d / "run", CompressConfig(target="65%", force=True), None)
    assert onnx.load(str(out)).graph.node
    assert build(d / "run", CompressConfig(target="5000"), tmp_path / "n.onnx")["output"] == str(tmp_path / "n.onnx")
    assert [default_output(teacher, t).name for t in ("18M", "1.5e6")] == ["teacher.ndonnx-18M.onnx",
                                                                           "teacher.ndonnx-1.5e6.onnx"]


def test_threshold_search_keeps_to_the_target(done, tmp_path):
    """Tolerances that let every candidate in pick the smallest of each; where the whole then drops
    more than max-drop, neighbourhoods grow back, never past the target, and a shortfall is a warning."""
    d, teacher, _ = done
    rows = [{"neighbourhood": n["id"], "threshold": 10.0} for n in done[2]["neighbourhoods"]]
    loose = tmp_path / "loose.json"
    loose.write_text(json.dumps({"neighbourhoods": rows, "max_drop": 0.0}))
    r = build(d / "run", CompressConfig(target="80%", strategy="threshold", tolerances=str(loose)), tmp_path / "t.onnx")
    target = r["target_params"]
    assert r["params_student"] <= target
    start = r["search"]["pareto"][0]  # every neighbourhood at its smallest candidate
    assert start["params"] == min(p["params"] for p in r["search"]["pareto"])
    assert start["score"] < r["validation"]["score_teacher"]  # so it had to grow back
    assert r["params_student"] > start["params"] and r["search"]["composed_score"] > start["score"]
    drop = r["validation"]["score_teacher"] - r["validation"]["score_student"]
    assert ("warning" in r) == (drop > 0)
    with pytest.raises(NdonnxError, match="cannot be met"):  # tolerances that leave a model over the target
        tight = tmp_path / "tight.json"
        tight.write_text(json.dumps({"neighbourhoods": [{**x, "threshold": 0.0} for x in rows], "max_drop": 0.0}))
        build(d / "run", CompressConfig(target="40%", strategy="threshold", tolerances=str(tight)), tmp_path / "u.onnx")


def test_run_bound_to_its_teacher(done, tmp_path):
    """A run directory moved with its teacher works; another file in the teacher's place is refused."""
    d, teacher, _ = done
    moved = tmp_path / "moved"
    shutil.copytree(d / "run", moved / "run")
    shutil.copy(teacher, moved / "teacher.onnx")
    teacher_copy_gone = json.loads((moved / "run" / "run.json").read_text())
    (moved / "run" / "run.json").write_text(json.dumps({**teacher_copy_gone, "teacher": "/gone/teacher.onnx"}))
    assert build(moved / "run", CompressConfig(target="70%"), tmp_path / "a.onnx")["params_student"] > 0
    model = onnx.load(str(teacher))
    init = next(i for i in model.graph.initializer if len(i.dims) == 4)
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.01, init.name))
    onnx.save(model, str(moved / "teacher.onnx"))  # retrained, same architecture
    with pytest.raises(NdonnxError, match="not the teacher .* was distilled from"):
        build(moved / "run", CompressConfig(target="70%"), tmp_path / "b.onnx")
    shutil.copy(teacher, moved / "teacher.onnx")
    manifest = moved / "run" / "cache" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "fingerprint": "0123456789abcdef" + m["fingerprint"][16:]}))
    with pytest.raises(NdonnxError, match="activation cache was made from another teacher"):
        build(moved / "run", CompressConfig(target="70%"), tmp_path / "c.onnx")


def test_compute_budget_in_macs(done, tmp_path, capsys):
    """--target-macs: the student's MACs, counted independently on the written file, meet the budget;
    the parameter target is not what limits it."""
    from ndonnx.macs import concrete_dims, count_macs

    d, teacher, _ = done
    out = tmp_path / "m.onnx"
    assert main(["search", str(d / "run"), "--target-macs", "75%", "-o", str(out), "--report", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    t = onnx.load(str(teacher))
    one = {"input": np.zeros((1, 3, 16, 16), np.float32)}
    teacher_macs = count_macs(t, concrete_dims(t, one)).total
    s = onnx.load(str(out))
    student_macs = count_macs(s, concrete_dims(s, one)).total
    assert r["macs_teacher"] == teacher_macs and r["macs_student"] == student_macs
    assert student_macs <= r["target_macs"] == int(0.75 * teacher_macs) < teacher_macs
    assert "MACs per sample" in capsys.readouterr().out
    assert main(["search", str(d / "run"), "--target-macs", "1", "-o", str(tmp_path / "x.onnx")]) == 1
    assert "MACs cannot be met" in capsys.readouterr().err
    assert default_output(teacher, CompressConfig(target_macs="60%").budget_text).name == "teacher.ndonnx-60pct-macs.onnx"


def test_float16_teacher_compresses(tmp_path):
    """A float16 model (float32 at its interface, as converters write it): every neighbourhood
    converts within float16's bound, students train in float32 and are written back float16, the
    cache gives float16 tensors back as float16, and the student file is float16 too."""
    import models
    from ndonnx.convert import round_trip
    from ndonnx.distill.cache import CacheReader
    from ndonnx.graph import load_teacher
    from ndonnx.partition import partition
    from ndonnx.sample import run_sample

    teacher = models.to_float16(models.tiny_resnet(tmp_path / "t32.onnx"), tmp_path / "t16.onnx")
    t = load_teacher(teacher)
    s = run_sample(t)
    trips = [round_trip(t, nb, s) for nb in partition(t).neighbourhoods]
    assert all(r.convertible for r in trips) and max(r.rel_err for r in trips) > 1e-4  # exact for float16 only
    x = np.random.default_rng(0).standard_normal((96, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    cfg = CompressConfig(distill=DistillConfig(candidates="width:0.5,teacher", steps=10, batch=16, jobs=1), target="80%",
                         finetune_steps=5)
    r = compress(teacher, tmp_path / "run", cfg, data_path=tmp_path / "calib.npz", output=tmp_path / "s.onnx")
    assert r["params_student"] <= 0.8 * r["params_teacher"]
    assert any(n["candidate"] != "teacher" for n in r["neighbourhoods"])
    student = onnx.load(str(tmp_path / "s.onnx"))
    assert {i.data_type for i in student.graph.initializer if i.dims} == {onnx.TensorProto.FLOAT16}
    cache = CacheReader(tmp_path / "run" / "cache")
    inner = next(n for n in cache.arrays if n not in ("input", "__labels__") and cache.arrays[n].ndim > 1)
    assert cache.read(inner, np.arange(4)).dtype == np.float16 and cache.read("input", np.arange(4)).dtype == np.float32
