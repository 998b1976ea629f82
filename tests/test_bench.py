"""bench/nd_vs_kd.py --quick on a tiny slice of the bundled images: every reported key, sane values, a plot;
bench/width_coverage.py on two small models;
bench/gpu.py refusing without CUDA and, with the CPU standing in (--dry-run), every figure it reports;
every name a bench script imports from ndonnx exists (benches run rarely: a rename breaks them silently)."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def test_nd_vs_kd_quick_tiny(tmp_path):
    import nd_vs_kd

    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "bench" / "nd_vs_kd.py"), "--quick", "--from-npz", "--train-images", "384",
           "--test-images", "200", "--nd-images", "256", "--nd-steps", "4", "--search-steps", "3", "--epochs", "0.7", "--tune-epochs", "0.4",
           "--ft-epochs", "0.4", "--ft-tune-epochs", "0.2", "--evals", "2", "--budgets", "1,2,4,8,16,32,64", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())

    assert set(nd_vs_kd.KEYS) <= res.keys()
    for key in ("teacher_acc", "kd_acc", "prune_kd_acc", "nd_acc", "ndft_acc", "search_acc", "uniform_acc", "ce_acc",
                "datafree_acc"):
        assert 0.0 <= res[key] <= 1.0, key
    # the 200 bundled test images: the teacher is far above chance even on a slice
    assert res["teacher_acc"] > 0.8
    # every arm has the same budget: the KD students' exported graph counts exactly what ND's does
    assert res["params_kd_student"] == res["params_student"] < res["params_teacher"] == 271_402
    assert res["nd_seconds"] > 0 and res["ndft_seconds"] > res["nd_seconds"] and res["kd_seconds"] > 0
    # the fine-tuned ONNX student gives the accuracy torch measured while training
    assert abs(res["ndft_onnx_acc"] - res["ndft_acc"]) <= 1 / 200
    # the ND+FT curve starts where ND ended, at ND's accuracy
    assert res["curves"]["ndft"][0] == pytest.approx([res["nd_seconds"], res["nd_acc"]])
    assert [b["width"] for b in res["budgets"]] == [0.25, 0.5, 0.75]
    assert all(b["search_params"] <= b["params"] for b in res["budgets"])
    assert [b["params"] for b in res["budgets"]] == sorted(b["params"] for b in res["budgets"])
    assert len(res["kd_grid"]) == 2 and len(res["ft_grid"]) == 2 and res["ft_lr"] in (1e-4, 3e-4) and (res["kd_T"], res["kd_lambda"]) in {(g["T"], g["lambda"]) for g in res["kd_grid"]}
    for key in ("speedup", "speedup_vs_prune_kd"):
        assert res[key] is None or res[key] >= 0
    assert set(res["goals"]) and all(isinstance(v, bool) for v in res["goals"].values())
    # equal budgets, on both clocks: readings off each arm's curve, none before ND+FT's ND part is done
    assert res["cpu_curves"]["ndft"][0] == pytest.approx([res["nd_cpu_seconds"], res["nd_acc"]])
    assert res["nd_cpu_seconds"] > 0
    for clock in ("cpu", "wall"):
        eq = res["equal_budgets"][clock]
        assert eq["fair_until"] == min(eq["ends"].values()) and set(eq["ends"]) == {"ce", "kd", "prune_kd", "ndft"}
        start = res["nd_cpu_seconds"] if clock == "cpu" else res["nd_seconds"]
        assert eq["rows"]  # the tiny run lasts a few seconds: some budgets fall inside it
        for row in eq["rows"]:
            assert row["seconds"] <= max(eq["ends"].values())
            assert (row["ndft"]["acc"] is None) == (row["seconds"] < start)
            for arm in eq["ends"]:
                assert row[arm]["acc"] is None or 0.0 <= row[arm]["acc"] <= 1.0
                assert row[arm]["ended"] == (row["seconds"] >= eq["ends"][arm])
    assert "equal cpu budgets" in proc.stdout
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speedup" in proc.stdout and "search" in proc.stdout


def test_gpu_bench_refuses_without_cuda_and_dry_runs_on_the_cpu(tmp_path):
    import torch

    script = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--out", str(tmp_path / "gpu.json")]
    if not torch.cuda.is_available():
        proc = subprocess.run(script, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stdout.strip() == "bench/gpu.py: torch sees no CUDA device"
        assert not (tmp_path / "gpu.json").exists()
    tiny = ["--dry-run", "--steps", "3", "--compress-steps", "3", "--finetune-steps", "3", "--rounds", "1",
            "--candidates", "width:0.25,teacher"]
    proc = subprocess.run(script + tiny, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["dry_run"] and res["cache_pass"]["samples"] == 2000 and res["cache_pass"]["cuda_speedup"] > 0
    jobs = res["job_phase"]
    assert jobs["cpu"]["jobs"] == jobs["cuda"]["jobs"] > 0 and jobs["cuda"]["median_job_seconds"] > 0
    c = res["compress_cuda"]
    assert c["params"] < 271_402 and 0.5 < c["accuracy_teacher"] <= 1 and 0 <= c["accuracy_student"] <= 1
    assert {"distill", "search", "finetune"} <= c["stages"].keys()


def test_width_coverage_reports_and_checks(zoo, tmp_path):
    """bench/width_coverage.py: per model the shrinkable channels and the checked width-0.5 students
    (exit 0 when every check passes)."""
    out = tmp_path / "width.json"
    models = [str(zoo["resnet_legacy"]), str(zoo["mobilenet"])]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "width_coverage.py"), *models, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    for name in ("resnet_legacy", "mobilenet"):
        r = res[name]
        assert r["with_width"] >= 1 and r["checked"] == r["with_width"] and r["failed_checks"] == []
        assert 0 < r["width_0.5_removes"] < r["params"] and r["shrinkable_channels"] > 0


@pytest.mark.parametrize("script", sorted((ROOT / "bench").glob("*.py")), ids=lambda p: p.name)
def test_bench_imports_resolve(script):
    # imports inside functions too: they run only when that figure is asked for
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ndonnx":
            mod = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(mod, alias.name) and not _is_submodule(mod, alias.name):
                    missing.append(f"{node.module}.{alias.name} (line {node.lineno})")
    assert not missing, f"{script.name} imports names ndonnx no longer has: {missing}"


def _is_submodule(mod, name: str) -> bool:
    try:
        importlib.import_module(f"{mod.__name__}.{name}")
        return True
    except ModuleNotFoundError:
        return False
