"""compress / search / validate end to end on tiny teachers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from ndonnx.compress import CompressConfig, build, compress
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


def test_threshold_strategy_and_max_drop(done, tmp_path):
    d, teacher, _ = done
    r = build(d / "run", CompressConfig(target="100%", strategy="threshold", max_drop=0.5), tmp_path / "t.onnx")
    assert r["params_student"] <= r["params_teacher"]
    assert main(["search", str(d / "run"), "--target-params", "40%", "--max-drop", "-1", "-o", str(tmp_path / "x.onnx")]) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_finetune_does_not_worsen_its_loss(done, tmp_path):
    d, teacher, _ = done
    r = build(d / "run", CompressConfig(target="45%", finetune_steps=30), tmp_path / "ft.onnx")
    ft = r["finetune"]
    assert ft["steps"] == 30 and ft["held_out_loss_after"] <= ft["held_out_loss_before"] + 1e-6
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


def test_validate_command(done, capsys):
    d, teacher, _ = done
    assert main(["validate", str(d / "teacher.ndonnx-70pct.onnx"), "--reference", str(teacher), "--data", str(d / "calib.npz"),
                 "--labels", "labels", "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["samples"] == 120 and v["accuracy_teacher"] == 1.0 and 0 <= v["top1_agreement"] <= 1


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
