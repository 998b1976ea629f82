"""Converter coverage over a folder of ONNX models: the share of neighbourhoods and of parameters
that convert to torch exactly, and the failures grouped by reason.

    python bench/coverage.py ZOO_DIR [--out coverage.json]

ZOO_DIR can come from `python ../shared/zoo/export_zoo.py ZOO_DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ndonnx.errors import NdonnxError
from ndonnx.inspection import inspect_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--out", type=Path, default=Path("coverage.json"))
    args = ap.parse_args()
    rows, reasons = [], Counter()
    for path in sorted(args.zoo.glob("*.onnx")):
        t0 = time.perf_counter()
        try:
            r = inspect_model(path)
        except NdonnxError as e:
            rows.append({"model": path.name, "error": str(e)})
            continue
        nb = r["neighbourhoods"]
        ok = [n for n in nb if n["convertible"]]
        inside = r["params"] - r["outside_params"]
        for n in nb:
            if not n["convertible"]:
                reasons[n["reason"]] += 1
        rows.append({
            "model": path.name, "neighbourhoods": len(nb), "convertible": len(ok),
            "share_neighbourhoods": len(ok) / len(nb), "params": r["params"],
            "share_params": sum(n["params"] for n in ok) / inside if inside else 1.0,
            "max_rel_err": max((n["rel_err"] for n in ok), default=None),
            "seconds": round(time.perf_counter() - t0, 2),
            "failures": [f"{n['id']}: {n['reason']}" for n in nb if not n["convertible"]],
        })
        print(f"{path.name}: {len(ok)}/{len(nb)} neighbourhoods", file=sys.stderr)
    done = [r for r in rows if "error" not in r]
    total_nb = sum(r["neighbourhoods"] for r in done)
    summary = {
        "models": len(rows),
        "share_neighbourhoods": sum(r["convertible"] for r in done) / total_nb if total_nb else None,
        "min_share_params": min((r["share_params"] for r in done), default=None),
        "failure_reasons": dict(reasons.most_common()),
        "rows": rows,
    }
    t = Table(title=f"converter coverage: {args.zoo}")
    for col in ("model", "neighbourhoods", "exact", "params", "exact params", "max rel_err", "s"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        if "error" in r:
            t.add_row(r["model"], "refused", r["error"][:60], "", "", "", "")
            continue
        t.add_row(r["model"], str(r["neighbourhoods"]), f"{r['convertible']} ({r['share_neighbourhoods']:.0%})",
                  f"{r['params']:,}", f"{r['share_params']:.2%}",
                  f"{r['max_rel_err']:.1e}" if r["max_rel_err"] is not None else "-", f"{r['seconds']}")
    Console().print(t)
    print(f"all neighbourhoods: {summary['share_neighbourhoods']:.2%} exact; "
          f"lowest parameter share of a model: {summary['min_share_params']:.2%}")
    for reason, n in reasons.most_common():
        print(f"  {n:4d}  {reason}")
    args.out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
