"""`ndonnx check`: size and quality gates for CI. Each gate reports measured vs allowed.
Needs onnx, onnxruntime and numpy only: nothing on this path imports torch (a light CI install).
Quantized models (`compress --quantize`) are gated too: their int8 weights count as parameters,
once each, scales and zero points do not, and a weight's zero is its zero point (`graph.weight_counts`,
`graph.weight_nonzeros`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from ndonnx.budget import parse_target
from ndonnx.errors import NdonnxError
from ndonnx.files import file_size
from ndonnx.graph import load_teacher, weight_nonzeros
from ndonnx.macs import count_macs


@dataclass(frozen=True)
class GateConfig:
    max_params: str | None = None
    max_size: str | None = None
    max_nonzero: str | None = None
    max_macs: str | None = None
    dims: tuple[str, ...] = ()  # NAME=N: symbolic input dims other than the batch, for --max-macs
    reference: str | None = None
    data: str | None = None
    labels: str | None = None
    min_agreement: float | None = None
    max_rel_err: float | None = None
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        for flag, value in (("--min-agreement", self.min_agreement), ("--max-accuracy-drop", self.max_accuracy_drop)):
            if value is not None and not 0 <= value <= 1:
                raise NdonnxError(f"{flag} {value:g}: a fraction between 0 and 1 is meant (e.g. 0.98 for 98%)")
        if self.max_rel_err is not None and self.max_rel_err < 0:
            raise NdonnxError(f"--max-rel-err {self.max_rel_err:g}: must be >= 0")
        if self.labels and self.max_accuracy_drop is None:
            raise NdonnxError("--labels is used by --max-accuracy-drop only; give that gate, or leave --labels out")
        if self.max_accuracy_drop is not None and not self.labels:
            raise NdonnxError("--max-accuracy-drop needs --labels NAME (the labels array in --data)")

    @property
    def quality(self) -> bool:
        return any(v is not None for v in (self.min_agreement, self.max_rel_err, self.max_accuracy_drop))


@dataclass
class Gate:
    name: str
    measured: float
    allowed: float
    passed: bool
    unit: str = ""

    def line(self) -> str:
        verb = "ok  " if self.passed else "FAIL"
        cmp = "<=" if self.name.startswith("max") else ">="
        return f"{verb} {self.name}: {_fmt(self.measured)}{self.unit} (allowed {cmp} {_fmt(self.allowed)}{self.unit})"


def _fmt(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:.4g}"


def parse_size(text: str) -> int:
    t = text.strip().upper().replace(" ", "")
    for unit, scale in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6),
                        ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            t, mult = t[: -len(unit)], scale
            break
    else:
        mult = 1
    try:
        value = float(t)
    except ValueError:
        raise NdonnxError(f"--max-size {text!r}: expected a size like 10MB, 512KiB or 2000000") from None
    return int(value * mult)


def parse_dims(items: tuple[str, ...] | list[str]) -> dict[str, int]:
    """('seq=128', 'H=224') -> {'seq': 128, 'H': 224}."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise NdonnxError(f"--dim {item!r}: expected NAME=N with a positive integer N, e.g. --dim seq=128")
        out[name.strip()] = int(value)
    return out


def run_gates(model_path: str | Path, cfg: GateConfig) -> list[Gate]:
    if not any([cfg.max_params, cfg.max_size, cfg.max_nonzero, cfg.max_macs, cfg.quality]):
        raise NdonnxError("no gate given: use --max-params, --max-size, --max-nonzero, --max-macs, --min-agreement, "
                          "--max-rel-err or --max-accuracy-drop")
    if cfg.dims and not cfg.max_macs:
        raise NdonnxError("--dim is used by --max-macs only; give that gate, or leave --dim out")
    dims = parse_dims(cfg.dims)
    model_path = Path(model_path)
    student = load_teacher(model_path, quantized=True)  # gated as stored: quantized or not
    gates = []
    if cfg.max_params:
        allowed = parse_target(cfg.max_params, student.params, "--max-params")
        gates.append(Gate("max-params", student.params, allowed, student.params <= allowed))
    if cfg.max_size:
        size, allowed = file_size(model_path), parse_size(cfg.max_size)
        gates.append(Gate("max-size", size, allowed, size <= allowed, " B"))
    if cfg.max_nonzero:
        nonzero = sum(weight_nonzeros(student.model).values())
        allowed = parse_target(cfg.max_nonzero, student.params, "--max-nonzero")
        gates.append(Gate("max-nonzero", nonzero, allowed, nonzero <= allowed))
    if cfg.max_macs:
        count = count_macs(student.model, dims)
        if count.uncounted:
            first = count.uncounted[0][1]
            more = f" (and {len(count.uncounted) - 1} more)" if len(count.uncounted) > 1 else ""
            raise NdonnxError(f"--max-macs: cannot count the MACs of {first}{more}")
        allowed = parse_target(cfg.max_macs, count.total, "--max-macs")
        gates.append(Gate("max-macs", count.total, allowed, count.total <= allowed))
    if cfg.quality:
        if not cfg.reference or not cfg.data:
            raise NdonnxError("--min-agreement, --max-rel-err and --max-accuracy-drop need --reference TEACHER and "
                              "--data FILE")
        from ndonnx.data import load_data
        from ndonnx.validate import validate

        teacher = load_teacher(cfg.reference)
        if student.input_names != teacher.input_names:
            raise NdonnxError(f"{model_path} and {cfg.reference} have different inputs")
        arrays = load_data(cfg.data, teacher, cfg.labels).read_all()
        labels = arrays.pop(cfg.labels) if cfg.labels else None
        v = validate(student.model, teacher.model, arrays, labels, torch_check=False)
        if cfg.min_agreement is not None:
            agree = v.get("top1_agreement")
            if agree is None:
                raise NdonnxError("--min-agreement needs classifier outputs (N x classes); use --max-rel-err")
            gates.append(Gate("min-agreement", agree, cfg.min_agreement, agree >= cfg.min_agreement))
        if cfg.max_rel_err is not None:
            gates.append(Gate("max-rel-err", v["rel_err"], cfg.max_rel_err, v["rel_err"] <= cfg.max_rel_err))
        if cfg.max_accuracy_drop is not None:
            drop = v["accuracy_teacher"] - v["accuracy_student"]
            gates.append(Gate("max-accuracy-drop", drop, cfg.max_accuracy_drop, drop <= cfg.max_accuracy_drop))
    return gates


def junit(model: str, gates: list[Gate]) -> str:
    """A JUnit XML report: one test case per gate, so CI systems show each gate."""
    fails = sum(not g.passed for g in gates)
    cases = []
    for g in gates:
        body = "" if g.passed else f"<failure message={quoteattr(g.line())}>{escape(g.line())}</failure>"
        cases.append(f'  <testcase classname="ndonnx.check" name={quoteattr(f"{g.name} {model}")}>{body}</testcase>')
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name="ndonnx check" tests="{len(gates)}" '
            f'failures="{fails}">\n' + "\n".join(cases) + "\n</testsuite>\n")


def as_json(model: str, gates: list[Gate]) -> dict:
    return {"model": model, "passed": all(g.passed for g in gates), "gates": [asdict(g) for g in gates]}
