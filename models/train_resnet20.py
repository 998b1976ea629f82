#!/usr/bin/env python3
"""Train the bundled teacher: a CIFAR-style ResNet-20 (He et al., 2016) on Fashion-MNIST, export it to ONNX.

Data: the real Fashion-MNIST IDX files from the Debian package ``dataset-fashion-mnist``
(``apt-get update && apt-get install -y dataset-fashion-mnist``), read from /usr/share/datasets/fashion-mnist.

Model input: the *normalised* float image, shape (N, 1, 28, 28), float32::

    x = (pixel / 255 - MEAN) / STD        MEAN = 0.2860, STD = 0.3530

The normalisation is not part of the ONNX graph; ``fmnist_subset.npz`` / ``fmnist_test.npz`` already hold
normalised float32 inputs (array ``input``) and int64 labels (array ``labels``), so they can be fed directly.

Outputs written to ``--out`` (default: the directory of this script), each atomically (temp file + os.replace):

    resnet20_fmnist.onnx   the model in eval mode, opset 13, input 'input' (N,1,28,28) -> 'logits' (N,10)
    fmnist_subset.npz      the first 2000 training images (normalised) and labels
    fmnist_test.npz        the first 2000 test images (normalised) and labels
    resnet20_fmnist.json   accuracies, parameter count, epochs, seconds, seed, mean/std, torch version

Rebuild the bundled files (5 epochs: about 13 minutes on 2 idle CPU cores, 2,340 steps at ~0.33 s)::

    python models/train_resnet20.py --threads 1

The bundled files were built with ``--threads 1`` (1,933 s, 92.15% test accuracy) because the 2-core machine
was shared with other jobs: under contention two OpenMP threads ran 3-5x slower than one.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN = 0.2860  # mean of the 60,000 Fashion-MNIST training pixels, scaled to [0, 1]
STD = 0.3530  # their standard deviation
SEED = 0
DATA_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
PACKAGE = "dataset-fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
NPZ_COUNT = 2000
DEFAULT_EPOCHS = 5
BATCH = 128
LR = 0.1
WEIGHT_DECAY = 5e-4
PAD = 2


# ----------------------------------------------------------------------------------------------- data


def _find(name: str) -> Path | None:
    for d in DATA_DIRS:
        for cand in (d / name, d / (name + ".gz")):
            if cand.is_file():
                return cand
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x0000 08 nd: unsigned bytes
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    nd = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims).copy()  # writable


def load_fashion_mnist() -> dict[str, np.ndarray]:
    paths = {k: _find(v) for k, v in FILES.items()}
    missing = [FILES[k] for k, p in paths.items() if p is None]
    if missing:
        where = ", ".join(str(d) for d in DATA_DIRS)
        sys.exit(
            f"error: Fashion-MNIST not found in {where} (missing {', '.join(missing)}); "
            f"install it with: apt-get update && apt-get install -y {PACKAGE}"
        )
    data = {k: _read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        imgs, labs = data[f"{split}_images"], data[f"{split}_labels"]
        assert imgs.shape[1:] == (28, 28) and len(imgs) == len(labs), (imgs.shape, labs.shape)
    return data


def normalise(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) or (N, 1, H, W) -> normalised float32 (N, 1, H, W)."""
    x = torch.as_tensor(images_u8)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return (x.float() / 255.0 - MEAN) / STD


def crop_flip(padded: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 28x28 crop from the padded (B, 32, 32) batch + random horizontal flip (any dtype)."""
    b = padded.shape[0]
    oy = torch.randint(0, 2 * PAD + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * PAD + 1, (b,), generator=gen)
    ar = torch.arange(28)
    rows = (oy[:, None] + ar)[:, :, None]  # (B, 28, 1)
    cols = (ox[:, None] + ar)[:, None, :]  # (B, 1, 28)
    crops = padded[torch.arange(b)[:, None, None], rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None], crops.flip(-1), crops)


def augment(padded_u8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """crop_flip of the zero-padded uint8 batch, normalised."""
    return normalise(crop_flip(padded_u8, gen))


# ---------------------------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:  # option B: 1x1 conv + BN projection
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet20(nn.Module):
    """3 stages x 3 basic blocks, 16/32/64 channels, global average pool, linear 10 (6n+2 = 20 layers)."""

    def __init__(self, in_ch: int = 1, classes: int = 10, n: int = 3, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(widths[-1], classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


# ------------------------------------------------------------------------------------------- training


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    pred = torch.as_tensor(logits).argmax(1)
    return float((pred == torch.as_tensor(labels)).float().mean())


def train(model: nn.Module, images_u8: np.ndarray, labels: np.ndarray, epochs: int, gen: torch.Generator,
          log_every: int = 50) -> float:
    padded = F.pad(torch.from_numpy(images_u8.copy()), (PAD, PAD, PAD, PAD))  # zero = black background
    y_all = torch.from_numpy(labels.astype(np.int64))
    n = len(padded)
    steps_per_epoch = max(1, n // BATCH)  # drop the last partial batch (BN needs > 1 sample)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() == 1 else decay).append(p)  # no weight decay on BN affine and biases
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, momentum=0.9, nesterov=True,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, total_steps=epochs * steps_per_epoch, pct_start=0.2,
        anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0,
    )
    model.to(memory_format=torch.channels_last)  # faster oneDNN convolutions on CPU
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        tot_loss, tot_ok, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * BATCH : (step + 1) * BATCH] if n >= BATCH else perm
            x = augment(padded[idx], gen).contiguous(memory_format=torch.channels_last)
            y = y_all[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += float(loss.detach()) * len(y)
            tot_ok += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if log_every and (step + 1) % log_every == 0 and step + 1 < steps_per_epoch:
                print(f"  epoch {epoch + 1}/{epochs} step {step + 1}/{steps_per_epoch} "
                      f"loss {tot_loss / seen:.4f} acc {tot_ok / seen:.4f} "
                      f"lr {sched.get_last_lr()[0]:.4f} [{time.perf_counter() - t0:.0f}s]", flush=True)
        print(f"epoch {epoch + 1}/{epochs}: train loss {tot_loss / seen:.4f} acc {tot_ok / seen:.4f} "
              f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    seconds = time.perf_counter() - t0
    model.to(memory_format=torch.contiguous_format)
    return seconds


# --------------------------------------------------------------------------------------------- output


def _atomic(path: Path, write) -> None:
    """write(tmp_path) then os.replace onto path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npz(path: Path, x: torch.Tensor, labels: np.ndarray) -> None:
    def w(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append '.npz' to the temp name
            np.savez_compressed(f, input=x.numpy().astype(np.float32), labels=labels.astype(np.int64))

    _atomic(path, w)


def export_onnx(model: nn.Module, path: Path, sample: torch.Tensor) -> None:
    import onnx
    import onnxruntime as ort

    model.eval()

    def w(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (sample[:2],), str(tmp), dynamo=False, opset_version=13,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            )
        onnx.checker.check_model(str(tmp), full_check=True)
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"input": sample.numpy()})[0]
        want = predict(model, sample).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
        assert got.shape == (len(sample), 10), got.shape
        print(f"onnx check ok; onnxruntime vs torch max |diff| = {np.abs(got - want).max():.2e} "
              f"on {len(sample)} images", flush=True)

    _atomic(path, w)


def onnx_float_params(path: Path) -> int:
    import onnx
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    m = onnx.load(str(path))
    tensors = list(m.graph.initializer)
    for node in m.graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.name == "value"]
    return int(sum(int(np.prod(t.dims)) for t in tensors if t.data_type in floats))


def training_parser(doc: str, epochs: int) -> argparse.ArgumentParser:
    """The options every teacher-training script here takes."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    ap.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    ap.add_argument("--test-limit", type=int, default=None,
                    help="measure test accuracy on the first N test images only (default: all 10,000)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory (default models/)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable CPU cores)")
    return ap


def set_threads(threads: int | None) -> None:
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(max(1, threads))


def main(argv: list[str] | None = None) -> int:
    ap = training_parser(__doc__, DEFAULT_EPOCHS)
    ap.add_argument("--npz-count", type=int, default=NPZ_COUNT,
                    help=f"images per .npz file (default {NPZ_COUNT})")
    args = ap.parse_args(argv)

    data = load_fashion_mnist()
    set_threads(args.threads)
    gen = seed_everything(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    tr_x, tr_y = data["train_images"], data["train_labels"]
    if args.limit is not None:
        tr_x, tr_y = tr_x[: args.limit], tr_y[: args.limit]
    te_x, te_y = data["test_images"], data["test_labels"]
    if args.test_limit is not None:
        te_x, te_y = te_x[: args.test_limit], te_y[: args.test_limit]
    print(f"ResNet-20 on Fashion-MNIST: {len(tr_x)} train images, {args.epochs} epochs, batch {BATCH}, "
          f"{torch.get_num_threads()} threads, seed {args.seed}", flush=True)

    model = ResNet20()
    seconds = train(model, tr_x, tr_y, args.epochs, gen)

    test_in = normalise(te_x)
    test_acc = accuracy(predict(model, test_in), te_y)
    k = args.npz_count
    sub_in, sub_y = normalise(data["train_images"][:k]), data["train_labels"][:k]
    tst_in, tst_y = normalise(data["test_images"][:k]), data["test_labels"][:k]
    subset_test_acc = accuracy(predict(model, tst_in), tst_y)

    onnx_path = args.out / "resnet20_fmnist.onnx"
    export_onnx(model, onnx_path, tst_in[:256])
    save_npz(args.out / "fmnist_subset.npz", sub_in, sub_y)
    save_npz(args.out / "fmnist_test.npz", tst_in, tst_y)
    meta = {
        "test_accuracy": round(test_acc, 6),
        "test_images": int(len(te_x)),
        "subset_test_accuracy": round(subset_test_acc, 6),
        "subset_test_images": int(len(tst_in)),
        "params": onnx_float_params(onnx_path),
        "epochs": args.epochs,
        "train_images": int(len(tr_x)),
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "mean": MEAN,
        "std": STD,
        "torch": torch.__version__,
    }
    _atomic(args.out / "resnet20_fmnist.json",
            lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))

    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in
                      (onnx_path, args.out / "fmnist_subset.npz", args.out / "fmnist_test.npz"))
    print(f"test accuracy {test_acc:.4f} on {len(te_x)} images; {subset_test_acc:.4f} on fmnist_test.npz "
          f"({len(tst_in)}); {meta['params']} float params; trained {seconds:.0f}s")
    print(f"wrote {args.out}: {sizes}, resnet20_fmnist.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
