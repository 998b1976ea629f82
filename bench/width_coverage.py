"""How much of each model the width family can shrink: per model, the channels of the inner groups
that may shrink, the neighbourhoods that get a width student, and the parameters width 0.5 removes
(BatchNorm folded on both sides). Every width-0.5 student is also checked the way `distill` checks
it: against the teacher with its dropped channels zeroed, on the teacher sample's inputs.

    python bench/width_coverage.py MODEL.onnx [MODEL.onnx ...] [--out width_coverage.json]

Comparing two versions of the rules: run it from each checkout (`PYTHONPATH=<checkout>`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ndonnx.candidates import REGISTRY, CandidateSpec, NotApplicable
from ndonnx.candidates.onnx_edit import fold_batchnorm, param_count
from ndonnx.candidates.width import channel_groups
from ndonnx.convert import extract
from ndonnx.errors import NdonnxError
from ndonnx.graph import load_teacher
from ndonnx.partition import partition
from ndonnx.sample import run_sample


def measure(path: Path) -> dict:
    teacher = load_teacher(path)
    sample = run_sample(teacher)
    part = partition(teacher)
    row = {"params": teacher.params, "neighbourhoods": len(part.neighbourhoods), "shrinkable_channels": 0,
           "with_width": 0, "width_0.5_removes": 0, "checked": 0, "failed_checks": []}
    for nbh in part.neighbourhoods:
        sub = extract(teacher, nbh, sample)
        row["shrinkable_channels"] += sum(g.size for g in channel_groups(fold_batchnorm(sub)) if g.shrinkable)
        try:
            st = REGISTRY["width"].generate(sub, CandidateSpec("width", 0.5))
        except NotApplicable:
            continue
        row["with_width"] += 1
        row["width_0.5_removes"] += param_count(fold_batchnorm(sub)) - st.params
        if getattr(st, "reference", None) is not None:  # versions before the check have none
            from ndonnx.candidates.onnx_edit import differs

            why = differs(st.model, st.reference, {i.name: sample.values[i.name] for i in sub.graph.input})
            row["checked"] += 1
            if why:
                row["failed_checks"].append(f"neighbourhood {nbh.id}: {why}")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=Path("width_coverage.json"))
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # partition and sample warnings would bury the table
    rows: dict[str, dict] = {}
    for path in args.models:
        try:
            rows[path.stem] = measure(path)
        except NdonnxError as e:
            rows[path.stem] = {"error": str(e)}
    table = Table("model", "params", "shrinkable channels", "with width", "width 0.5 removes", "checks failed")
    for name, r in rows.items():
        if "error" in r:
            table.add_row(name, "-", "-", "-", "-", r["error"][:60])
            continue
        table.add_row(name, f"{r['params']:,}", str(r["shrinkable_channels"]),
                      f"{r['with_width']} of {r['neighbourhoods']}", f"{r['width_0.5_removes']:,}",
                      f"{len(r['failed_checks'])} of {r['checked']}")
    Console().print(table)
    args.out.write_text(json.dumps(rows, indent=1))
    return 1 if any(r.get("failed_checks") for r in rows.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
