"""End-to-end fine-tuning of the spliced student (paper Eq. 3), after search: knowledge distillation
from the teacher's cached outputs. Where its time goes: the student's forward and backward passes
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
from ndonnx.search import Scorer
from ndonnx.trainable import Trainable, write_weights


def finetune(student: onnx.ModelProto, teacher: onnx.ModelProto, cache: CacheReader, scorer: Scorer,
             cfg: CompressConfig, progress: Callable | None = None) -> tuple[onnx.ModelProto, dict]:
    """End-to-end KD of the spliced student (paper Eq. 3): soft targets at temperature T, plus
    lambda x cross-entropy when labels are known; MSE on outputs for models that are not classifiers."""
    keep_freed_memory()  # the whole student's activations each step (see ndonnx.memory)
    seed = cfg.distill.seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    module = Trainable(student)
    if not module.trainable:
        return student, {"steps": 0, "reason": "nothing to train"}
    names = module.input_names
    out_names = [o.name for o in teacher.graph.output]
    classifier = scorer.metric in ("accuracy", "agreement")
    opt = torch.optim.Adam(module.named_weights().values(), lr=cfg.finetune_lr)
    train = cache.train
    T, lam = cfg.temperature, cfg.kd_lambda

    def loss_on(idx):
        xs = [torch.from_numpy(cache.read(n, idx)) for n in names]
        ys = [torch.from_numpy(cache.read(n, idx)) for n in out_names]
        out = module(*xs)
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
    return tuned, {"steps": cfg.finetune_steps, "batch": batch, "seconds_per_step": seconds / max(1, cfg.finetune_steps),
                   "held_out_loss_before": before, "held_out_loss_after": after}
