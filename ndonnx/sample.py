"""A seeded sample through the teacher: valid random inputs (masks as booleans, ids in range) and
one onnxruntime run that records every tensor, for real shapes and round-trip references."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ndonnx import light
from ndonnx.config import SampleConfig
from ndonnx.errors import NdonnxError
from ndonnx.graph import Teacher

log = logging.getLogger(__name__)
Shape = list  # of int | str


@dataclass
class Sample:
    feeds: dict[str, np.ndarray]  # graph inputs
    values: dict[str, np.ndarray]  # every recorded tensor, graph inputs included
    shapes: dict[str, Shape]  # display/declared shapes: symbolic batch where the model has one
    batch: str | None = None  # the symbol of the primary batch dimension, if any


def with_outputs(model: onnx.ModelProto, names, nodes: Iterable[onnx.NodeProto] = ()) -> onnx.ModelProto:
    """A copy of `model` with `nodes` appended that also gives the tensors `names` as outputs (those
    it gives already once)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return light.extend(m, names, nodes)


_THREADS: list[int] = []  # onnxruntime intra-op threads of this process's sessions (`threads`); empty: its default


@contextlib.contextmanager
def threads(n: int):
    """Sessions made inside use `n` intra-op threads: a pool worker given one core keeps to it."""
    _THREADS.append(n)
    try:
        yield
    finally:
        _THREADS.pop()


def ort_session(model: onnx.ModelProto, cuda: bool = False, outputs: Iterable[str] = (),
                nodes: Iterable[onnx.NodeProto] = ()):
    """An onnxruntime session on the CPU of `model` with `nodes` appended, also giving the tensors
    `outputs` (as `with_outputs`, without copying a large model); with `cuda`, on the GPU where
    onnxruntime has its CUDA provider (the `gpu` extra), else on the CPU with a warning. A large
    model goes as a light graph (`ndonnx.light`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures reach the user as one-line errors, not runtime logs
    if _THREADS:
        opts.intra_op_num_threads = _THREADS[-1]
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    elif cuda:
        _warn_once("onnxruntime has no CUDA provider: the teacher runs on the CPU "
                   "(install the gpu extra and uninstall onnxruntime, see the README)")
    return session_of(model, opts, providers, outputs, nodes)


def session_of(model: onnx.ModelProto, opts, providers: list[str], outputs: Iterable[str] = (),
               nodes: Iterable[onnx.NodeProto] = ()):
    """`ort_session` with the caller's session options and providers."""
    if light.is_large(model):
        with light.light_path(model, outputs, nodes) as path:
            return _session(path, opts, providers)
    if outputs or nodes:
        model = with_outputs(model, outputs, nodes)
    if len(model.graph.value_info):  # recorded inner shapes help converters, but pin sample sizes in onnxruntime
        model = _without_value_info(model)
    return _session(model.SerializeToString(), opts, providers)


def _session(source: str | bytes, opts, providers: list[str]):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(source, opts, providers=providers)
    except Exception as e:  # onnxruntime refuses graphs the checker lets through (bad attributes, ops)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise NdonnxError(f"onnxruntime cannot run the model: {first}") from e


RUN_CHUNK = 64  # samples per onnxruntime run where many are scored at once


def run_chunked(sess, names: list[str], feeds: dict[str, np.ndarray], chunk: int = RUN_CHUNK) -> list[np.ndarray]:
    """`sess.run(names, feeds)` over about `chunk` samples at a time, joined: one run over the 500
    validation sentences of BERT-base held a gigabyte of activations per session. Feeds have the
    samples first (the data's layout); every output must follow them too, which the first two chunks
    show at two sizes (the first is one sample shorter); otherwise one run."""
    n = {len(v) if np.ndim(v) else -1 for v in feeds.values()}
    if len(n) != 1 or (total := n.pop()) <= chunk:
        return sess.run(names, feeds)
    bounds = [0, *range(chunk - 1, total, chunk), total]
    parts = []
    for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        outs = sess.run(names, {name: v[lo:hi] for name, v in feeds.items()})
        if k < 2 and any(np.ndim(o) == 0 or len(o) != hi - lo for o in outs):
            return sess.run(names, feeds)  # an output without the samples first: joined it would mean nothing
        parts.append(outs)
    return [np.concatenate(p) for p in zip(*parts)]


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def _without_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    return out


def _dims(vi: onnx.ValueInfoProto) -> Shape | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def index_ranges(model: onnx.ModelProto) -> dict[str, int]:
    """For integer inputs used as Gather indices into a constant table: the table size on that axis."""
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in inits:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            size = inits[node.input[0]].dims[axis]
            out[node.input[1]] = min(out.get(node.input[1], size), size)
    return out


def make_inputs(teacher: Teacher, cfg: SampleConfig = SampleConfig(),
                sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs; a symbolic dim named in `sizes` gets that size, others cfg's defaults."""
    sizes = sizes or {}
    rng = np.random.default_rng(cfg.seed)
    model = teacher.model
    ranges = index_ranges(model)
    feeds = {}
    for vi in model.graph.input:
        if vi.name not in teacher.input_names:
            continue
        dims = _dims(vi) or []
        shape = []
        for k, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif isinstance(d, str) and d in sizes:
                shape.append(sizes[d])
            elif k == 0:
                shape.append(cfg.batch)
            elif len(dims) == 4 and k >= 2:
                shape.append(cfg.spatial_dim)
            else:
                shape.append(cfg.free_dim)
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = _random(rng, shape, dtype, ranges.get(vi.name, 2))
    return feeds


def _random(rng: np.random.Generator, shape: list[int], dtype, high: int) -> np.ndarray:
    if dtype == np.bool_:
        # Each row: some True then some False, so no row is fully masked in either mask convention.
        last = shape[-1] if shape else 1
        keep = rng.integers(1, max(last, 2), size=shape[:-1] + [1]) if shape else 1
        return (np.arange(last) < keep).reshape(shape) if shape else np.array(True)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, high, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def run_sample(teacher: Teacher, cfg: SampleConfig = SampleConfig(), feeds: dict | None = None) -> Sample:
    """One onnxruntime run with every node output exposed."""
    given = feeds is not None
    feeds = feeds if given else make_inputs(teacher, cfg)
    model = teacher.model
    sess = ort_session(model, outputs=[o for node in model.graph.node for o in node.output if o])
    out_names = [o.name for o in sess.get_outputs()]
    values = dict(feeds)
    try:
        values.update(zip(out_names, sess.run(out_names, feeds)))
        del sess  # (one teacher's weights in onnxruntime at a time: the check below makes two more)
    except Exception as e:  # onnxruntime's own refusal of these inputs (an STFT pad longer than random audio)
        from ndonnx.errors import NdonnxError

        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        how = "these inputs" if given else "random inputs; give real ones with --data"
        raise NdonnxError(f"onnxruntime cannot run the model on {how}: {first}") from e
    shapes, batch = _declared_shapes(teacher, values, cfg)
    sample = Sample(feeds=feeds, values=values, shapes=shapes, batch=batch)
    check_against_file(teacher, sample)
    return sample


REWRITE_TOLERANCE = 1e-4  # relative error allowed between the file and the graph as loaded


def check_against_file(teacher: Teacher, sample: Sample) -> float | None:
    """Loading rewrote the graph (opset upgrade, folded constants, aliases, dead code): like
    onnx-simplifier, compare it with the file it came from on the sample before anything trusts
    it. Returns the largest relative error of the outputs; None where the file cannot be compared
    (not on disk, random ops, or onnxruntime cannot run the file itself)."""
    from ndonnx.errors import NdonnxError
    from ndonnx.graph import NONDETERMINISTIC_OPS
    from ndonnx.metrics import rel_err

    if not teacher.path.is_file() or {n.op_type for n in teacher.model.graph.node} & (NONDETERMINISTIC_OPS - {"Dropout"}):
        return None
    outs = [o.name for o in teacher.model.graph.output]
    feeds = sample.feeds
    try:
        original = ort_session(onnx.load(str(teacher.path)))
    except Exception:  # the file needs the upgrade to run at all: nothing to compare with
        return None
    try:
        got = original.run(outs, feeds)
    except Exception:  # a fixed batch of 1 in the file (the loaded graph has a dynamic one)
        feeds = {k: v[:1] if np.ndim(v) else v for k, v in feeds.items()}
        try:
            got = original.run(outs, feeds)
        except Exception:
            return None
    del original  # (one teacher's weights in onnxruntime at a time)
    # Not the sample's own values: with every tensor exposed onnxruntime fuses less, which moves
    # some models' outputs by far more than rounding (PP-OCRv4's detector: 26%).
    want = ort_session(teacher.model).run(outs, feeds)
    errs = {n: rel_err(g, w) for n, g, w in zip(outs, got, want)}
    name = max(errs, key=errs.get)
    if errs[name] > REWRITE_TOLERANCE:
        raise NdonnxError(f"{teacher.path}: the graph as ndonnx loads it (opset upgrade, folded constants) computes "
                          f"something else than the file: relative error {errs[name]:.2g} on output {name!r}; "
                          f"please report this model")
    return errs[name]


def _declared_shapes(teacher: Teacher, values: dict[str, np.ndarray], cfg: SampleConfig) -> tuple[dict[str, Shape], str | None]:
    """Inferred shapes where onnx knows them (symbolic dims kept), real ones where it lost them."""
    try:
        inferred_model = light.infer_shapes(teacher.model, data_prop=True)
    except Exception:  # shape inference is a help, never a requirement
        inferred_model = teacher.model
    g = inferred_model.graph
    inferred = {vi.name: _dims(vi) for vi in list(g.input) + list(g.value_info) + list(g.output)}
    batch = next((d[0] for vi in g.input if vi.name in teacher.input_names
                  and (d := _dims(vi)) and isinstance(d[0], str)), None)
    shapes = {}
    for name, v in values.items():
        if not isinstance(v, np.ndarray):
            continue
        known = inferred.get(name)
        if known is None or len(known) != v.ndim:
            known = ["?"] * v.ndim
        shapes[name] = [k if k not in (0, "?") else (batch if j == 0 and batch and r == cfg.batch else r)
                        for j, (k, r) in enumerate(zip(known, v.shape))]
    return shapes, batch


def with_dynamic_batch(teacher: Teacher) -> Teacher:
    """Distillation trains on batches. A graph input whose batch dimension is fixed at 1 (a common
    export default) gets a symbolic one when the graph really is batch-agnostic, checked in
    onnxruntime against sample-by-sample runs; otherwise the model is refused with the reason."""
    fixed = [vi for vi in teacher.model.graph.input if vi.name in teacher.input_names
             and vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].HasField("dim_value")]
    if not fixed:
        return teacher
    model = onnx.ModelProto()
    model.CopyFrom(teacher.model)
    for vi in [*model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in {f.name for f in fixed} | {o.name for o in model.graph.output} and dims \
                and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = "N"
    del model.graph.value_info[:]
    shape = "x".join(str(d.dim_value or d.dim_param) for d in fixed[0].type.tensor_type.shape.dim)
    refuse = NdonnxError(f"input {fixed[0].name!r} has a fixed batch dimension ({shape}) and the graph does not "
                         f"run on other batch sizes; distillation needs batches: export the model with a "
                         f"dynamic batch axis")
    if any(f.type.tensor_type.shape.dim[0].dim_value != 1 for f in fixed):
        raise refuse
    singles = [make_inputs(teacher, SampleConfig(seed=seed)) for seed in (0, 1)]
    try:
        want = [ort_session(teacher.model).run(None, s) for s in singles]
        got = ort_session(model).run(None, {k: np.concatenate([s[k] for s in singles]) for k in singles[0]})
    except Exception:  # onnxruntime refuses the batch of two: shapes are baked into the graph
        raise refuse from None
    for k, g in enumerate(got):
        ref = np.concatenate([w[k] for w in want])
        if g.shape != ref.shape or not np.allclose(g, ref, rtol=1e-4, atol=1e-5, equal_nan=True):
            raise refuse
    log.warning("input %r had a fixed batch of 1; distilling with a dynamic batch (the student keeps the "
                "teacher's declared shapes)", fixed[0].name)
    return Teacher(path=teacher.path, model=model, opset=teacher.opset, weights=teacher.weights)
