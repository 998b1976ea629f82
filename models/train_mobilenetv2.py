#!/usr/bin/env python3
"""Train the second bundled teacher: a small MobileNetV2 (Sandler et al., 2018) on Fashion-MNIST, exported
to ONNX with its BatchNormalization layers kept in the graph (not folded into the convolutions).

It is the teacher for data-free distillation by BatchNormalization statistics (``--data-free-method
bn-stats``): the running mean and variance of every BatchNormalization stay in the ONNX file. It also has
depthwise convolutions, inverted residuals and ReLU6 (ONNX ``Clip``), unlike the ResNet-20.

Data, normalisation and training recipe are those of ``train_resnet20.py`` (its functions are reused):
the real Fashion-MNIST IDX files, ``x = (pixel / 255 - 0.2860) / 0.3530``, SGD with Nesterov momentum,
one-cycle cosine schedule, random crop + flip. The same ``fmnist_subset.npz`` / ``fmnist_test.npz``
(written by ``train_resnet20.py``) feed it.

Outputs written to ``--out`` (default: the directory of this script), each atomically:

    mobilenetv2_fmnist.onnx   eval mode, opset 13, BatchNormalization kept, input 'input' (N,1,28,28) -> 'logits' (N,10)
    mobilenetv2_fmnist.json   accuracies, parameter count, BatchNormalization count, epochs, seconds, seed, torch version

Rebuild the bundled files::

    python models/train_mobilenetv2.py --threads 1
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_resnet20 as base  # noqa: E402  (data, recipe and output helpers)

DEFAULT_EPOCHS = 3
NAME = "mobilenetv2_fmnist"
# (expansion t, output channels c, blocks n, first stride s), as in the paper's Table 2, scaled to 28x28
SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 48, 3, 2), (4, 96, 2, 1))
STEM, HEAD = 16, 320


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped at t = 1), 3x3 depthwise, 1x1 linear projection; residual when shapes agree."""

    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        layers = [conv_bn(cin, hidden)] if t != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self, in_ch: int = 1, classes: int = 10):
        super().__init__()
        blocks, cin = [conv_bn(in_ch, STEM, 3)], STEM
        for t, c, n, s in SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        blocks.append(conv_bn(cin, HEAD))
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Linear(HEAD, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def export_onnx(model: nn.Module, path: Path, sample: torch.Tensor) -> int:
    """Legacy exporter without constant folding, so BatchNormalization is not fused into the Conv before
    it; checked against torch in onnxruntime. Returns the number of BatchNormalization nodes."""
    import onnx
    import onnxruntime as ort

    model.eval()
    count = []

    def w(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (sample[:2],), str(tmp), dynamo=False, opset_version=13, do_constant_folding=False,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            )
        onnx.checker.check_model(str(tmp), full_check=True)
        count.append(sum(n.op_type == "BatchNormalization" for n in onnx.load(str(tmp)).graph.node))
        want = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert count[0] == want, f"{count[0]} BatchNormalization nodes in the ONNX graph, {want} in the model"
        got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(
            ["logits"], {"input": sample.numpy()})[0]
        ref = base.predict(model, sample).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
        print(f"onnx check ok: {count[0]} BatchNormalization nodes kept; onnxruntime vs torch max |diff| = "
              f"{np.abs(got - ref).max():.2e} on {len(sample)} images", flush=True)

    base._atomic(path, w)
    return count[0]


def main(argv: list[str] | None = None) -> int:
    args = base.training_parser(__doc__, DEFAULT_EPOCHS).parse_args(argv)
    if args.epochs < 1 or (args.limit is not None and args.limit < 2):
        sys.exit("error: --epochs must be >= 1 and --limit >= 2")

    data = base.load_fashion_mnist()
    base.set_threads(args.threads)
    gen = base.seed_everything(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    tr_x, tr_y = data["train_images"][: args.limit], data["train_labels"][: args.limit]
    te_x, te_y = data["test_images"][: args.test_limit], data["test_labels"][: args.test_limit]
    print(f"MobileNetV2 on Fashion-MNIST: {len(tr_x)} train images, {args.epochs} epochs, batch {base.BATCH}, "
          f"{torch.get_num_threads()} threads, seed {args.seed}", flush=True)

    model = MobileNetV2()
    seconds = base.train(model, tr_x, tr_y, args.epochs, gen)

    test_acc = base.accuracy(base.predict(model, base.normalise(te_x)), te_y)
    k = base.NPZ_COUNT
    sub_in, sub_y = base.normalise(data["test_images"][:k]), data["test_labels"][:k]  # = fmnist_test.npz
    subset_acc = base.accuracy(base.predict(model, sub_in), sub_y)

    onnx_path = args.out / f"{NAME}.onnx"
    bn = export_onnx(model, onnx_path, sub_in[:256])
    meta = {
        "test_accuracy": round(test_acc, 6),
        "test_images": int(len(te_x)),
        "subset_test_accuracy": round(subset_acc, 6),
        "subset_test_images": int(len(sub_in)),
        "params": base.onnx_float_params(onnx_path),
        "trainable_params": sum(p.numel() for p in model.parameters()),
        "batchnorm_nodes": bn,
        "epochs": args.epochs,
        "train_images": int(len(tr_x)),
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "mean": base.MEAN,
        "std": base.STD,
        "torch": torch.__version__,
    }
    base._atomic(args.out / f"{NAME}.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    print(f"test accuracy {test_acc:.4f} on {len(te_x)} images; {subset_acc:.4f} on the first {len(sub_in)} "
          f"(fmnist_test.npz); {meta['params']} float params; trained {seconds:.0f}s")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB), {NAME}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
