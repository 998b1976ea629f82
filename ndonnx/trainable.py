"""An ONNX sub-model as a trainable torch module whose parameters map back to its initializers.

onnx2torch builds Conv/Linear/BatchNorm modules from some initializers (Gemm weights transposed
and scaled by alpha) and keeps the rest as buffers passed to functional modules. We bind every
float weight to the torch tensor that holds it, with the transform between them, check the
binding reproduces the initializers exactly (a broken contract fails loudly), and write trained
values back by name. The student stays an ONNX graph; torch is only the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

import ndonnx.converters  # noqa: F401  (registers converters; jobs may run in fresh processes)
from ndonnx.graph import HALF_EPS, attr, weight_counts
from ndonnx.splice import write_weights  # noqa: F401  (callers import it from here too)

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class Binding:
    owner: nn.Module
    attr: str
    to_onnx: Callable[[torch.Tensor], torch.Tensor]  # torch value -> initializer value

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.owner, self.attr)


class Trainable(nn.Module):
    """forward(*inputs) like the sub-model; `weights()` gives initializer name -> numpy value."""

    def __init__(self, sub: onnx.ModelProto):
        super().__init__()
        import warnings

        from onnx2torch import convert

        # A float16 (or bfloat16) sub-model trains as float32: Adam's steps vanish in half precision
        # and CPU kernels want one dtype. Its inputs are cast on the way in; `weights()` gives
        # float32 values that `write_weights` casts back to the initializers' own type.
        sub, self.widened = as_float32(sub)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.gm = convert(sub, attach_onnx_mapping=True).eval()
        self.input_names = [i.name for i in sub.graph.input]
        self.output_names = [o.name for o in sub.graph.output]
        inits = {i.name: numpy_helper.to_array(i) for i in sub.graph.initializer}
        bindings = self._bind(sub)
        self.trainable = sorted(n for n in weight_counts(sub) if n in bindings)
        self.frozen = sorted(set(weight_counts(sub)) - set(self.trainable))
        self._bindings = {}
        for name in self.trainable:
            group = bindings[name]
            # A weight read by several nodes must stay one tensor: tie buffers; freeze otherwise.
            if len(group) > 1 and not all(b.to_onnx is _same for b in group):
                self.frozen.append(name)
                continue
            first = group[0]
            param = nn.Parameter(first.tensor.detach().clone().float() if first.tensor.is_floating_point()
                                 else first.tensor.detach().clone())
            for b in group:
                if b.attr in b.owner._buffers:
                    del b.owner._buffers[b.attr]
                if b.attr in b.owner._parameters:
                    del b.owner._parameters[b.attr]
                b.owner.register_parameter(b.attr, param)
            self._bindings[name] = first
            got = first.to_onnx(first.tensor.detach()).cpu().numpy()
            if got.shape != inits[name].shape or not np.allclose(got, inits[name], rtol=1e-6, atol=1e-7):
                raise RuntimeError(f"trainable: binding of {name!r} does not reproduce the initializer")
        self.trainable = sorted(self._bindings)
        for p in self.gm.parameters():  # only bound weights train; BN statistics and the rest stay
            p.requires_grad_(False)
        for name in self.trainable:
            self._bindings[name].tensor.requires_grad_(True)

    def named_weights(self) -> dict[str, nn.Parameter]:
        return {n: self._bindings[n].tensor for n in self.trainable}

    def _bind(self, sub: onnx.ModelProto) -> dict[str, list[Binding]]:
        by_output = {o: n for n in sub.graph.node for o in n.output}
        out: dict[str, list[Binding]] = {}

        def add(name: str, owner: nn.Module, attr: str, fn=None):
            if name and getattr(owner, attr, None) is not None:
                out.setdefault(name, []).append(Binding(owner, attr, fn or _same))

        for fx_node in self.gm.graph.nodes:
            if fx_node.op != "call_module":
                continue
            m = self.gm.get_submodule(fx_node.target)
            mapping = getattr(m, "onnx_mapping", None)
            if mapping is None:
                continue
            node = by_output.get(mapping.outputs[0])
            if node is None:
                continue
            if isinstance(m, CONV):
                add(node.input[1], m, "weight")
                if len(node.input) > 2:
                    add(node.input[2], m, "bias")
            elif isinstance(m, nn.Linear) and node.op_type == "Gemm":
                alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
                trans_b = bool(attr(node, "transB", 0))
                add(node.input[1], m, "weight", lambda t, a=alpha, tb=trans_b: (t / a) if tb else (t / a).T)
                if len(node.input) > 2:
                    add(node.input[2], m, "bias", lambda t, b=beta: t / b)
            elif isinstance(m, NORM):
                add(node.input[1], m, "weight")
                add(node.input[2], m, "bias")
            for j, arg in enumerate(fx_node.args):  # initializers passed as buffers
                if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and j < len(mapping.inputs):
                    owner_path, _, name = arg.target.rpartition(".")
                    add(mapping.inputs[j], self.gm.get_submodule(owner_path), name)
        return out

    def forward(self, *inputs):
        if self.widened:
            inputs = [x.float() if x.is_floating_point() else x for x in inputs]
        out = self.gm(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def weights(self) -> dict[str, np.ndarray]:
        """Current values of the trained weights, as the sub-model's initializers hold them."""
        with torch.no_grad():
            return {n: self._bindings[n].to_onnx(self._bindings[n].tensor).detach().cpu().numpy().astype(np.float32)
                    for n in self.trainable}


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


HALF = tuple(HALF_EPS)


def as_float32(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """The model with every float16/bfloat16 initializer, declared tensor, Cast target and
    ConstantOfShape value made float32, and whether anything changed (the model itself if not)."""
    g = model.graph
    vis = [*g.input, *g.output, *g.value_info]
    if not (any(i.data_type in HALF for i in g.initializer) or any(v.type.tensor_type.elem_type in HALF for v in vis)
            or any(n.op_type == "Cast" and attr(n, "to") in HALF for n in g.node)):
        return model, False
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for init in g.initializer:
        if init.data_type in HALF:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.tensor_type.elem_type in HALF:
            v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i in HALF:
                a.i = onnx.TensorProto.FLOAT
            elif node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type in HALF:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
    return out, True
