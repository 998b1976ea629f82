"""Converter coverage over a folder of ONNX models: the share of neighbourhoods and of parameters
that convert to torch exactly, how the model is cut (largest neighbourhood, boundary widths,
neighbourhoods per transformer layer), whether it meets the partition goal, and the failures
grouped by reason.

    python bench/coverage.py ZOO_DIR [--out coverage.json] [--markdown coverage.md]

ZOO_DIR can come from `python ../shared/zoo/export_zoo.py ZOO_DIR`.

Goal ("pass"): >= 98% of the parameters inside neighbourhoods (outside params excluded) sit in
neighbourhoods whose torch round trip is exact; the largest neighbourhood holds <= 35% of the
model's parameters, or a single weighted op ("one op"), or at most 5 weighted ops ("one block");
and a transformer has >= 2 neighbourhoods with weights per layer. A neighbourhood is an attention
sub-layer when it holds a Softmax and at least two MatMul/Einsum (scores and the weighted sum: a
classifier's or a detection head's Softmax alone does not make a CNN a transformer); the model is a
transformer when it has one, and its layers are the Softmax ops in its attention neighbourhoods
(the attention neighbourhoods themselves where each holds one Softmax, more where one neighbourhood
swallowed several layers).
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

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU")
GOAL_EXACT_SHARE = 0.98
GOAL_LARGEST_SHARE = 0.35
GOAL_BLOCK_OPS = 5
GOAL_PER_LAYER = 2.0
MD_ERROR_CHARS = 200


def weighted_ops(op_types: dict[str, int]) -> int:
    return sum(op_types.get(op, 0) for op in WEIGHTED_OPS)


def is_attention(op_types: dict[str, int]) -> bool:
    """Softmax between two activation products (Q·K and ·V), not a classifier's Softmax."""
    return "Softmax" in op_types and op_types.get("MatMul", 0) + op_types.get("Einsum", 0) >= 2


def judge(row: dict) -> tuple[bool, str]:
    """The goal verdict for one inspected model: (passed, label or the reasons it fails)."""
    why, notes = [], []
    if row["share_params"] < GOAL_EXACT_SHARE:
        why.append(f"exact params {row['share_params']:.1%} < {GOAL_EXACT_SHARE:.0%}")
    ops = row["largest_weighted_ops"]
    if row["largest_share"] > GOAL_LARGEST_SHARE:
        if ops == 1:
            notes.append("one op")
        elif ops <= GOAL_BLOCK_OPS:
            notes.append("one block")
        else:
            why.append(f"largest #{row['largest_id']} {row['largest_share']:.0%} > {GOAL_LARGEST_SHARE:.0%} "
                       f"with {ops} weighted ops")
    if row["transformer"] and row["per_layer"] < GOAL_PER_LAYER:
        why.append(f"{row['per_layer']:.1f} neighbourhoods per layer < {GOAL_PER_LAYER:.0f}")
    if why:
        return False, "; ".join(why)
    return True, ", ".join(notes)


def summarize(path: Path, r: dict, seconds: float) -> dict:
    nb = r["neighbourhoods"]
    ok = [n for n in nb if n["convertible"]]
    inside = r["params"] - r["outside_params"]
    largest = max(nb, key=lambda n: n["params"], default=None)
    attention = [n for n in nb if is_attention(n["op_types"])]
    layers = sum(n["op_types"]["Softmax"] for n in attention)
    weighted = [n for n in nb if n["params"] > 0]
    row = {
        "model": path.name, "opset": r["opset"],
        "neighbourhoods": len(nb), "convertible": len(ok),
        "share_neighbourhoods": len(ok) / len(nb) if nb else 1.0, "params": r["params"],
        "outside_params": r["outside_params"],
        "share_params": sum(n["params"] for n in ok) / inside if inside else 1.0,
        "max_rel_err": max((n["rel_err"] for n in ok), default=None),
        "largest_id": largest["id"] if largest else None,
        "largest_params": largest["params"] if largest else 0,
        "largest_share": largest["params"] / r["params"] if largest and r["params"] else 0.0,
        "largest_weighted_ops": weighted_ops(largest["op_types"]) if largest else 0,
        "largest_op_types": largest["op_types"] if largest else {},
        "max_inputs": max((len(n["inputs"]) for n in nb), default=0),
        "max_outputs": max((len(n["outputs"]) for n in nb), default=0),
        "max_side_inputs": max((len(n["side_inputs"]) for n in nb), default=0),
        "multi_tensor_boundaries": sum(len(n["inputs"]) > 1 or len(n["outputs"]) > 1 for n in nb),
        "transformer": bool(attention),
        "attention_neighbourhoods": len(attention),
        "layers": layers,
        "softmax_neighbourhoods": sum("Softmax" in n["op_types"] for n in nb),
        "softmax_ops": sum(n["op_types"].get("Softmax", 0) for n in nb),
        "weighted_neighbourhoods": len(weighted),
        "per_layer": len(weighted) / layers if attention else None,
        "seconds": round(seconds, 2),
        "failures": [f"{n['id']}: {n['reason']}" for n in nb if not n["convertible"]],
    }
    row["pass"], row["why"] = judge(row)
    return row


def cells(r: dict) -> dict[str, str]:
    """The display cells of one row, shared by the rich table and the markdown table."""
    if "error" in r:
        return {"model": r["model"], "opset": str(r.get("opset") or ""), "params": "", "neighbourhoods": r["kind"],
                "exact": "", "exact params": "", "largest": "", "max in/out": "", "per layer": "",
                "pass": f"no: {r['kind']}: {r['error']}", "max rel_err": "", "s": f"{r['seconds']}"}
    per_layer = (f"{r['weighted_neighbourhoods']}/{r['layers']} = {r['per_layer']:.1f}"
                 if r["transformer"] else "-")
    ops = r["largest_weighted_ops"]
    return {
        "model": r["model"], "opset": str(r["opset"]), "params": f"{r['params']:,}",
        "neighbourhoods": str(r["neighbourhoods"]),
        "exact": f"{r['convertible']} ({r['share_neighbourhoods']:.0%})",
        "exact params": f"{r['share_params']:.2%}",
        "largest": f"{r['largest_share']:.0%} ({ops} op{'' if ops == 1 else 's'})",
        "max in/out": f"{r['max_inputs']}/{r['max_outputs']}",
        "per layer": per_layer,
        "pass": ("yes" + (f" ({r['why']})" if r["why"] else "")) if r["pass"] else f"no: {r['why']}",
        "max rel_err": f"{r['max_rel_err']:.1e}" if r["max_rel_err"] is not None else "-",
        "s": f"{r['seconds']}",
    }


def markdown(rows: list[dict]) -> str:
    head = ("model", "opset", "params", "neighbourhoods", "exact params share", "largest share (+ops)",
            "max in/out", "per layer", "pass / why")
    keys = ("model", "opset", "params", "neighbourhoods", "exact params", "largest", "max in/out", "per layer",
            "pass")
    right = {"opset", "params", "neighbourhoods", "exact params", "largest", "max in/out", "per layer"}
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---:" if k in right else "---" for k in keys) + "|"]
    for r in rows:
        c = cells(r)
        if "error" in r and len(c["pass"]) > MD_ERROR_CHARS:  # the JSON keeps the whole message
            c["pass"] = c["pass"][:MD_ERROR_CHARS].rstrip() + "…"
        lines.append("| " + " | ".join(c[k].replace("|", "\\|").replace("\n", " ") for k in keys) + " |")
    return "\n".join(lines) + "\n"


def opset_of(path: Path) -> int | None:
    """The default-domain opset, read without the weights (for rows of refused models)."""
    try:
        import onnx
        m = onnx.load(str(path), load_external_data=False)
        return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    except Exception:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--out", type=Path, default=Path("coverage.json"))
    ap.add_argument("--markdown", type=Path, default=None, metavar="FILE",
                    help="also write the table as a GitHub markdown table")
    args = ap.parse_args()
    rows, reasons = [], Counter()
    start = time.perf_counter()
    for path in sorted(args.zoo.glob("*.onnx")):
        t0 = time.perf_counter()
        try:
            r = inspect_model(path)
        except NdonnxError as e:  # refused (e.g. a quantized model): a row saying why
            rows.append({"model": path.name, "opset": opset_of(path), "kind": "refused", "error": str(e),
                         "seconds": round(time.perf_counter() - t0, 2)})
            print(f"{path.name}: refused: {e}", file=sys.stderr)
            continue
        except Exception as e:  # an internal failure on one model is reported, the run goes on
            rows.append({"model": path.name, "opset": opset_of(path), "kind": "internal error",
                         "error": f"{type(e).__name__}: {e}",
                         "seconds": round(time.perf_counter() - t0, 2)})
            print(f"{path.name}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        for n in r["neighbourhoods"]:
            if not n["convertible"]:
                reasons[n["reason"]] += 1
        row = summarize(path, r, time.perf_counter() - t0)
        rows.append(row)
        print(f"{path.name}: {row['convertible']}/{row['neighbourhoods']} neighbourhoods, "
              f"{'pass' if row['pass'] else 'FAIL: ' + row['why']}", file=sys.stderr)
    total_s = round(time.perf_counter() - start, 1)
    done = [r for r in rows if "error" not in r]
    total_nb = sum(r["neighbourhoods"] for r in done)
    summary = {
        "models": len(rows),
        "share_neighbourhoods": sum(r["convertible"] for r in done) / total_nb if total_nb else None,
        "min_share_params": min((r["share_params"] for r in done), default=None),
        "passed": sum(bool(r.get("pass")) for r in rows),
        "not_passed": {r["model"]: (f"{r['kind']}: {r['error']}" if "error" in r else r["why"])
                       for r in rows if not r.get("pass")},
        "goal": {"exact_share": GOAL_EXACT_SHARE, "largest_share": GOAL_LARGEST_SHARE,
                 "block_weighted_ops": GOAL_BLOCK_OPS, "per_layer": GOAL_PER_LAYER,
                 "weighted_ops": list(WEIGHTED_OPS)},
        "seconds": total_s,
        "failure_reasons": dict(reasons.most_common()),
        "rows": rows,
    }
    t = Table(title=f"converter coverage: {args.zoo}")
    cols = ("model", "neighbourhoods", "exact", "params", "exact params", "largest", "max in/out", "per layer",
            "max rel_err", "s", "pass")
    for col in cols:
        t.add_column(col, justify="left" if col in ("model", "pass") else "right")
    for r in rows:
        c = cells(r)
        if "error" in r:
            c["pass"] = f"no: {r['kind']}: {r['error'][:60]}"
        t.add_row(*(c[col] for col in cols))
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 220))
    console.print(t)
    if summary["share_neighbourhoods"] is not None:
        print(f"all neighbourhoods: {summary['share_neighbourhoods']:.2%} exact; "
              f"lowest parameter share of a model: {summary['min_share_params']:.2%}")
    print(f"goal met by {summary['passed']}/{len(rows)} models; {total_s} s in all")
    for reason, n in reasons.most_common():
        print(f"  {n:4d}  {reason}")
    args.out.write_text(json.dumps(summary, indent=2))
    if args.markdown is not None:
        args.markdown.write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
