"""`ndonnx sensitivity` (paper section 3, the thresholding effect): Gaussian noise added to each
neighbourhood's output, one neighbourhood at a time and all together, and the score lost.

The noise amplitude is relative: eps times the standard deviation of that output on the data, so
one eps means the same perturbation for every neighbourhood whatever its scale."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx
from onnx import helper

from ndonnx.data import load_data
from ndonnx.errors import NdonnxError
from ndonnx.files import atomic_path
from ndonnx.graph import load_teacher
from ndonnx.partition import partition
from ndonnx.sample import ort_session, with_dynamic_batch
from ndonnx.metrics import metric_name, score_outputs

DEFAULT_EPS = (0.01, 0.03, 0.1, 0.3, 1.0)


def inject_noise(model: onnx.ModelProto, scales: dict[str, float], seed: int) -> onnx.ModelProto:
    """`model` with `tensor + N(0, scale^2)` in place of each named tensor (seeded). A zero scale
    adds nothing (onnxruntime aborts on a zero-width normal distribution)."""
    scales = {k: v for k, v in scales.items() if v > 0}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        nodes.append(node)
        for k, name in enumerate(node.output):
            if name in scales:
                clean = f"{name}__clean"
                node.output[k] = clean
                nodes.append(helper.make_node("RandomNormalLike", [clean], [f"{name}__noise"], scale=float(scales[name]),
                                              seed=float(seed + len(nodes))))
                nodes.append(helper.make_node("Add", [clean, f"{name}__noise"], [name]))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def sensitivity(model_path: str | Path, data_path: str | Path, labels_key: str | None = None,
                eps: tuple[float, ...] = DEFAULT_EPS, max_drop: float = 0.01, samples: int = 512,
                seed: int = 0, progress: Callable | None = None) -> dict:
    if samples < 1:
        raise NdonnxError(f"--samples must be >= 1, got {samples}")
    if max_drop < 0:
        raise NdonnxError(f"--max-drop must be >= 0, got {max_drop}")
    teacher = with_dynamic_batch(load_teacher(model_path))
    part = partition(teacher)
    arrays = load_data(data_path, teacher, labels_key).read_all()
    labels = arrays.pop(labels_key)[:samples] if labels_key else None
    feeds = {k: v[:samples] for k, v in arrays.items()}
    outputs = [o.name for o in teacher.model.graph.output]
    cuts = list(dict.fromkeys(o for n in part.neighbourhoods for o in n.outputs))  # multi-tensor boundaries: all
    probe = ort_session(teacher.model, outputs=cuts)
    values = dict(zip([o.name for o in probe.get_outputs()], probe.run(None, feeds)))
    reference = [values[o] for o in outputs]
    std = {c: float(values[c].std()) for c in cuts}
    base = score_outputs(reference, reference, labels)

    def drop(targets: list[str], e: float) -> float:
        noisy = inject_noise(teacher.model, {c: e * std[c] for c in targets}, seed)
        return base - score_outputs(ort_session(noisy).run(outputs, feeds), reference, labels)

    rows = []
    steps = [*part.neighbourhoods, None]  # None: every boundary at once
    for nbh in steps if progress is None else progress(steps, len(steps), "sensitivity"):
        drops = [drop(cuts if nbh is None else list(nbh.outputs), e) for e in eps]
        if nbh is not None:
            rows.append({"neighbourhood": nbh.id, "tensor": ", ".join(nbh.outputs), "params": nbh.params,
                         "drops": drops, "threshold": _threshold(eps, drops, max_drop)})
    together = drops
    return {"model": str(model_path), "metric": metric_name(reference, labels), "score": base, "eps": list(eps),
            "max_drop": max_drop, "samples": len(next(iter(feeds.values()))), "neighbourhoods": rows,
            "all": {"drops": together, "threshold": _threshold(eps, together, max_drop)}}


def _threshold(eps, drops, max_drop) -> float | None:
    """The largest eps up to which every drop stays within max_drop (None: not even the smallest)."""
    best = None
    for e, d in zip(eps, drops):
        if d > max_drop:
            break
        best = e
    return best


def plot(report: dict, path: str | Path) -> Path:
    """Score drop against eps: one line per neighbourhood, and all together in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["neighbourhoods"]:
        ax.plot(report["eps"], r["drops"], marker=".", alpha=0.7, label=f"neighbourhood {r['neighbourhood']}")
    ax.plot(report["eps"], report["all"]["drops"], color="black", linewidth=2.5, marker="o", label="all together")
    ax.axhline(report["max_drop"], color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("noise amplitude eps (x the output's std)")
    ax.set_ylabel(f"{report['metric']} drop")
    ax.set_title("sensitivity of each neighbourhood to noise on its output")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
