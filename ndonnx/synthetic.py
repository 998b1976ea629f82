"""Synthetic inputs for data-free distillation, made from the teacher alone.

`bn-stats` (DeepInversion, Yin et al. 2020; ZeroQ, Cai et al. 2020): the teacher's float inputs are
optimised with Adam so that every BatchNormalization sees, on each batch, the statistics it stored
while training: the loss is the sum over BatchNormalization layers of
||mu_batch - running_mean||^2 + ||sigma_batch - sqrt(running_var + eps)||^2 (per channel, averaged
over channels), plus a small total-variation and L2 prior on the inputs. The teacher runs in torch
(onnx2torch) with every BatchNormalization input exposed as an extra graph output.

`inversion` (DeepInversion's output term alone): for a classifier without BatchNormalization
statistics (exports fold them into the convolutions), the inputs are optimised with the same priors
until the teacher assigns them to its classes in turn (cross-entropy to balanced targets).

Either way the inputs then run through the teacher like real data: every boundary gets the
teacher's own activations (ReLU sparsity, spatial correlation), and the normal data path (cache,
training, search, fine-tuning) is used unchanged. Optimisation starts from noise, blurred per image
for image inputs.

`noise`: seeded standard-normal inputs (masks and token ids valid), with every neighbourhood trained
on Gaussian noise at its boundary (`ndonnx.distill.job.Batches`); the inputs only give the held-out
set its scores. `auto` picks bn-stats where the teacher has BatchNormalization, else inversion for
a classifier, else noise.

The inputs are written once per run directory (`synthetic.npz`, atomically) with the key they were
made under; a rerun with the same key reuses them, another method, seed, count or teacher
regenerates them. Each optimised batch is kept as it finishes (`synthetic.parts/`), so an interrupted
run resumes from the last finished batch.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ndonnx.config import SampleConfig
from ndonnx.errors import NdonnxError
from ndonnx.files import atomic_path
from ndonnx.graph import Teacher, attr

log = logging.getLogger(__name__)
METHODS = ("auto", "bn-stats", "inversion", "noise")
KEY = "ndonnx_synthetic_key"  # the array of synthetic.npz that records what the inputs were made from


@dataclass(frozen=True)
class SyntheticConfig:
    method: str = "bn-stats"  # bn-stats | inversion | noise (resolve "auto" first: `resolve_method`)
    count: int = 512  # inputs made
    seed: int = 0
    batch: int = 128  # inputs optimised together: the batch statistics are taken over them
    steps: int = 50  # Adam steps per batch
    lr: float = 0.1  # cosine-decayed
    tv: float = 0.05  # total-variation prior, times the mean squared difference of neighbouring pixels
    l2: float = 0.001  # L2 prior, times the inputs' mean square

    def __post_init__(self) -> None:
        if self.method not in METHODS[1:]:
            raise NdonnxError(f"--data-free-method must be {', '.join(METHODS)}, got {self.method!r}")
        if self.count < 2 or self.batch < 2 or self.steps < 1:
            raise NdonnxError("synthetic inputs: count and batch must be >= 2, steps >= 1")

    def key(self, teacher_digest: str) -> str:
        return json.dumps({"teacher": teacher_digest, **asdict(self)}, sort_keys=True)


@dataclass(frozen=True)
class BNLayer:
    input: str  # the tensor the layer normalises
    mean: np.ndarray  # running mean, per channel
    std: np.ndarray  # sqrt(running variance + epsilon), per channel


def bn_layers(model: onnx.ModelProto) -> list[BNLayer]:
    """The teacher's BatchNormalization layers in inference mode with constant statistics."""
    inits = {i.name: i for i in model.graph.initializer}
    out, seen = [], set()
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or attr(node, "training_mode", 0):
            continue
        if len(node.input) < 5 or not all(n in inits for n in node.input[3:5]) or node.input[0] in seen:
            continue
        mean = numpy_helper.to_array(inits[node.input[3]]).astype(np.float32)
        var = numpy_helper.to_array(inits[node.input[4]]).astype(np.float32)
        eps = float(attr(node, "epsilon", 1e-5))
        seen.add(node.input[0])
        out.append(BNLayer(node.input[0], mean, np.sqrt(np.maximum(var, 0) + eps)))
    return out


def resolve_method(teacher: Teacher, requested: str) -> tuple[str, str | None]:
    """`auto` -> bn-stats where the teacher has BatchNormalization statistics and float inputs to
    optimise; else inversion where it is a classifier; else noise. Returns the method and, for a
    fallback, what was missing and what is used instead (for the log)."""
    if requested not in METHODS:
        raise NdonnxError(f"--data-free-method must be {', '.join(METHODS)}, got {requested!r}")
    if requested == "noise":
        return "noise", None
    floats, classes = _float_inputs(teacher), classifier_classes(teacher)
    if not floats:
        why = "the teacher has no float input to optimise"
    elif not bn_layers(teacher.model):
        why = ("the teacher has no BatchNormalization statistics to match (folded into its convolutions, or "
               "an architecture without them)")
    else:
        why = None
    if requested == "bn-stats" or (requested == "auto" and why is None):
        if why is not None:
            raise NdonnxError(f"--data-free-method bn-stats: {why}; use --data-free-method inversion or noise")
        return "bn-stats", None
    if floats and classes:
        return "inversion", (None if requested == "inversion" else
                             f"data-free: {why}; falling back to class inversion (inputs optimised until the teacher "
                             f"assigns them to each of its {classes} classes in turn)")
    if requested == "inversion":
        raise NdonnxError("--data-free-method inversion: " + (why if not floats else
                          "the teacher's first output is not classifier logits (batch x classes)"))
    return "noise", f"data-free: {why or 'the teacher is not a classifier'}; falling back to Gaussian noise at each boundary"


def classifier_classes(teacher: Teacher) -> int | None:
    """The class count when the teacher's first output is float logits of shape (batch, classes)."""
    from onnx import helper

    out = teacher.model.graph.output[0].type.tensor_type
    dims = out.shape.dim
    if not np.issubdtype(helper.tensor_dtype_to_np_dtype(out.elem_type), np.floating) or len(dims) != 2:
        return None
    return dims[1].dim_value if dims[1].HasField("dim_value") and dims[1].dim_value >= 2 else None


def _float_inputs(teacher: Teacher) -> list[str]:
    from onnx import helper

    return [vi.name for vi in teacher.model.graph.input if vi.name in teacher.input_names
            and np.issubdtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type), np.floating)]


STALLED = 0.01  # a first batch whose loss fell by less than this (relative) by half its steps has stalled


def generate(teacher: Teacher, cfg: SyntheticConfig, progress: Callable | None = None,
             parts: Path | None = None, key: str = "") -> dict[str, np.ndarray]:
    """`cfg.count` inputs per graph input, seeded: the same teacher and config give the same arrays.
    With `parts`, each optimised batch is kept there as it finishes (under `key`), and batches
    found there are not made again: an interrupted run resumes."""
    from ndonnx.sample import make_inputs

    base = make_inputs(teacher, SampleConfig(seed=cfg.seed, batch=cfg.count))
    if cfg.method == "noise":
        return base
    resolve_method(teacher, cfg.method)  # refuses a method the teacher cannot serve
    return _optimise(teacher, cfg, base, progress, parts, key)


def _part(parts: Path | None, lo: int, key: str) -> dict[str, np.ndarray] | None:
    """The batch starting at `lo`, if it was kept under `key`."""
    path = parts / f"{lo:07d}.npz" if parts is not None else None
    if path is None or not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if KEY in z.files and str(z[KEY]) == key:
                return {k: z[k] for k in z.files if k != KEY}
    except (OSError, ValueError):  # cut short: made again
        pass
    return None


def _keep(parts: Path | None, lo: int, key: str, arrays: dict[str, np.ndarray]) -> None:
    if parts is None:
        return
    parts.mkdir(parents=True, exist_ok=True)
    with atomic_path(parts / f"{lo:07d}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, **{KEY: np.array(key)})


def _optimise(teacher: Teacher, cfg: SyntheticConfig, base: dict[str, np.ndarray],
              progress: Callable | None, parts: Path | None = None, key: str = "") -> dict[str, np.ndarray]:
    """Adam on the float inputs, batch by batch; the other inputs (masks, ids) stay as drawn. A
    first batch whose loss does not fall (by STALLED in half its steps) stops it: the rest keep their
    starting points, with a warning that says what to try."""
    import torch

    torch.manual_seed(cfg.seed)
    layers = bn_layers(teacher.model) if cfg.method == "bn-stats" else []
    run = _torch_teacher(teacher.model, layers)
    floats = _float_inputs(teacher)
    names = [i.name for i in teacher.model.graph.input if i.name in teacher.input_names]
    means = [torch.from_numpy(l.mean) for l in layers]
    stds = [torch.from_numpy(l.std) for l in layers]
    classes = classifier_classes(teacher) if cfg.method == "inversion" else None
    out = {k: v.copy() for k, v in base.items()}
    starts = list(range(0, cfg.count, cfg.batch))
    kept = {lo: _part(parts, lo, key) for lo in starts}
    for lo, arrays in kept.items():
        if arrays is not None:
            for n, x in arrays.items():
                out[n][lo:lo + len(x)] = x
    if any(v is not None for v in kept.values()):
        log.info("synthetic inputs: %d of %d batches kept from an interrupted run", sum(v is not None for v in
                                                                                         kept.values()), len(starts))
    steps = [(lo, s) for lo in starts if kept[lo] is None for s in range(cfg.steps)]
    shown = steps if progress is None else progress(steps, len(steps), f"synthetic ({cfg.method})")
    t0 = time.perf_counter()
    first = last = None
    stalled = False
    xs = opt = sched = target = None
    for lo, step in shown:
        hi = min(lo + cfg.batch, cfg.count)
        if step == 0:  # each batch seeded on its own: a resumed run makes the same inputs
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + lo)
            xs = {n: _initial(base[n][lo:hi].shape, gen).requires_grad_(True) for n in floats}
            if stalled:  # what it starts from is all a stalled run gives
                _done(out, xs, lo, hi, parts, key)
                continue
            opt = torch.optim.Adam(xs.values(), lr=cfg.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.steps))
            target = torch.arange(lo, hi) % classes if classes else None
        if stalled:
            continue
        fixed = {n: torch.from_numpy(base[n][lo:hi]) for n in names if n not in xs}
        outs, feats = run(*[xs[n] if n in xs else fixed[n] for n in names])
        if classes:
            main = torch.nn.functional.cross_entropy(outs[0], target)
        else:
            main = bn_loss(feats, means, stds)
        loss = main + sum(cfg.tv * total_variation(x) + cfg.l2 * x.pow(2).mean() for x in xs.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = main.item()
        first = last if first is None else first
        if lo == steps[0][0] and step == cfg.steps // 2 and cfg.steps >= 4 and last > (1 - STALLED) * first:
            stalled = True
            what = "cross-entropy" if classes else "BatchNormalization loss"
            log.warning("synthetic inputs (%s): the %s did not fall (%.4g -> %.4g in %d steps); stopped, the "
                        "inputs stay as they started. Try --data-free-method noise, or a few real inputs as "
                        "--data", cfg.method, what, first, last, step + 1)
            _done(out, xs, lo, hi, parts, key)
            continue
        if step == cfg.steps - 1:
            _done(out, xs, lo, hi, parts, key)
    if first is not None:
        log.info("%s: %d inputs in %.1f s, %s %.4g -> %.4g (first and last step)", cfg.method, cfg.count,
                 time.perf_counter() - t0, "cross-entropy" if classes else "BatchNormalization loss", first, last)
    return out


def _done(out: dict, xs: dict, lo: int, hi: int, parts: Path | None, key: str) -> None:
    """A batch finished: into the inputs, and kept (`parts`)."""
    for n, x in xs.items():
        out[n][lo:hi] = x.detach().numpy().astype(out[n].dtype)
    _keep(parts, lo, key, {n: out[n][lo:hi] for n in xs})


def _initial(shape: tuple, gen):
    """Where the optimisation starts: standard-normal noise, for images (rank 4, 8 x 8 or larger)
    blurred per image by a Gaussian of 0.5 to 3 pixels and standardised, as images are spatially
    correlated."""
    import torch

    x = torch.randn(shape, generator=gen)
    if len(shape) != 4 or min(shape[2:]) < 8:
        return x
    sigma = 0.5 + 2.5 * torch.rand(shape[0], generator=gen)
    out = torch.empty_like(x)
    for k in range(shape[0]):
        r = min(int(3 * float(sigma[k])) + 1, min(shape[2:]) // 2 - 1)
        g = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * float(sigma[k]) ** 2))
        g = (g / g.sum()).to(x.dtype)
        y = x[k:k + 1].transpose(0, 1)  # channels as the batch: one kernel for all
        y = torch.nn.functional.conv2d(torch.nn.functional.pad(y, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1))
        y = torch.nn.functional.conv2d(torch.nn.functional.pad(y, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1))
        out[k] = y.transpose(0, 1)[0]
    return (out - out.mean((1, 2, 3), keepdim=True)) / (out.std((1, 2, 3), keepdim=True) + 1e-6)


def bn_loss(feats, means, stds):
    """Sum over layers of the channel-averaged squared distance between the batch's mean and std
    and the layer's running ones (channels on axis 1, statistics over every other axis)."""
    import torch

    total = torch.zeros(())
    for f, m, s in zip(feats, means, stds):
        axes = [k for k in range(f.dim()) if k != 1]
        mu = f.mean(axes)
        sigma = (f.var(axes, unbiased=False) + 1e-8).sqrt()
        total = total + ((mu - m) ** 2).mean() + ((sigma - s) ** 2).mean()
    return total


def bn_statistics_loss(teacher: Teacher, inputs: dict[str, np.ndarray]) -> float:
    """The BatchNormalization loss of `inputs` (one batch): what `bn-stats` minimises, for checks."""
    import torch

    layers = bn_layers(teacher.model)
    run = _torch_teacher(teacher.model, layers)
    names = [i.name for i in teacher.model.graph.input if i.name in teacher.input_names]
    with torch.no_grad():
        _, feats = run(*[torch.from_numpy(np.asarray(inputs[n])) for n in names])
    return float(bn_loss(feats, [torch.from_numpy(l.mean) for l in layers], [torch.from_numpy(l.std) for l in layers]))


def total_variation(x):
    """Mean squared difference between neighbours along the trailing (spatial) axes, rank >= 3."""
    import torch

    if x.dim() < 3:
        return torch.zeros(())
    return sum((x.diff(dim=d) ** 2).mean() for d in range(2, x.dim()))


def _with_bn_outputs(model: onnx.ModelProto, layers: list[BNLayer]) -> tuple[onnx.ModelProto, list[int]]:
    """The model with every layer's input as a graph output too; returns it and, per layer, the
    position of that input among the outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    known = {vi.name: vi for vi in out.graph.value_info}
    names = [o.name for o in out.graph.output]
    for layer in layers:
        if layer.input not in names:
            out.graph.output.append(known.get(layer.input, onnx.ValueInfoProto(name=layer.input)))
            names.append(layer.input)
    return out, [names.index(layer.input) for layer in layers]


def _torch_teacher(model: onnx.ModelProto, layers: list[BNLayer]):
    """The teacher in torch: a function of its inputs returning (its outputs, the layers' inputs in
    `layers` order)."""
    from ndonnx.convert import to_torch

    exposed, where = _with_bn_outputs(model, layers)
    module = to_torch(exposed)
    module.requires_grad_(False)
    n_out = len(model.graph.output)

    def run(*inputs):
        res = module(*inputs)
        res = list(res) if isinstance(res, (tuple, list)) else [res]
        return res[:n_out], [res[k] for k in where]

    return run


def cached_inputs(teacher: Teacher, path: Path, cfg: SyntheticConfig, teacher_digest: str,
                  progress: Callable | None = None) -> Path:
    """`path` holding the inputs made under `cfg`: reused when its key matches, else (re)made and
    written atomically."""
    key = cfg.key(teacher_digest)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                stored = str(z[KEY]) if KEY in z.files else None
        except (OSError, ValueError):
            stored = None
        if stored == key:
            log.info("reusing the synthetic inputs in %s", path)
            return path
        log.info("synthetic inputs in %s were made otherwise; making them anew", path)
    t0 = time.perf_counter()
    parts = path.with_name(path.stem + ".parts")  # finished batches, until the whole is written
    arrays = generate(teacher, cfg, progress, parts, key)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, **{KEY: np.array(key)})
    shutil.rmtree(parts, ignore_errors=True)
    log.info("%s: %d synthetic inputs (%s) in %.1f s", path, cfg.count, cfg.method, time.perf_counter() - t0)
    return path
