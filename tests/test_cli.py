"""The command line: JSON contract, tables, exit codes, one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from ndonnx_cli.main import build_parser, main

KEYS = {"id", "inputs", "side_inputs", "shape_inputs", "outputs", "input_shapes", "output_shapes", "params", "op_types",
        "macs", "convertible", "reason", "rel_err"}


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_json_contract(zoo, capsys):
    r = _json(capsys, ["inspect", str(zoo["encoder"]), "--json"])
    assert {"model", "opset", "params", "outside_params", "macs", "macs_uncounted", "primary_input",
            "neighbourhoods"} <= r.keys()
    assert isinstance(r["opset"], int) and r["primary_input"] == "ids"
    for n in r["neighbourhoods"]:
        assert KEYS <= n.keys()
        assert all(isinstance(d, (int, str)) for s in n["input_shapes"] + n["output_shapes"] for d in s)
        assert n["convertible"] is True and n["reason"] is None and n["rel_err"] <= 1e-4
    assert sum(n["params"] for n in r["neighbourhoods"]) + r["outside_params"] == r["params"]
    assert r["macs_uncounted"] == [] and 0 < sum(n["macs"] for n in r["neighbourhoods"]) <= r["macs"]


def test_inspect_options(zoo, capsys):
    r = _json(capsys, ["inspect", str(zoo["resnet_legacy"]), "--json", "--block-size", "3", "--primary-input", "input"])
    assert [n["params"] for n in r["neighbourhoods"]] == [224 + 1168 + 1168, 3632 + 170]


def test_inspect_table(zoo, capsys):
    assert main(["inspect", str(zoo["mobilenet"])]) == 0
    out = capsys.readouterr().out
    assert "exact" in out and "4 neighbourhoods" in out and "2,610 parameters" in out


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "primary", "block"])
def test_bad_input_is_one_line_exit_2(zoo, tmp_path, capsys, case):
    path = tmp_path / "bad.onnx"
    argv = ["inspect", str(path)]
    if case == "text":
        path.write_text("not a model")
    elif case == "truncated":
        path.write_bytes(zoo["resnet_legacy"].read_bytes()[:2000])
    elif case == "primary":
        argv = ["inspect", str(zoo["resnet_legacy"]), "--primary-input", "nope"]
    elif case == "block":
        argv = ["inspect", str(zoo["resnet_legacy"]), "--block-size", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ndonnx: error:") and "Traceback" not in err[0]


def test_console_script_runs(zoo):
    r = subprocess.run([sys.executable, "-m", "ndonnx_cli", "inspect", str(zoo["two_heads"]), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["neighbourhoods"][-1]["outputs"] == ["logits", "embedding"]
    r = subprocess.run([sys.executable, "-m", "ndonnx_cli", "inspect", "/nonexistent.onnx"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no such file" in r.stderr


def _options(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {a}", h) for a, h in _options(sub))
        elif action.dest != "help":
            yield "/".join(action.option_strings) or action.dest, action.help


def test_every_option_has_help():
    options = list(_options(build_parser()))
    assert len(options) > 60
    assert [name for name, text in options if not text] == []


def test_search_help_names_only_its_own_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "--help"])
    text = capsys.readouterr().out
    assert "--force" in text and "--labels" not in text and "--data " not in text


@pytest.mark.parametrize("argv, says", [
    (["sensitivity", "{model}", "--data", "{data}", "--samples", "0"], "--samples must be >= 1"),
    (["inspect", "{model}", "--data", "{text}"], "not an .npz file"),
    (["search", "{tmp}", "--strategy", "best"], "invalid choice: 'best'"),
])
def test_messages_name_the_problem(zoo, tmp_path, capsys, argv, says):
    np.savez(tmp_path / "d.npz", input=np.zeros((4, 3, 16, 16), np.float32))
    (tmp_path / "README.md").write_text("# not data\n")
    fill = {"model": str(zoo["resnet_legacy"]), "data": str(tmp_path / "d.npz"), "text": str(tmp_path / "README.md"),
            "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
