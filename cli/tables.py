"""Human-readable tables of the library's JSON reports."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ndonnx.macs import fmt_macs

stdout = Console()


def _shape(s: list) -> str:
    return "x".join(str(d) for d in s)


def _ops(op_types: dict[str, int], limit: int = 3) -> str:
    items = sorted(op_types.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{op}x{n}" if n > 1 else op for op, n in items[:limit])
    return text + (f", +{len(items) - limit}" if len(items) > limit else "")


def inspect_table(r: dict) -> None:
    t = Table(title=f"{r['model']}: opset {r['opset']}, primary input {r['primary_input']!r}")
    for col in ("id", "shapes in -> out", "ops", "params", "MACs", "torch"):
        t.add_column(col, justify="right" if col in ("id", "params", "MACs") else "left", overflow="fold")
    for n in r["neighbourhoods"]:
        side = f" +{len(n['side_inputs'])} side" if n["side_inputs"] else ""
        shapes = ", ".join(map(_shape, n["input_shapes"])) + side + " -> " + ", ".join(map(_shape, n["output_shapes"]))
        if n["convertible"] is None:
            torch_col = "not checked"
        elif n["convertible"]:
            torch_col = f"[green]exact[/] {n['rel_err']:.0e}"
        else:
            torch_col = f"[red]no[/]: {n['reason']}"
        t.add_row(str(n["id"]), shapes, _ops(n["op_types"]), f"{n['params']:,}", fmt_macs(n["macs"]), torch_col)
    stdout.print(t)
    conv = [n for n in r["neighbourhoods"] if n["convertible"]]
    conv_params = sum(n["params"] for n in conv)
    inside = r["params"] - r["outside_params"]
    checked = any(n["convertible"] is not None for n in r["neighbourhoods"])
    torch_text = (f"{len(conv)} convert to torch exactly, holding {conv_params:,} of {inside:,} parameters"
                  if checked else "torch round trip not checked")
    at = ", ".join(f"{k} {_shape(v)}" for k, v in r.get("macs_inputs", {}).items())
    macs_text = (f"{r['macs']:,} MACs for one sample ({at})"
                 if r["macs"] is not None else
                 f"MACs not counted ({r['macs_uncounted'][0]})")
    stdout.print(f"{len(r['neighbourhoods'])} neighbourhoods, {r['params']:,} parameters "
                 f"({r['outside_params']:,} outside neighbourhoods: tied or side-path weights), {macs_text}; "
                 f"{torch_text}. Tensor names: --json.")


def candidates_table(rows: list[dict]) -> None:
    t = Table(title="distilled candidates (rel_mse: held-out MSE / variance of the teacher's output)")
    for col in ("neighbourhood", "candidate", "params", "rel_mse", "status", "s"):
        t.add_column(col, justify="left" if col in ("candidate", "status") else "right", overflow="fold")
    for r in rows:
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        status += f" ({r['note']})" if r.get("note") else ""  # e.g. what a vocab student covers
        rel = f"{r['rel_mse']:.2e}" if r["rel_mse"] is not None else "-"
        t.add_row(str(r["neighbourhood"]), r["candidate"], f"{r['params']:,}", rel, status, f"{r['seconds']:.1f}")
    stdout.print(t)


def compress_table(r: dict) -> None:
    t = Table(title=f"{r['teacher']} -> {r['output']}")
    lat = r.get("latency")
    cols = ["id", "teacher params", "student params", "candidate", r["metric"] + " (partial)"]
    if lat:
        cols += ["teacher ms", "student ms (modelled)"]
    for col in cols:
        t.add_column(col, justify="left" if col == "candidate" else "right")
    for n in r["neighbourhoods"]:
        score = f"{n['score']:.4f}" if n["score"] is not None else "-"
        ms = [f"{n['teacher_ms']:.3f}", f"{n['student_ms']:.3f}"] if lat else []
        t.add_row(str(n["id"]), f"{n['teacher_params']:,}", f"{n['student_params']:,}", n["candidate"], score, *ms)
    ms = [f"{lat['teacher_ms_modelled']:.3f}", f"{lat['predicted_ms']:.3f}"] if lat else []
    t.add_row("all", f"{r['params_teacher']:,}", f"{r['params_student']:,}",
              f"{r['params_student'] / r['params_teacher']:.1%} of the teacher", "", *ms, end_section=True)
    stdout.print(t)
    if lat:
        stdout.print(f"latency at batch {lat['batch']}, {lat['threads']} thread{'s' if lat['threads'] > 1 else ''} "
                     f"(onnxruntime {lat['onnxruntime']}): modelled {lat['predicted_ratio']:.1%} of the teacher "
                     f"(target {r['target_latency']} = {lat['target_ratio']:.1%}, {lat['target_ms']:.3f} ms; "
                     f"{lat['outside_ms']:.3f} ms outside neighbourhoods); measured {lat['teacher_ms']:.3f} -> "
                     f"{lat['student_ms']:.3f} ms ({lat['measured_ratio']:.1%}, {1 / lat['measured_ratio']:.2f}x)")
    for n in r["neighbourhoods"]:  # e.g. how much of the calibration data a vocab student covers
        if n.get("note"):
            stdout.print(f"{n['id']} {n['candidate']}: {n['note']}")
    if "macs_student" in r:
        stdout.print(f"MACs per sample: {r['macs_teacher']:,} -> {r['macs_student']:,} "
                     f"({r['macs_student'] / r['macs_teacher']:.1%}; target {r['target_macs']:,})")
    ft = r.get("finetune")
    validation_table(r["validation"], ft.get("score_before") if ft else None)
    if r.get("quantize"):
        quantize_lines(r["quantize"], r["metric"])
    stdout.print("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["timings"].items()))
    if "error" in r:
        stdout.print(f"[red]{r['error']}[/]")
    else:
        if "warning" in r:
            stdout.print(f"[yellow]{r['warning']}[/]")
        stdout.print(f"wrote {r['output']}")


def quantize_lines(q: dict, metric: str) -> None:
    """The quantized student (the validation above) next to its float model."""
    how = f"{q['method']} ({q['format']}"
    how += f", {q['calibration_samples']} calibration samples)" if "calibration_samples" in q else ")"
    stdout.print(f"quantized {q['requested']}: {how}; conv share of the parameters "
                 f"{q['conv_share']:.0%}")
    rows = [("file size", f"{q['bytes_float']:,} B", f"{q['bytes_int8']:,} B ({q['size_ratio']:.1%})"),
            (metric, f"{q['score_float']:.4f}", f"{q['score_int8']:.4f}")]
    for key, label in (("accuracy", "accuracy"), ("top1_agreement", "top-1 agreement with the teacher"),
                       ("latency_ratio", "latency (student / teacher)")):
        if f"{key}_float" in q and (key != "accuracy" or metric != "accuracy"):
            fmt = (lambda x: f"{x:.2f}x") if key == "latency_ratio" else (lambda x: f"{x:.4f}")
            rows.append((label, fmt(q[f"{key}_float"]), fmt(q[f"{key}_int8"])))
    t = Table(title="float student vs int8 student")
    for col in ("figure", "float", "int8"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    for row in rows:
        t.add_row(*row)
    stdout.print(t)


def validation_table(v: dict, before_finetune: float | None = None) -> None:
    t = Table(title=f"validation on {v['samples']} samples ({v.get('data', 'given data')}), onnxruntime")
    t.add_column("figure")
    t.add_column("teacher", justify="right")
    t.add_column("student", justify="right")
    t.add_row("parameters", f"{v['params_teacher']:,}", f"{v['params_student']:,}")
    if "accuracy_teacher" in v:
        t.add_row("accuracy", f"{v['accuracy_teacher']:.4f}", f"{v['accuracy_student']:.4f}")
    if v["metric"] != "accuracy":
        t.add_row(v["metric"], f"{v['score_teacher']:.4f}", f"{v['score_student']:.4f}")
    if before_finetune is not None:
        t.add_row(f"{v['metric']} before fine-tuning", "", f"{before_finetune:.4f}")
    if "top1_agreement" in v:
        t.add_row("top-1 agreement with the teacher", "", f"{v['top1_agreement']:.4f}")
    t.add_row("max abs / relative error vs teacher", "", f"{v['max_abs_err']:.3g} / {v['rel_err']:.3g}")
    t.add_row("latency (student / teacher, one thread, alternated)", "", f"{v['latency_ratio']:.2f}x")
    if "latency_teacher_ms" in v:
        t.add_row(f"latency, batch {v['latency_batch']}, {v['latency_threads']} thread(s), alternated",
                  f"{v['latency_teacher_ms']:.3f} ms",
                  f"{v['latency_student_ms']:.3f} ms ({v['latency_measured_ratio']:.1%})")
    if "latency_note" in v:
        t.add_row("latency", "", v["latency_note"])
    if "bytes_teacher" in v:
        t.add_row("file size", f"{v['bytes_teacher']:,} B", f"{v['bytes_student']:,} B")
    if "torch_rel_err" in v:
        tc = v["torch_rel_err"]
        note = v.get("torch_note") or "does not convert"
        t.add_row("torch vs onnxruntime (student)", "", note if tc is None else f"{tc:.1e}")
    stdout.print(t)


def sensitivity_table(r: dict) -> None:
    t = Table(title=f"{r['metric']} drop with noise eps x std on one neighbourhood's output "
                    f"({r['samples']} samples, {r['metric']} {r['score']:.4f})")
    t.add_column("neighbourhood", justify="right")
    t.add_column("params", justify="right")
    for e in r["eps"]:
        t.add_column(f"eps {e:g}", justify="right")
    t.add_column(f"threshold (drop <= {r['max_drop']:g})", justify="right")
    rows = [(str(n["neighbourhood"]), f"{n['params']:,}", n["drops"], n["threshold"]) for n in r["neighbourhoods"]]
    rows.append(("all", "", r["all"]["drops"], r["all"]["threshold"]))
    for name, params, drops, thr in rows:
        t.add_row(name, params, *[f"{d:+.4f}" for d in drops], "-" if thr is None else f"{thr:g}")
    stdout.print(t)
