"""End-to-end fine-tuning of the spliced student (paper Eq. 3), after search: knowledge distillation
from the teacher's cached outputs, and optionally (`finetune_hints`) from its cached boundary
tensors: the spliced student computes every neighbourhood boundary under the teacher's name and
shape, so each is a hint (FitNets) with an exact counterpart, already in the activation cache. Where its time goes: the student's forward and backward passes
(measured on the bundled ResNet-20: 96% of a step in torch's convolutions and their gradients; reading
the cache and the optimiser are the rest), so a step costs in proportion to the batch."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import onnx
import torch

from ndonnx.config import CompressConfig
from ndonnx.distill.cache import CacheReader
from ndonnx.memory import keep_freed_memory
from ndonnx.sample import with_outputs
from ndonnx.search import Scorer
from ndonnx.trainable import Trainable, write_weights


def finetune(student: onnx.ModelProto, teacher: onnx.ModelProto, cache: CacheReader, scorer: Scorer,
             cfg: CompressConfig, progress: Callable | None = None) -> tuple[onnx.ModelProto, dict]:
    """End-to-end KD of the spliced student (paper Eq. 3): soft targets at temperature T, plus
    lambda x cross-entropy when labels are known; MSE on outputs for models that are not classifiers;
    plus `finetune_hints` x the mean relative MSE of the boundary tensors (`hints`)."""
    keep_freed_memory()  # the whole student's activations each step (see ndonnx.memory)
    seed = cfg.distill.seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out_names = [o.name for o in teacher.graph.output]
    hints = hint_names(student, scorer, cache) if cfg.finetune_hints > 0 else []
    module = Trainable(with_outputs(student, hints) if hints else student)
    if not module.trainable:
        return student, {"steps": 0, "reason": "nothing to train"}
    names = module.input_names
    classifier = scorer.metric in ("accuracy", "agreement")
    opt = torch.optim.Adam(module.named_weights().values(), lr=cfg.finetune_lr)
    train = cache.train
    T, lam = cfg.temperature, cfg.kd_lambda

    def loss_on(idx):
        xs = [torch.from_numpy(cache.read(n, idx)) for n in names]
        ys = [torch.from_numpy(cache.read(n, idx)) for n in out_names]
        out = module(*xs)
        hinted = 0.0
        if hints:
            got, out = out[len(out_names):], out[:len(out_names)]
            hinted = cfg.finetune_hints * sum(_rel_mse(g, torch.from_numpy(cache.read(n, idx)))
                                              for g, n in zip(got, hints)) / len(hints)
        return hinted + kd(out, ys, idx)

    def kd(out, ys, idx):
        if classifier:
            soft = torch.nn.functional.kl_div(torch.log_softmax(out[0] / T, -1), torch.softmax(ys[0] / T, -1),
                                              reduction="batchmean") * T * T
            lab = cache.labels(idx)
            if lab is not None:
                soft = soft + lam * torch.nn.functional.cross_entropy(out[0], torch.from_numpy(lab))
            return soft
        return sum(torch.mean((o - y) ** 2) / (y.var() + 1e-12) for o, y in zip(out, ys))

    def held_out_loss():
        with torch.no_grad():
            return float(np.mean([loss_on(cache.holdout[lo:lo + 256]).item() for lo in range(0, len(cache.holdout), 256)]))

    before = held_out_loss()
    batch = min(cfg.finetune_batch, len(train))
    t0 = time.perf_counter()
    steps = range(cfg.finetune_steps)
    for _ in steps if progress is None else progress(steps, cfg.finetune_steps, "fine-tune"):
        idx = np.sort(rng.choice(train, batch, replace=False))
        opt.zero_grad(set_to_none=True)
        loss = loss_on(idx)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    after = held_out_loss()
    tuned = write_weights(student, module.weights())
    return tuned, {"steps": cfg.finetune_steps, "batch": batch, "hints": len(hints), "hints_weight": cfg.finetune_hints, "seconds_per_step": seconds / max(1, cfg.finetune_steps),
                   "held_out_loss_before": before, "held_out_loss_after": after}


def hint_names(student: onnx.ModelProto, scorer: Scorer, cache: CacheReader) -> list[str]:
    """The boundary tensors the spliced student makes under the teacher's name that the cache holds
    one float row per sample, batch first (others would need their layout undone), outputs left out."""
    made = {o for node in student.graph.node for o in node.output}
    outputs = {o.name for o in student.graph.output}
    names = dict.fromkeys(n for nbh in scorer.part.neighbourhoods for n in nbh.outputs)
    return [n for n in names if n in made and n not in outputs and n in cache.arrays
            and cache.batch_axis.get(n) == 0 and cache.per_sample.get(n, 1) == 1 and cache.dtype[n].kind == "f"]


def _rel_mse(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return torch.mean((got - want) ** 2) / (want.var() + 1e-12)
