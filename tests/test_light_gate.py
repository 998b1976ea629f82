"""The light CI install: `check`, `inspect --no-check`, `validate` and every error path run without torch,
and the check path never imports it. Each case runs in a fresh interpreter, so that what an earlier test
imported cannot hide an import."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from ndonnx.errors import FULL_ONLY

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "resnet20_fmnist.onnx"
HEAVY = FULL_ONLY

# A finder first in sys.meta_path that refuses the distillation dependencies, as if they were not installed.
NO_TORCH = textwrap.dedent(f"""
    import sys

    class _Absent:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {HEAVY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _Absent())
""")


def _run(argv: list[str], block: bool = True, after: str = "") -> subprocess.CompletedProcess:
    """`ndonnx ARGV` in a fresh interpreter (torch made unimportable when `block`); `after` runs once
    main has returned, before exit, and may print to stdout."""
    code = (NO_TORCH if block else "") + textwrap.dedent(f"""
        from ndonnx_cli.main import main
        rc = main({argv!r})
    """) + textwrap.dedent(after) + "\nraise SystemExit(rc)\n"
    env = {**os.environ, "COLUMNS": "200"}  # rich tables unwrapped
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def eval_npz(tmp_path_factory) -> Path:
    d = np.load(ROOT / "models" / "fmnist_test.npz")
    path = tmp_path_factory.mktemp("light") / "test64.npz"
    np.savez(path, input=d["input"][:64], labels=d["labels"][:64])
    return path


def test_blocker_blocks():
    r = subprocess.run([sys.executable, "-c", NO_TORCH + "import torch"], capture_output=True, text=True)
    assert r.returncode == 1 and "No module named 'torch'" in r.stderr


def test_check_without_torch(tmp_path):
    xml = tmp_path / "gates.xml"
    r = _run(["check", str(MODEL), "--max-params", "1M", "--max-size", "2MB", "--junit", str(xml)])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok ") == 2 and r.stderr == ""
    suite = ET.parse(xml).getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == "0"
    r = _run(["check", str(MODEL), "--max-params", "100K", "--json"])
    assert r.returncode == 1 and json.loads(r.stdout)["passed"] is False and "check failed" in r.stderr


def test_quality_gates_without_torch(eval_npz):
    r = _run(["check", str(MODEL), "--reference", str(MODEL), "--data", str(eval_npz), "--labels", "labels",
              "--min-agreement", "1.0", "--max-rel-err", "1e-6", "--max-accuracy-drop", "0"])
    assert r.returncode == 0, r.stderr
    assert "min-agreement" in r.stdout and "max-rel-err" in r.stdout and "max-accuracy-drop" in r.stdout


@pytest.mark.parametrize("argv", [
    ["check", "missing.onnx", "--max-params", "1M"],
    ["check", str(MODEL), "--max-params", "lots"],
    ["check", str(MODEL)],
    ["check", str(MODEL), "--min-agreement", "0.9"],
    ["check", str(MODEL), "--max-size"],  # a usage error (argparse)
    ["inspect", "missing.onnx", "--no-check"],
    ["inspect", str(MODEL)],  # the round trip needs torch: says so, points at --no-check
    ["validate", "missing.onnx", "--reference", str(MODEL), "--data", "d.npz"],
    # (a run directory and output of their own: the quick start may have written the default ones)
    ["compress", str(MODEL), "--data", "models/fmnist_subset.npz", "--run-dir", "never-made", "-o", "never-made.onnx"],
    ["distill", str(MODEL), "--data", "models/fmnist_subset.npz", "--run-dir", "never-made"],
    ["search", "never-made"],
])
def test_errors_without_torch(argv):
    r = _run(argv)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(err) == 1 and err[0].startswith("ndonnx: error:"), r.stderr
    if argv[0] in ("compress", "distill"):  # valid inputs: the training needs torch
        assert "needs the full install with torch" in err[0] and "not installed" in err[0]
    if argv[0] == "search":  # inputs are checked before torch is imported: the mistake is named first
        assert "not a finished ndonnx run directory" in err[0]
    if argv[:2] == ["inspect", str(MODEL)]:
        assert "--no-check" in err[0]
    assert not (ROOT / "never-made").exists() and not (ROOT / "never-made.onnx").exists()


def test_inspect_no_check_without_torch():
    r = _run(["inspect", str(MODEL), "--no-check", "--json"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["params"] == 271402 and rep["neighbourhoods"]
    assert all(n["convertible"] is None for n in rep["neighbourhoods"])
    r = _run(["inspect", str(MODEL), "--no-check"])  # the table (rich)
    assert r.returncode == 0 and "torch round trip not checked" in " ".join(r.stdout.split()) and "round trip ━" not in r.stderr


def test_validate_without_torch(eval_npz):
    r = _run(["validate", str(MODEL), "--reference", str(MODEL), "--data", str(eval_npz), "--labels", "labels",
              "--json"])
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["rel_err"] == 0 and v["top1_agreement"] == 1.0
    assert v["torch_rel_err"] is None and v["torch_note"] == "skipped: torch is not installed"
    r = _run(["validate", str(MODEL), "--reference", str(MODEL), "--data", str(eval_npz), "--labels", "labels"])
    assert r.returncode == 0 and "skipped: torch is not installed" in r.stdout


LOADED = """
import sys
print("\\nLOADED", sorted({m.split(".")[0] for m in sys.modules} & set(%r)))
""" % (HEAVY,)


@pytest.mark.parametrize("argv", [
    ["check", str(MODEL), "--max-params", "1M", "--max-size", "2MB"],
    ["check", "missing.onnx", "--max-params", "1M"],
    ["inspect", str(MODEL), "--no-check", "--json"],
])
def test_check_path_does_not_import_torch(argv):
    """With torch installed and importable, the CLI's check path still never loads it."""
    r = _run(argv, block=False, after=LOADED)
    assert r.returncode in (0, 2), r.stderr
    assert r.stdout.strip().splitlines()[-1] == "LOADED []"


def test_validate_with_torch_keeps_the_round_trip(eval_npz):
    """With torch installed, validate still reports the student's torch-vs-onnxruntime error."""
    r = _run(["validate", str(MODEL), "--reference", str(MODEL), "--data", str(eval_npz), "--json"], block=False)
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["torch_rel_err"] is not None and v["torch_rel_err"] < 1e-4 and "torch_note" not in v


def test_light_install_matches_the_dependencies():
    """The README's light install is pyproject's dependencies less FULL_ONLY, with the same bounds."""
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    light = [d for d in deps if re.split(r"[<>=!~ \[]", d)[0] not in FULL_ONLY]
    assert len(deps) - len(light) == len(FULL_ONLY)
    readme = (ROOT / "README.md").read_text()
    line = "pip install " + " ".join(f"'{d}'" for d in light)
    assert readme.count(line) == 3  # the light install, GitHub Actions, GitLab CI
    assert "pip install -e . && ndonnx compress" in readme  # the quick start: one command, the full tool
