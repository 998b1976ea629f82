"""`ndonnx inspect`: how ndonnx reads a model, as the JSON document later stages and CI tools use.
Only the round trip needs torch; `check=False` (`--no-check`) runs without it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ndonnx.config import PartitionConfig, SampleConfig
from ndonnx.errors import FULL_INSTALL_HINT, NdonnxError, missing_full_dependency
from ndonnx.graph import load_teacher
from ndonnx.macs import MacCount, concrete_dims, count_macs
from ndonnx.partition import partition
from ndonnx.sample import run_sample


def inspect_model(path: str | Path, cfg: PartitionConfig = PartitionConfig(),
                  sample_cfg: SampleConfig = SampleConfig(), check: bool = True,
                  progress: Callable | None = None, data: str | Path | None = None) -> dict:
    """Load, partition and round-trip every neighbourhood. `progress(iterable, total, label)`
    wraps the round-trip loop (the CLI passes a progress bar). With `data`, the sample is its first
    samples instead of random inputs (audio longer than the random one, a sample-rate input)."""
    teacher = load_teacher(path)
    if check:
        try:
            from ndonnx.convert import round_trip
        except ImportError as e:
            if not missing_full_dependency(e):
                raise
            raise NdonnxError(f"the torch round trip needs {missing_full_dependency(e)}, which is not installed: "
                              f"use --no-check, or {FULL_INSTALL_HINT}") from e
    part = partition(teacher, cfg)
    feeds = None
    if data is not None:
        from ndonnx.data import load_data

        feeds = load_data(data, teacher).head(sample_cfg.batch)
    sample = run_sample(teacher, sample_cfg, feeds=feeds)
    model = teacher.model
    macs, macs_error = _macs(model, sample.feeds)
    rows = []
    items = part.neighbourhoods
    if progress is not None and check:
        items = progress(items, len(items), "round trip")
    for nbh in items:
        rt = round_trip(teacher, nbh, sample) if check else None
        rows.append({
            "id": nbh.id,
            "inputs": list(nbh.inputs),
            "side_inputs": list(nbh.side_inputs),
            "shape_inputs": list(nbh.shape_inputs),
            "outputs": list(nbh.outputs),
            "input_shapes": [sample.shapes[n] for n in nbh.inputs],
            "side_input_shapes": [sample.shapes[n] for n in nbh.side_inputs],
            "output_shapes": [sample.shapes[n] for n in nbh.outputs],
            "params": nbh.params,
            "macs": macs.of(nbh.nodes) if macs else None,
            "op_types": nbh.op_types(model),
            "convertible": rt.convertible if rt else None,
            "reason": rt.reason if rt else "not checked",
            "rel_err": rt.rel_err if rt else None,
        })
    return {
        "model": str(path),
        "opset": teacher.opset,
        "params": teacher.params,
        "outside_params": part.outside_params,
        "macs": macs.total if macs and not macs.uncounted else None,
        "macs_uncounted": [why for _, why in macs.uncounted] if macs else [macs_error],
        # the input shapes the MACs are for: one sample, other dims as in the sample run
        "macs_inputs": {n: [1, *v.shape[1:]] for n, v in sample.feeds.items() if getattr(v, "ndim", 0)},
        "primary_input": part.primary_input,
        "inputs": teacher.input_names,
        "outputs": [o.name for o in model.graph.output],
        "neighbourhoods": rows,
    }


def _macs(model, feeds) -> tuple[MacCount | None, str | None]:
    """MACs for one sample, other symbolic dims as in the sample run; (None, why) when shape inference fails."""
    try:
        return count_macs(model, concrete_dims(model, feeds)), None
    except NdonnxError as e:
        return None, str(e)
