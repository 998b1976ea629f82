"""`--quantize`: the finished student (spliced, and fine-tuned when asked) to 8-bit integers with
onnxruntime's own quantizer (`onnxruntime.quantization`), before it is validated and written.

`int8` chooses the method by where the parameters lie (`choose_method`): static QDQ when Conv and
ConvTranspose layers hold at least half of the parameters of the Conv, ConvTranspose, MatMul and
Gemm layers (conv nets), dynamic otherwise (MatMul-heavy transformers). `int8-static` and
`int8-dynamic` force one.

- static: QuantizeLinear/DequantizeLinear pairs around each quantized op (the QDQ format
  onnxruntime's CPU kernels fuse), uint8 activations whose ranges are calibrated (min/max) on
  `CALIBRATION_SAMPLES` samples of the run's own training split, drawn with the run's seed, int8
  weights per output channel, int32 biases;
- dynamic: int8 weights per output channel (MatMulInteger, ConvInteger), activations quantized at
  run time from their own range, embedding tables (Gather) quantized too; no calibration.

uint8 activations with int8 weights is what onnxruntime recommends for x86 CPUs; weights keep all 8
bits (no `reduce_range`), which suits CPUs with VNNI (AVX512-VNNI, AVX-VNNI) and ARM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, version_converter

from ndonnx.config import QUANTIZE
from ndonnx.errors import GoalNotMet, NdonnxError
from ndonnx.graph import onnx_opset, weight_counts

CALIBRATION_SAMPLES = 256
CALIBRATION_BATCH = 32
STATIC_MIN_CONV_SHARE = 0.5  # int8: static when Conv/ConvTranspose hold at least this share
CONV_OPS = ("Conv", "ConvTranspose")
MATMUL_OPS = ("MatMul", "Gemm")
TWO_GB = 2**31 - 1
PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis` (per-channel weights in QDQ) came with opset 13


class QuantizeFailed(GoalNotMet):
    """onnxruntime's quantizer could not quantize the student: nothing is written (exit 1)."""


def parameter_shares(model: onnx.ModelProto) -> dict:
    """Parameters read by Conv/ConvTranspose and by MatMul/Gemm layers (weights and biases; a weight
    read by both kinds counts for the first), and the conv share of their sum."""
    weights = weight_counts(model)
    kind: dict[str, str] = {}
    for node in model.graph.node:
        group = "conv" if node.op_type in CONV_OPS else "matmul" if node.op_type in MATMUL_OPS else None
        if group:
            for name in node.input:
                if name in weights:
                    kind.setdefault(name, group)
    conv = sum(weights[n] for n, k in kind.items() if k == "conv")
    matmul = sum(weights[n] for n, k in kind.items() if k == "matmul")
    return {"conv_params": conv, "matmul_params": matmul,
            "conv_share": conv / (conv + matmul) if conv + matmul else None}


def choose_method(model: onnx.ModelProto, requested: str = "int8") -> tuple[str, dict]:
    """'static' or 'dynamic' for `--quantize requested`, and the figures the rule read."""
    if requested not in QUANTIZE:
        raise NdonnxError(f"--quantize must be {', '.join(QUANTIZE)}, got {requested!r}")
    shares = parameter_shares(model)
    if shares["conv_share"] is None:
        raise NdonnxError("--quantize: the student has no Conv, ConvTranspose, MatMul or Gemm weights to quantize")
    if requested != "int8":
        return requested.removeprefix("int8-"), shares
    return ("static" if shares["conv_share"] >= STATIC_MIN_CONV_SHARE else "dynamic"), shares


def calibration_feeds(cache, model: onnx.ModelProto, seed: int, samples: int = CALIBRATION_SAMPLES) -> dict:
    """Inputs of up to `samples` samples of the run's training split (seeded), in the model's dtypes."""
    train = np.asarray(cache.train)
    idx = np.sort(np.random.default_rng(seed).choice(train, min(samples, len(train)), replace=False))
    feeds = {}
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = np.ascontiguousarray(cache.read(vi.name, idx), dtype=dtype)
    return feeds


def _reader(feeds: dict, batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """The calibration inputs in batches of `batch` samples."""

        def __init__(self):
            n = len(next(iter(feeds.values())))
            self.batches = iter([{k: v[lo:lo + batch] for k, v in feeds.items()} for lo in range(0, n, batch)])

        def get_next(self):
            return next(self.batches, None)

    return Reader()


@contextlib.contextmanager
def _quiet():
    """The quantizer logs advice ('consider pre-processing') on the root logger: not the user's."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def quantize(model: onnx.ModelProto, requested: str, feeds: dict | None) -> tuple[onnx.ModelProto, dict]:
    """The quantized model (same inputs and outputs) and what was done, for the report. `feeds`
    (calibration inputs, `calibration_feeds`) are needed for the static method only. Raises
    QuantizeFailed when onnxruntime's quantizer fails; it writes nothing the caller sees."""
    method, shares = choose_method(model, requested)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    src = onnx.ModelProto()
    src.CopyFrom(model)
    del src.graph.value_info[:]  # shapes recorded at the sample batch would pin the calibration batch
    info = {"requested": requested, "method": method, **shares,
            "rule": f"int8: static when Conv/ConvTranspose hold >= {STATIC_MIN_CONV_SHARE:.0%} of the Conv, "
                    f"ConvTranspose, MatMul and Gemm parameters, else dynamic",
            "weights": "int8, per output channel"}
    large = src.ByteSize() > TWO_GB
    with tempfile.TemporaryDirectory(prefix="ndonnx-quantize-") as tmp, _quiet():
        out = Path(tmp) / "quantized.onnx"
        try:
            if method == "static":
                if not feeds:
                    raise NdonnxError("--quantize int8-static needs calibration data; this run has none")
                if onnx_opset(src) < PER_CHANNEL_OPSET:
                    info["opset"] = f"{onnx_opset(src)} -> {PER_CHANNEL_OPSET} (per-channel QDQ needs it)"
                    src = version_converter.convert_version(src, PER_CHANNEL_OPSET)
                    src.ir_version = max(src.ir_version, helper.find_min_ir_version_for(src.opset_import))
                n = len(next(iter(feeds.values())))
                quantize_static(src, str(out), _reader(feeds, CALIBRATION_BATCH), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large)
                info |= {"format": "QDQ", "activations": "uint8, calibrated (min/max)", "calibration_samples": n}
            else:
                quantize_dynamic(src, str(out), per_channel=True, weight_type=QuantType.QInt8,
                                 use_external_data_format=large)
                info |= {"format": "integer ops (MatMulInteger, ConvInteger)",
                         "activations": "uint8, quantized at run time"}
            quantized = onnx.load(str(out))
            onnx.checker.check_model(str(out))  # by path: a model past 2 GB is checked too
        except NdonnxError:
            raise
        except Exception as e:  # the quantizer's own failures: one line, nothing written
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise QuantizeFailed(f"--quantize {requested}: onnxruntime's {method} quantizer failed: {first}") from e
    del quantized.graph.value_info[:]  # the quantizer's inferred shapes: the float student carries none either
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)
    quantized.metadata_props.add(key="ndonnx.quantize", value=json.dumps({"requested": requested, "method": method}))
    return quantized, info
