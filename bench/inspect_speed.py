"""Speed of the foundation: partition of a 1,000-node graph, and `inspect` (load, partition, every
round trip) of a ResNet-50-sized model built here.

    python bench/inspect_speed.py [--out inspect_speed.json]

Goals: partition under 1 s; inspect of ~25M parameters under 60 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ndonnx.graph import load_teacher
from ndonnx.inspection import inspect_model
from ndonnx.partition import partition


def residual_chain(blocks: int, c: int = 8) -> onnx.ModelProto:
    """`blocks` residual blocks of 8 nodes each: Conv, Relu, Conv, Add, Relu, Mul, Sigmoid, Add."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "X"
    for b in range(blocks):
        w1, w2 = f"w{b}a", f"w{b}b"
        inits += [numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.1, w) for w in (w1, w2)]
        p = f"b{b}_"
        nodes += [
            helper.make_node("Conv", [x, w1], [p + "c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [p + "c1"], [p + "r1"]),
            helper.make_node("Conv", [p + "r1", w2], [p + "c2"], pads=[1, 1, 1, 1]),
            helper.make_node("Add", [p + "c2", x], [p + "s"]),
            helper.make_node("Relu", [p + "s"], [p + "r2"]),
            helper.make_node("Sigmoid", [p + "r2"], [p + "g"]),
            helper.make_node("Mul", [p + "r2", p + "g"], [p + "m"]),
            helper.make_node("Add", [p + "m", p + "r2"], [p + "o"]),
        ]
        x = p + "o"
    nodes.append(helper.make_node("Identity", [x], ["Y"]))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", c, 8, 8])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", c, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def export_resnet50(path: Path) -> None:
    import torch
    import torchvision

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torchvision.models.resnet50().eval(), (torch.randn(1, 3, 224, 224),), str(path),
                          dynamo=False, opset_version=13, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("inspect_speed.json"))
    args = ap.parse_args()
    res: dict = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        chain = Path(d) / "chain.onnx"
        onnx.save(residual_chain(125), str(chain))
        teacher = load_teacher(chain)
        t0 = time.perf_counter()
        part = partition(teacher)
        res["partition_nodes"] = len(teacher.model.graph.node)
        res["partition_seconds"] = time.perf_counter() - t0
        res["partition_neighbourhoods"] = len(part.neighbourhoods)

        r50 = Path(d) / "resnet50.onnx"
        export_resnet50(r50)
        t0 = time.perf_counter()
        report = inspect_model(r50)
        res["inspect_seconds"] = time.perf_counter() - t0
        res["inspect_params"] = report["params"]
        res["inspect_neighbourhoods"] = len(report["neighbourhoods"])
        res["inspect_exact"] = sum(bool(n["convertible"]) for n in report["neighbourhoods"])
    res["partition_goal_met"] = res["partition_seconds"] < 1.0
    res["inspect_goal_met"] = res["inspect_seconds"] < 60.0
    print(f"partition of a {res['partition_nodes']}-node graph: {res['partition_seconds']:.3f} s "
          f"({res['partition_neighbourhoods']} neighbourhoods; goal < 1 s)")
    print(f"inspect of a {res['inspect_params']:,}-parameter ResNet-50 with all round trips: "
          f"{res['inspect_seconds']:.1f} s ({res['inspect_exact']}/{res['inspect_neighbourhoods']} exact; goal < 60 s)")
    args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
