"""Neighbourhood Distillation against end-to-end knowledge distillation on Fashion-MNIST, one run, one machine.

The teacher is the bundled ResNet-20 (models/resnet20_fmnist.onnx). Every student has the same architecture
and parameter budget: ResNet-20 with each residual block's inner channels at `--width` (0.5: about half the
parameters). Arms, each timed by wall seconds of training (evaluation excluded), accuracy on the test set:

  (a) ce        cross-entropy from scratch (the teacher's own recipe: SGD, one-cycle, crop+flip)
  (b) kd        end-to-end KD from scratch (Hinton: T^2 KL at temperature T + lambda x CE), T and lambda
                tuned on a held-out tenth of the training set, then trained like (a)
  (c) prune_kd  the teacher's channels kept by ndonnx's width importance (L1), then end-to-end KD
                fine-tuning of the whole pruned network (what pruning tools do)
  (d) nd        Neighbourhood Distillation (ndonnx distill, width candidates only), no end-to-end step
  (e) ndft      (d) then the same end-to-end KD fine-tuning as (c)
  (f) search    ndonnx's student search against a uniform width multiplier, at the uniform student's
                parameter count, for several widths (no fine-tuning)
  and data-free ND at width 0.75 (Gaussian inputs, no images), before fine-tuning.

speedup = seconds (b) needs to first reach accuracy A / seconds (e) needs, A = the lower of the two final
accuracies minus 0.2 points; speedup_vs_prune_kd likewise against (c). (e)'s seconds include the
activation cache and every distillation job.

Equal budgets (`equal_budgets` in the JSON): every training arm's test accuracy after the same seconds
(15, 30, 60, 120, 300, ... up to the longest arm's end), read off its accuracy-vs-time curve: the last
evaluation at or before the budget (each arm is also evaluated just before it crosses each budget, so
the reading is at most a step early). Two clocks: wall seconds, and CPU seconds of this process plus
its child processes (ND's pool workers). The machine is shared and the arms run one after another,
so an arm's wall seconds depend on what else ran meanwhile; its CPU seconds count the work it did.
Arms past their end keep their final accuracy (`ended`); ND + FT has none before ND is done.

    python bench/nd_vs_kd.py --out nd_vs_kd.json            # full run (all 60,000 / 10,000 images)
    python bench/nd_vs_kd.py --quick --out results.json     # a subset and fewer steps (< 15 min here)

Data: Debian's dataset-fashion-mnist (installed with apt-get when missing and run as root), or with
--from-npz the bundled 2,000 + 2,000 images in models/. Writes the JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
import train_resnet20 as tr  # noqa: E402  (the teacher's data, model and recipe: one place for each)

from ndonnx.compress import open_run  # noqa: E402
from ndonnx.config import DistillConfig  # noqa: E402
from ndonnx.files import atomic_write_text  # noqa: E402
from ndonnx.distill.layout import job_stem  # noqa: E402
from ndonnx.distill.runner import distill  # noqa: E402
from ndonnx.graph import load_teacher  # noqa: E402
from ndonnx.sample import ort_session  # noqa: E402
from ndonnx.search import search, total_params  # noqa: E402
from ndonnx.splice import splice  # noqa: E402
from ndonnx.trainable import Trainable  # noqa: E402

TEACHER = ROOT / "models" / "resnet20_fmnist.onnx"
KEYS = ("teacher_acc", "kd_acc", "kd_seconds", "prune_kd_acc", "prune_kd_seconds", "nd_acc", "nd_seconds",
        "ndft_acc", "ndft_seconds", "speedup", "speedup_vs_prune_kd", "search_acc", "uniform_acc",
        "params_teacher", "params_student", "nd_cpu_seconds", "equal_budgets")


@dataclass(frozen=True)
class BenchConfig:
    train_images: int | None = None  # None: all 60,000
    test_images: int | None = None  # None: all 10,000
    width: float = 0.5  # the students' inner-channel multiplier (the parameter budget)
    epochs: float = 5.0  # from-scratch arms (a), (b): the teacher's own schedule
    tune_epochs: float = 1.0  # each (T, lambda) trial of (b)
    grid: tuple = ((2.0, 0.5), (4.0, 0.5), (4.0, 0.1), (8.0, 0.1))  # (T, lambda) tried for (b)
    ft_epochs: float = 2.0  # end-to-end KD fine-tuning of (c) and (e)
    ft_lrs: tuple = (1e-4, 3e-4, 1e-3)  # Adam rates tried for (c); (e) takes the one (c) chose
    ft_tune_epochs: float = 0.5
    nd_images: int = 10000  # calibration images for ND (no augmentation)
    nd_steps: int = 800  # steps per distillation job
    search_steps: int = 400  # per job of (f)'s run, which trains 8 candidates per neighbourhood
    widths: tuple = (0.25, 0.375, 0.5, 0.625, 0.75)  # (f)'s budgets
    datafree_width: float = 0.75
    evals: int = 16  # test-set evaluations per training run (the accuracy-vs-time curve)
    budgets: tuple = (15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)  # seconds, both clocks (equal_budgets)
    batch: int = 128
    seed: int = 0


QUICK = dict(train_images=8000, test_images=2000, epochs=4.0, tune_epochs=1.0, grid=((4.0, 0.5), (4.0, 0.1)),
             ft_epochs=2.0, ft_lrs=(1e-4, 3e-4), ft_tune_epochs=1.0, nd_images=4000, nd_steps=400, search_steps=200,
             widths=(0.25, 0.5, 0.75), evals=6)


# ------------------------------------------------------------------------------------------------ data


def _ensure_dataset() -> None:
    if all(tr._find(f) for f in tr.FILES.values()) or os.geteuid() != 0:
        return  # tr.load_fashion_mnist says how to install it when it is still missing
    print(f"installing {tr.PACKAGE} with apt-get", flush=True)
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if subprocess.run(["apt-get", "install", "-y", "-q", tr.PACKAGE], **quiet).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], **quiet)
        subprocess.run(["apt-get", "install", "-y", "-q", tr.PACKAGE], **quiet)


def load(cfg: BenchConfig, from_npz: bool) -> dict[str, torch.Tensor]:
    """Normalised float images (N, 1, 28, 28) and int64 labels."""
    if from_npz:
        arrays = {}
        for split, name in (("train", "fmnist_subset.npz"), ("test", "fmnist_test.npz")):
            with np.load(ROOT / "models" / name, allow_pickle=False) as z:
                arrays[f"{split}_x"], arrays[f"{split}_y"] = torch.from_numpy(z["input"]), torch.from_numpy(z["labels"])
    else:
        _ensure_dataset()
        raw = tr.load_fashion_mnist()
        arrays = {"train_x": tr.normalise(raw["train_images"]), "train_y": torch.from_numpy(raw["train_labels"].astype(np.int64)),
                  "test_x": tr.normalise(raw["test_images"]), "test_y": torch.from_numpy(raw["test_labels"].astype(np.int64))}
    for split, n in (("train", cfg.train_images), ("test", cfg.test_images)):
        if n is not None:
            arrays[f"{split}_x"], arrays[f"{split}_y"] = arrays[f"{split}_x"][:n], arrays[f"{split}_y"][:n]
    return arrays


BACKGROUND = (0.0 - tr.MEAN) / tr.STD  # a black pixel, normalised


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The teacher's augmentation on normalised images: the 2-pixel padding is black, as in training."""
    return tr.crop_flip(F.pad(x[:, 0], (tr.PAD,) * 4, value=BACKGROUND), gen).unsqueeze(1)


# ------------------------------------------------------------------------------------------------ models


def thin_resnet20(width: float) -> nn.Module:
    """ResNet-20 with every block's inner channels at round(width x c): the architecture of ndonnx's width
    student, with BatchNorm (which the ONNX export folds into the convolutions)."""
    from ndonnx.candidates import scaled

    model = tr.ResNet20()
    for block in (b for layer in (model.layer1, model.layer2, model.layer3) for b in layer):
        cin, cout, stride = block.conv1.in_channels, block.conv2.out_channels, block.conv1.stride
        m = scaled(cout, width)
        block.conv1 = nn.Conv2d(cin, m, 3, stride, 1, bias=False)
        block.bn1 = nn.BatchNorm2d(m)
        block.conv2 = nn.Conv2d(m, cout, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(block.conv1.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(block.conv2.weight, mode="fan_out", nonlinearity="relu")
    return model


class OnnxStudent(nn.Module):
    """A spliced ONNX student as a trainable torch module (its ONNX weights are the parameters)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.net = Trainable(model)  # its bound ONNX weights are the only parameters that train

    def forward(self, x):
        return self.net(x)[0]

    def to_onnx(self):
        from ndonnx.trainable import write_weights

        return write_weights(self.model, self.net.weights())


def export_params(model: nn.Module) -> int:
    """Parameters of the inference graph (BatchNorm folded), as ndonnx counts them."""
    import warnings

    model.eval()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(d) / "m.onnx"
        torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), str(path), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}})
        return load_teacher(path).params


# ------------------------------------------------------------------------------------------------ training


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y).float().mean())


def onnx_accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    sess = ort_session(model)
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + 1000].numpy()})[0].argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y.numpy()).mean())


class TeacherLogits:
    """The teacher's logits on a training batch (onnxruntime), at the same cost for every KD arm."""

    def __init__(self, teacher):
        self.sess = ort_session(teacher)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sess.run(["logits"], {"input": x.numpy()})[0])


def kd_loss(out, y, t_logits, T, lam):
    soft = F.kl_div(F.log_softmax(out / T, 1), F.softmax(t_logits / T, 1), reduction="batchmean") * T * T
    return soft + lam * F.cross_entropy(out, y)


def cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of its child processes that have ended and been
    waited for (ND's pool workers: the pool is shut down before `distill` returns)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class Curve:
    name: str
    points: list  # [wall seconds, accuracy]
    cpu_points: list = dataclasses.field(default_factory=list)  # [CPU seconds, accuracy], the same evaluations
    seconds: float = 0.0
    acc: float = 0.0

    def first_reach(self, a: float) -> float | None:
        return next((t for t, acc in self.points if acc >= a - 1e-12), None)

    def at(self, budget: float, cpu: bool) -> dict:
        """The accuracy after `budget` seconds: the last evaluation at or before it (None before the first)."""
        pts = self.cpu_points if cpu else self.points
        acc = next((a for t, a in reversed(pts) if t <= budget + 1e-9), None)
        return {"acc": acc, "ended": pts[-1][0] <= budget}


def equal_budgets(curves: dict[str, Curve], budgets: tuple, cpu: bool) -> dict:
    """Every arm's accuracy at each budget up to the longest arm's end; `fair_until`: the shortest arm's end
    (up to there every arm was still training)."""
    ends = {k: (c.cpu_points if cpu else c.points)[-1][0] for k, c in curves.items()}
    rows = [{"seconds": b, **{k: c.at(b, cpu) for k, c in curves.items()}} for b in budgets if b <= max(ends.values())]
    return {"clock": "cpu" if cpu else "wall", "ends": ends, "fair_until": min(ends.values()), "rows": rows}


def train(name: str, model: nn.Module, data: dict, epochs: float, cfg: BenchConfig, *, lr: float, one_cycle: bool,
          adam: bool = False, teacher: TeacherLogits | None = None, T: float = 4.0, lam: float = 0.5, t0: float = 0.0,
          cpu0: float = 0.0, eval_x=None, eval_y=None) -> Curve:
    """SGD (Nesterov, weight decay on weights only) or Adam, with crop+flip; CE, or KD when `teacher` is given.
    Accuracy is measured `cfg.evals` times, and just before a step would take either clock (wall from `t0`,
    CPU from `cpu0`) past one of `cfg.budgets`; both clocks stop while it is."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    x_all, y_all = data["train_x"], data["train_y"]
    eval_x = data["test_x"] if eval_x is None else eval_x
    eval_y = data["test_y"] if eval_y is None else eval_y
    n = len(x_all)
    per_epoch = max(1, n // cfg.batch)
    steps = max(1, round(epochs * per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    if adam:  # BatchNorm-free (folded) students diverge under SGD at any rate that trains them fast
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD([{"params": [p for p in params if p.dim() > 1], "weight_decay": tr.WEIGHT_DECAY},
                               {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                              lr=lr, momentum=0.9, nesterov=True)
    if one_cycle:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2,
                                                    anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    native = not isinstance(model, OnnxStudent)
    if native:
        model.to(memory_format=torch.channels_last)
    every = max(1, steps // cfg.evals)
    acc0 = accuracy(model, eval_x, eval_y)
    curve = Curve(name, [[t0, acc0]], [[cpu0, acc0]])
    clock, cpu, perm = 0.0, 0.0, None
    marks = {"wall": [b for b in cfg.budgets if b > t0], "cpu": [b for b in cfg.budgets if b > cpu0]}
    last = {"wall": 0.0, "cpu": 0.0}  # the previous step's seconds: a predictor of the next one's
    for step in range(steps):
        now = {"wall": t0 + clock, "cpu": cpu0 + cpu}
        if step and any(m and now[k] + last[k] > m[0] for k, m in marks.items()):
            if curve.points[-1][0] < now["wall"]:  # the state a budget about to be crossed ends with
                acc = accuracy(model, eval_x, eval_y)
                curve.points.append([now["wall"], acc])
                curve.cpu_points.append([now["cpu"], acc])
            for k, m in marks.items():
                while m and now[k] + last[k] > m[0]:
                    m.pop(0)
        start, cstart = time.perf_counter(), time.process_time()
        model.train(native)  # ONNX students hold no BatchNorm; their graph modules stay in eval mode
        if step % per_epoch == 0:
            perm = torch.randperm(n, generator=gen)
        idx = perm[(step % per_epoch) * cfg.batch:(step % per_epoch + 1) * cfg.batch]
        x, y = augment(x_all[idx], gen), y_all[idx]
        if native:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        loss = F.cross_entropy(out, y) if teacher is None else kd_loss(out, y, teacher(x.contiguous()), T, lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = {"wall": time.perf_counter() - start, "cpu": time.process_time() - cstart}
        clock, cpu = clock + last["wall"], cpu + last["cpu"]
        if (step + 1) % every == 0 or step + 1 == steps:
            acc = accuracy(model, eval_x, eval_y)
            curve.points.append([t0 + clock, acc])
            curve.cpu_points.append([cpu0 + cpu, acc])
            print(f"  {name}: step {step + 1}/{steps}  {t0 + clock:7.1f} s ({cpu0 + cpu:7.1f} CPU s)  acc {acc:.4f}",
                  flush=True)
    if native:
        model.to(memory_format=torch.contiguous_format)
    curve.seconds, curve.acc = t0 + clock, curve.points[-1][1]
    return curve


# ------------------------------------------------------------------------------------------------ ND


def write_npz(path: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    with open(path, "wb") as f:
        np.savez(f, input=x.numpy().astype(np.float32), labels=y.numpy().astype(np.int64))
    return path


def run_nd(work: Path, name: str, candidates: str, steps: int, cfg: BenchConfig, calib: Path | None):
    """Distill with ndonnx; returns the opened run, its wall seconds and its CPU seconds (cache pass + every
    job, the pool workers' included)."""
    from ndonnx_cli.progress import bar

    dcfg = DistillConfig(candidates=candidates, steps=steps, seed=cfg.seed, labels=None if calib is None
                         else "labels", data_free=calib is None)
    start, cstart = time.perf_counter(), cpu_seconds()
    distill(TEACHER, work / name, dcfg, data_path=calib, progress=bar)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cstart
    return open_run(work / name), seconds, cpu


def uniform(run, width: float, trained: bool = True):
    """Every neighbourhood with a width-`width` student takes it; the rest stay the teacher."""
    cand = f"width:{width:g}"
    choice = {nid: next((o for o in opts if o.candidate == cand), next(o for o in opts if o.candidate == "teacher"))
              for nid, opts in run.options.items()}
    students = {}
    for nid, o in choice.items():
        if o.model is not None:
            students[nid] = o.model if trained else _untrained(run, nid, o.candidate)
    model = splice(run.teacher.model, run.part, students, {"choices": {str(k): o.candidate for k, o in choice.items()}})
    return model, total_params(run.teacher.params, run.part, choice)


def _untrained(run, nid: int, candidate: str):
    """A student as built, before distillation: for width, the teacher's channels with the highest L1."""
    import onnx

    return onnx.load(str(run.dir / "students" / f"{job_stem(nid, candidate)}.onnx"))


# ------------------------------------------------------------------------------------------------ report


COLORS = {"ce": "tab:brown", "kd": "tab:green", "prune_kd": "tab:red", "ndft": "tab:purple"}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    b = res["budgets"]
    a1.plot([r["params"] for r in b], [100 * r["search_acc"] for r in b], "o-", label="ND + student search")
    a1.plot([r["params"] for r in b], [100 * r["uniform_acc"] for r in b], "s--", label="ND, uniform width")
    p = res["params_student"]
    for key, mark, label in (("kd", "^", "KD from scratch"), ("prune_kd", "v", "prune + KD"),
                             ("ndft", "*", "ND + fine-tuning"), ("ce", "x", "CE from scratch")):
        a1.plot([p], [100 * res[f"{key}_acc"]], mark, color=COLORS[key], markersize=10, label=label)
    a1.axhline(100 * res["teacher_acc"], color="grey", lw=0.8, ls=":", label="teacher")
    a1.set_xlabel("parameters")
    a1.set_ylabel("test accuracy (%)")
    a1.set_title(f"Accuracy against size ({res['params_teacher']:,}-parameter teacher)")
    a1.legend(fontsize=8)
    for key, label in (("ce", "CE from scratch"), ("kd", "KD from scratch"), ("prune_kd", "prune + KD"),
                       ("ndft", "ND + fine-tuning")):
        pts = np.array(res["curves"][key])
        a2.plot(pts[:, 0], 100 * pts[:, 1], ".-", color=COLORS[key], label=label)
    a2.plot([res["nd_seconds"]], [100 * res["nd_acc"]], "o", color=COLORS["ndft"], markersize=8,
            label="ND done (fine-tuning starts)")
    a2.axhline(100 * res["target_acc"], color="grey", lw=0.8, ls=":", label="A: speedup vs KD")
    a2.axhline(100 * res["target_acc_prune"], color="grey", lw=0.8, ls="--", label="A': speedup vs prune + KD")
    a2.set_xlabel("training wall seconds (2 CPU cores)" if os.cpu_count() == 2 else "training wall seconds")
    a2.set_ylabel("test accuracy (%)")
    a2.set_ylim(max(0, 100 * min(res["target_acc"], res["target_acc_prune"]) - 20), 100 * max(res["teacher_acc"], res["ndft_acc"]) + 1.5)
    a2.set_title(f"Accuracy against time, {res['params_student']:,} parameters")
    a2.legend(fontsize=8)
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".png", delete=False) as f:
        tmp = Path(f.name)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)


def goals(res: dict) -> dict:
    g = {
        "speedup >= 2.3": res["speedup"] is not None and res["speedup"] >= 2.3,
        "ndft_acc >= kd_acc - 0.005": res["ndft_acc"] >= res["kd_acc"] - 0.005,
        "ndft_acc >= prune_kd_acc": res["ndft_acc"] >= res["prune_kd_acc"],
        "speedup_vs_prune_kd > 1": res["speedup_vs_prune_kd"] is not None and res["speedup_vs_prune_kd"] > 1,
        "search_acc >= uniform_acc at every budget": all(r["search_acc"] >= r["uniform_acc"] for r in res["budgets"]),
        "data-free width 0.75 within 5 points": res["teacher_acc"] - res["datafree_acc"] <= 0.05,
    }
    return g


def table(res: dict) -> str:
    rows = [("teacher", res["params_teacher"], res["teacher_acc"], None),
            ("(a) CE from scratch", res["params_kd_student"], res["ce_acc"], res["ce_seconds"]),
            (f"(b) KD from scratch (T={res['kd_T']:g}, lambda={res['kd_lambda']:g})", res["params_kd_student"],
             res["kd_acc"], res["kd_seconds"]),
            ("(c) prune + KD fine-tuning", res["params_student"], res["prune_kd_acc"], res["prune_kd_seconds"]),
            ("(d) ND", res["params_student"], res["nd_acc"], res["nd_seconds"]),
            ("(e) ND + KD fine-tuning", res["params_student"], res["ndft_acc"], res["ndft_seconds"]),
            (f"data-free ND, width {res['datafree_width']:g}", res["datafree_params"], res["datafree_acc"],
             res["datafree_seconds"])]
    out = [f"{'arm':<44} {'params':>9} {'test acc':>9} {'seconds':>9}"]
    out += [f"{n:<44} {p:>9,} {100 * a:>8.2f}% {'' if s is None else f'{s:9.0f}'}" for n, p, a, s in rows]
    def sec(t):
        return "never" if t is None else f"{t:.0f} s"

    out.append(f"\nA = {100 * res['target_acc']:.2f}%: KD reaches it at {sec(res['kd_reach_seconds'])}, ND+FT at "
               f"{sec(res['ndft_reach_seconds'])}; A' = {100 * res['target_acc_prune']:.2f}%: prune+KD reaches it at "
               f"{sec(res['prune_kd_reach_seconds'])}, ND+FT at {sec(res['ndft_reach_prune_seconds'])}")
    out.append(f"speedup {res['speedup']}, speedup_vs_prune_kd {res['speedup_vs_prune_kd']}")
    out.append(f"\n{'width':>6} {'params':>9} {'uniform':>9} {'search':>9}")
    out += [f"{r['width']:>6g} {r['params']:>9,} {100 * r['uniform_acc']:>8.2f}% {100 * r['search_acc']:>8.2f}%"
            for r in res["budgets"]]
    for clock in ("cpu", "wall"):
        out.append("\n" + budget_table(res["equal_budgets"][clock]))
    out.append("")
    out += [f"{'met' if ok else 'NOT met'}: {k}" for k, ok in res["goals"].items()]
    return "\n".join(out)


ARMS = {"ce": "CE", "kd": "KD", "prune_kd": "prune+KD", "ndft": "ND+FT"}


def budget_table(eq: dict) -> str:
    """Accuracy at equal budgets: '-' not started (ND+FT before ND is done), '*' the arm had ended."""
    arms = [k for k in ARMS if k in eq["ends"]]
    out = [(f"accuracy at equal {eq['clock']} budgets (every arm still training up to {eq['fair_until']:.0f} s; "
            f"* = the arm had ended; - = not ready)"),
           f"{'seconds':>8} " + " ".join(f"{ARMS[k]:>10}" for k in arms)]
    for r in eq["rows"]:
        cells = ["-" if r[k]["acc"] is None else f"{100 * r[k]['acc']:.2f}%{'*' if r[k]['ended'] else ''}" for k in arms]
        out.append(f"{r['seconds']:>8g} " + " ".join(f"{c:>10}" for c in cells))
    out.append(f"{'ends':>8} " + " ".join(f"{eq['ends'][k]:>9.0f}s" for k in arms))
    return "\n".join(out)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else round(a / b, 3)


# ------------------------------------------------------------------------------------------------ main


def run(cfg: BenchConfig, from_npz: bool, work: Path) -> dict:
    torch.manual_seed(cfg.seed)
    data = load(cfg, from_npz)
    print(f"Fashion-MNIST: {len(data['train_x'])} training, {len(data['test_x'])} test images; "
          f"{torch.get_num_threads()} torch threads", flush=True)
    teacher_model = load_teacher(TEACHER)
    res: dict = {"config": dataclasses.asdict(cfg), "from_npz": from_npz, "cores": os.cpu_count(),
                 "torch": torch.__version__, "params_teacher": teacher_model.params}
    res["teacher_acc"] = onnx_accuracy(teacher_model.model, data["test_x"], data["test_y"])
    print(f"teacher: {res['teacher_acc']:.4f}", flush=True)
    logits = TeacherLogits(teacher_model.model)
    curves: dict[str, Curve] = {}

    # (d), (e), (c): ndonnx's width students; the pruned start is the same student before distillation
    calib = write_npz(work / "calib.npz", data["train_x"][:cfg.nd_images], data["train_y"][:cfg.nd_images])
    nd, res["nd_seconds"], res["nd_cpu_seconds"] = run_nd(work, "nd", f"width:{cfg.width:g},teacher", cfg.nd_steps,
                                                          cfg, calib)
    student, res["params_student"] = uniform(nd, cfg.width)
    res["nd_acc"] = onnx_accuracy(student, data["test_x"], data["test_y"])
    print(f"ND: {res['nd_acc']:.4f} in {res['nd_seconds']:.0f} s ({res['nd_cpu_seconds']:.0f} CPU s), "
          f"{res['params_student']:,} parameters", flush=True)
    # hyper-parameters are tuned on a held-out tenth of the training set, never on the test set
    n_val = max(1, len(data["train_x"]) // 10)
    tune = {"train_x": data["train_x"][:-n_val], "train_y": data["train_y"][:-n_val]}
    val = dict(eval_x=data["train_x"][-n_val:], eval_y=data["train_y"][-n_val:])
    once = dataclasses.replace(cfg, evals=1, budgets=())  # tuning runs: no curve

    pruned, _ = uniform(nd, cfg.width, trained=False)
    res["pruned_acc"] = onnx_accuracy(pruned, data["test_x"], data["test_y"])
    lr_grid = [{"lr": lr, "val_acc": train(f"tune prune+KD lr={lr:g}", OnnxStudent(pruned), tune, cfg.ft_tune_epochs,
                                           once, lr=lr, one_cycle=False, adam=True, teacher=logits, **val).acc}
               for lr in cfg.ft_lrs]
    res["ft_grid"] = lr_grid
    res["ft_lr"] = ft_lr = max(lr_grid, key=lambda g: g["val_acc"])["lr"]
    curves["prune_kd"] = train("prune + KD", OnnxStudent(pruned), data, cfg.ft_epochs, cfg, lr=ft_lr,
                               one_cycle=False, adam=True, teacher=logits)
    ndft = OnnxStudent(student)
    curves["ndft"] = train("ND + FT", ndft, data, cfg.ft_epochs, cfg, lr=ft_lr, one_cycle=False, adam=True,
                           teacher=logits, t0=res["nd_seconds"], cpu0=res["nd_cpu_seconds"])
    # the tuned weights written back into ONNX give the accuracy torch measured
    res["ndft_onnx_acc"] = onnx_accuracy(ndft.to_onnx(), data["test_x"], data["test_y"])

    # (b): tune T and lambda, then train on the whole training set
    grid = []
    for T, lam in cfg.grid:
        c = train(f"tune KD T={T:g} lambda={lam:g}", thin_resnet20(cfg.width), tune, cfg.tune_epochs, once,
                  lr=tr.LR, one_cycle=True, teacher=logits, T=T, lam=lam, **val)
        grid.append({"T": T, "lambda": lam, "val_acc": c.acc})
    best = max(grid, key=lambda g: g["val_acc"])
    res["kd_grid"], res["kd_T"], res["kd_lambda"] = grid, best["T"], best["lambda"]
    kd_model = thin_resnet20(cfg.width)
    curves["kd"] = train("KD", kd_model, data, cfg.epochs, cfg, lr=tr.LR, one_cycle=True, teacher=logits,
                         T=best["T"], lam=best["lambda"])
    res["params_kd_student"] = export_params(kd_model)
    # (a)
    curves["ce"] = train("CE", thin_resnet20(cfg.width), data, cfg.epochs, cfg, lr=tr.LR, one_cycle=True)

    # (f): search against uniform width, at the uniform student's parameter count
    search_run, res["search_run_seconds"], _ = run_nd(
        work, "search", ",".join([f"width:{w:g}" for w in cfg.widths] + ["lowrank:0.25", "lowrank:0.5", "identity",
                                                                          "teacher"]), cfg.search_steps, cfg, calib)
    budgets = []
    for w in cfg.widths:
        model, params = uniform(search_run, w)
        found = search(search_run.scorer, search_run.options, params)
        budgets.append({"width": w, "params": params, "uniform_acc": onnx_accuracy(model, data["test_x"], data["test_y"]),
                        "search_params": found.params,
                        "search_acc": onnx_accuracy(search_run.scorer.compose(found.choice), data["test_x"], data["test_y"]),
                        "search_choices": {str(k): o.candidate for k, o in sorted(found.choice.items())}})
        print(f"  width {w:g}: {params:,} params, uniform {budgets[-1]['uniform_acc']:.4f}, "
              f"search {budgets[-1]['search_acc']:.4f}", flush=True)
    res["budgets"] = budgets
    at = next(r for r in budgets if abs(r["width"] - cfg.width) < 1e-9) if cfg.width in cfg.widths else budgets[0]
    res["search_acc"], res["uniform_acc"] = at["search_acc"], at["uniform_acc"]

    # data-free ND
    free, res["datafree_seconds"], _ = run_nd(work, "datafree", f"width:{cfg.datafree_width:g},teacher", cfg.nd_steps, cfg, None)
    model, res["datafree_params"] = uniform(free, cfg.datafree_width)
    res["datafree_width"] = cfg.datafree_width
    res["datafree_acc"] = onnx_accuracy(model, data["test_x"], data["test_y"])

    for key, c in curves.items():
        res[f"{key}_acc"], res[f"{key}_seconds"] = c.acc, c.seconds
        res[f"{key}_cpu_seconds"] = c.cpu_points[-1][0]
    res["curves"] = {k: c.points for k, c in curves.items()}
    res["cpu_curves"] = {k: c.cpu_points for k, c in curves.items()}
    res["equal_budgets"] = {clock: equal_budgets(curves, cfg.budgets, clock == "cpu") for clock in ("cpu", "wall")}
    res["target_acc"] = min(res["kd_acc"], res["ndft_acc"]) - 0.002
    res["target_acc_prune"] = min(res["prune_kd_acc"], res["ndft_acc"]) - 0.002
    res["kd_reach_seconds"] = curves["kd"].first_reach(res["target_acc"])
    res["ndft_reach_seconds"] = curves["ndft"].first_reach(res["target_acc"])
    res["prune_kd_reach_seconds"] = curves["prune_kd"].first_reach(res["target_acc_prune"])
    res["ndft_reach_prune_seconds"] = curves["ndft"].first_reach(res["target_acc_prune"])
    res["speedup"] = _ratio(res["kd_reach_seconds"], res["ndft_reach_seconds"])
    res["speedup_vs_prune_kd"] = _ratio(res["prune_kd_reach_seconds"], res["ndft_reach_prune_seconds"])
    res["goals"] = goals(res)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset and fewer steps, for routine checks")
    ap.add_argument("--from-npz", action="store_true", help="the bundled 2,000 + 2,000 images instead of the dataset")
    ap.add_argument("--out", type=Path, default=Path("nd_vs_kd.json"), help="JSON output (a PNG is written beside it)")
    for f in ("train_images", "test_images", "nd_images", "nd_steps", "search_steps", "evals"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, help="override the preset")
    for f in ("epochs", "tune_epochs", "ft_epochs", "ft_tune_epochs", "width"):
        ap.add_argument("--" + f.replace("_", "-"), type=float, help="override the preset")
    ap.add_argument("--budgets", help="comma-separated seconds for the equal-budget readings (both clocks)")
    args = ap.parse_args(argv)
    cfg = BenchConfig(**(QUICK if args.quick else {}))
    if args.budgets:
        args.budgets = tuple(float(b) for b in args.budgets.split(","))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__
                                      and v is not None})
    if cfg.width not in cfg.widths:
        cfg = dataclasses.replace(cfg, widths=tuple(sorted({*cfg.widths, cfg.width})))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nd_vs_kd.") as d:
        res = run(cfg, args.from_npz, Path(d))
    res["total_seconds"] = time.perf_counter() - start
    missing = [k for k in KEYS if k not in res]
    assert not missing, missing
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(res, indent=1))
    png = args.out.with_suffix(".png")
    plot(res, png)
    print("\n" + table(res))
    print(f"\nwrote {args.out} and {png} in {res['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
