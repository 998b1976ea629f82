"""Tiny teachers built on the spot: torch modules exported with both exporters, or onnx.helper graphs."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn


def _seed():
    torch.manual_seed(0)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return torch.relu(y + (self.down(x) if self.down is not None else x))


class TinyResNet(nn.Module):
    """Stem + 3 basic blocks (the last downsamples) + head: 5 weighted segments."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width), BasicBlock(width, 2 * width, 2))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int = 4, se: bool = False):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.se = SqueezeExcite(h) if se else None
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.dw(self.expand(x))
        if self.se is not None:
            y = self.se(y)
        return x + self.project(y)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class TinyMobileNet(nn.Module):
    """Stem, two inverted residuals (the second with squeeze-excite, SiLU head), classifier."""

    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU())
        self.b1 = InvertedResidual(c)
        self.b2 = InvertedResidual(c, se=True)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.b2(self.b1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class EncoderLayer(nn.Module):
    """Post-norm transformer layer written out (no fused fast path): attention and feed-forward."""

    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.n1 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ff)
        self.ff2 = nn.Linear(ff, d)
        self.n2 = nn.LayerNorm(d)

    def forward(self, x, bias):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.h) ** 0.5 + bias, -1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = self.n1(x + self.out(y))
        return self.n2(x + self.ff2(nn.functional.gelu(self.ff1(x))))


class TinyEncoder(nn.Module):
    """Token ids (int64) + padding mask (bool, True = real token) -> 2 layers -> pooled logits."""

    def __init__(self, vocab: int = 50, d: int = 16, heads: int = 2, layers: int = 2, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, 2 * d) for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, ids, mask):
        bias = torch.where(mask, 0.0, -1e4)[:, None, None, :]
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x, bias)
        return self.head(x[:, 0])


class BertStyleLayer(nn.Module):
    """Attention and feed-forward sub-layers as HF transformers writes them: every reshape target is
    computed from `Shape` of a tensor (the input ids' or the hidden states'), as the legacy exporter records."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, bias, input_shape):
        hidden = (*input_shape, -1, self.hd)
        q, k, v = (m(x).view(hidden).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / self.hd ** 0.5 + bias, -1)
        y = (att @ v).transpose(1, 2).reshape(*input_shape, -1)
        x = self.n1(x + self.o(y))
        return self.n2(x + self.ff2(nn.functional.gelu(self.ff1(x))))


class BertStyle(nn.Module):
    """input_ids + attention_mask; positions, token types and the mask's shape all come from
    `input_ids.size()`, so shape values reach every layer (as in HF BERT's legacy export)."""

    def __init__(self, vocab: int = 60, d: int = 16, heads: int = 2, layers: int = 2, positions: int = 32):
        super().__init__()
        self.words, self.pos, self.types = nn.Embedding(vocab, d), nn.Embedding(positions, d), nn.Embedding(2, d)
        self.norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(BertStyleLayer(d, heads) for _ in range(layers))
        self.pool = nn.Linear(d, d)

    def forward(self, input_ids, attention_mask):
        input_shape = input_ids.size()
        seq = input_shape[1]
        types = torch.zeros(input_shape, dtype=torch.long, device=input_ids.device)
        x = self.words(input_ids) + self.pos(torch.arange(seq).unsqueeze(0)) + self.types(types)
        x = self.norm(x)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, bias, input_shape)
        return torch.tanh(self.pool(x[:, 0]))


class TinyFPN(nn.Module):
    """Three stages whose outputs all feed a top-down neck (as a detector's FPN): past the stem no
    single tensor is on every path, so the chain alone leaves the backbone and neck in one piece."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), nn.ReLU())
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, 2 if k else 1, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1),
                                                  nn.ReLU()) for k in range(3))
        self.lateral = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(3))
        self.head = nn.Conv2d(c, 4, 3, 1, 1)

    def forward(self, x):
        feats = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        p = self.lateral[2](feats[2])
        for k in (1, 0):
            p = self.lateral[k](feats[k]) + nn.functional.interpolate(p, scale_factor=2.0, mode="nearest")
        return self.head(p)


class LstmTagger(nn.Module):
    """Token ids -> embedding -> bidirectional LSTM -> GRU -> per-token logits (an older export's RNN text model)."""

    def __init__(self, vocab: int = 40, d: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, d, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(2 * d, d, batch_first=True)
        self.out = nn.Linear(d, 3)

    def forward(self, ids):
        return self.out(self.gru(self.lstm(self.emb(ids))[0])[0])


class PlainMobile(nn.Module):
    """Three stride-2 inverted residuals without a skip: their expand and depthwise outputs are
    single-tensor cuts, wider than the tensors around them."""

    def __init__(self, c: int = 8, expand: int = 4):
        super().__init__()
        h = c * expand
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), nn.ReLU())
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Conv2d(c, h, 1), nn.ReLU6(), nn.Conv2d(h, h, 3, 2, 1, groups=h),
                                                    nn.ReLU6(), nn.Conv2d(h, c, 1)) for _ in range(3)))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class SeparableChain(nn.Module):
    """PP-LCNet / MobileNetV1 style: depthwise 3x3 then pointwise 1x1, no skips and no expansion, so
    every tensor is a single-tensor cut and every piece of the chain holds one convolution."""

    def __init__(self, widths=(8, 8, 16, 16, 16, 16, 16, 16)):
        super().__init__()
        layers = [nn.Conv2d(3, widths[0], 3, 2, 1), nn.BatchNorm2d(widths[0]), nn.Hardswish()]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, a, 3, 1, 1, groups=a), nn.BatchNorm2d(a), nn.Hardswish(),
                       nn.Conv2d(a, b, 1), nn.BatchNorm2d(b), nn.Hardswish()]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], 10)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def _cbs(a: int, b: int, k: int = 1, s: int = 1) -> nn.Sequential:
    """Conv, BatchNorm, SiLU: ultralytics' Conv."""
    return nn.Sequential(nn.Conv2d(a, b, k, s, k // 2, bias=False), nn.BatchNorm2d(b), nn.SiLU())


class C2f(nn.Module):
    """YOLOv8's block: a 1x1 conv split in two channel halves, residual 3x3 pairs on the second,
    every piece concatenated into a last 1x1 conv."""

    def __init__(self, a: int, b: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.c = c = b // 2
        self.cv1, self.cv2 = _cbs(a, 2 * c), _cbs((2 + n) * c, b)
        self.m = nn.ModuleList(nn.Sequential(_cbs(c, c, 3), _cbs(c, c, 3)) for _ in range(n))
        self.shortcut = shortcut

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))  # as ultralytics exports it: a Split
        for m in self.m:
            y.append(y[-1] + m(y[-1]) if self.shortcut else m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class TinyYolo(nn.Module):
    """A YOLOv8-shaped detector: C2f stages, and a neck that concatenates the upsampled deep stage with
    an earlier one (a skip: the stages between have no single-tensor cut)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_cbs(3, 8, 3, 2), C2f(8, 8), _cbs(8, 16, 3, 2), C2f(16, 16, 2))
        self.deep = nn.Sequential(_cbs(16, 32, 3, 2), C2f(32, 32), _cbs(32, 32, 3, 1), C2f(32, 32))
        self.up = nn.Upsample(scale_factor=2.0)
        self.neck = C2f(48, 16, shortcut=False)
        self.head = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        p3 = self.stem(x)
        return self.head(self.neck(torch.cat([self.up(self.deep(p3)), p3], 1)))


def tiny_yolo(path: Path, **kw) -> Path:
    _seed()
    return export(_randomise_bn(TinyYolo()), (torch.randn(2, 3, 32, 32),), path, **kw)


class ChunkGate(nn.Module):
    """A gated conv (GLU: a * sigmoid(b) of a conv's two channel halves, by `chunk`) and a head that
    flattens by `x.size(0)`: torch's legacy exporter reads both sizes through Shape -> Gather."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 5)

    def forward(self, x):
        a, b = self.c1(x).chunk(2, 1)
        h = self.c2(a * torch.sigmoid(b)).mean((2, 3))
        return self.fc(h.view(h.size(0), -1))


def chunk_gate(path: Path, **kw) -> Path:
    _seed()
    return export(ChunkGate(), (torch.randn(2, 3, 6, 6),), path, **kw)


class TwoHeads(nn.Module):
    """A multi-output model: a shared trunk, logits and an embedding."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), BasicBlock(8, 8))
        self.cls = nn.Linear(8, 5)
        self.emb = nn.Linear(8, 4)

    def forward(self, x):
        f = self.trunk(x).mean((2, 3))
        return self.cls(f), self.emb(f)


def _randomise_bn(module: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that a train-mode conversion would show."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module.eval()


def export(module: nn.Module, args: tuple, path: Path, *, dynamo: bool = False, opset: int = 13,
           input_names=("input",), output_names=("logits",), dynamic_batch: bool = True, dynamic_seq: bool = False) -> Path:
    """Export with torch's legacy exporter (opset `opset`) or its dynamo exporter (external data);
    `dynamic_seq` makes axis 1 of every input dynamic too (the legacy exporter then records shape arithmetic)."""
    module = _randomise_bn(module)
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("N", min=1, max=1024)
            dims = tuple({0: batch} for _ in input_names) if dynamic_batch else None
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=list(input_names),
                              output_names=list(output_names), dynamic_shapes=dims, external_data=True)
        else:
            axes = {n: {0: "N"} for n in (*input_names, *output_names)} if dynamic_batch else None
            if dynamic_seq:
                axes = {n: {**axes.get(n, {}), **({1: "S"} if n in input_names else {})} for n in axes}
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=list(output_names), dynamic_axes=axes)
    return path


def tiny_resnet(path: Path, **kw) -> Path:
    _seed()
    return export(TinyResNet(), (torch.randn(2, 3, 16, 16),), path, **kw)


def tiny_resnet_bn(path: Path) -> Path:
    """TinyResNet with its BatchNormalization layers kept (not folded into the convolutions), as a
    teacher exported without constant folding has them (legacy exporter, opset 13); their running
    statistics are those of a made-up input distribution."""
    _seed()
    module = TinyResNet()
    for m in module.modules():  # running statistics of a made-up input distribution (shifted, scaled
        if isinstance(m, nn.BatchNorm2d):  # and spatially smooth), as training would leave them
            m.momentum = None
    module.train()
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(32, 3, 8, 8).repeat_interleave(2, 2).repeat_interleave(2, 3)
            module(1.0 + 2.0 * x)
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 3, 16, 16),), str(path), dynamo=False, opset_version=13,
                          do_constant_folding=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return Path(path)


def tiny_mobilenet(path: Path, **kw) -> Path:
    _seed()
    return export(TinyMobileNet(), (torch.randn(2, 3, 16, 16),), path, **kw)


def tiny_encoder(path: Path, **kw) -> Path:
    _seed()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    return export(TinyEncoder(), (ids, mask), path, input_names=("ids", "mask"), **kw)


def bert_style(path: Path, **kw) -> Path:
    _seed()
    ids = torch.randint(0, 60, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    kw.setdefault("output_names", ("pooled",))
    kw.setdefault("dynamic_seq", True)
    return export(BertStyle(), (ids, mask), path, input_names=("input_ids", "attention_mask"), **kw)


def tiny_fpn(path: Path, **kw) -> Path:
    _seed()
    return export(TinyFPN(), (torch.randn(2, 3, 16, 16),), path, output_names=("features",), **kw)


def lstm_tagger(path: Path, **kw) -> Path:
    _seed()
    kw.setdefault("opset", 12)
    return export(LstmTagger(), (torch.randint(0, 40, (2, 6)),), path, input_names=("ids",), **kw)


def plain_mobile(path: Path, **kw) -> Path:
    _seed()
    return export(PlainMobile(), (torch.randn(2, 3, 16, 16),), path, **kw)


def separable_chain(path: Path, **kw) -> Path:
    _seed()
    return export(_randomise_bn(SeparableChain()), (torch.randn(2, 3, 16, 16),), path, **kw)


def two_heads(path: Path, **kw) -> Path:
    _seed()
    return export(TwoHeads(), (torch.randn(2, 3, 8, 8),), path, output_names=("logits", "embedding"), **kw)


def initializers_to_constants(src: Path, dst: Path) -> Path:
    """The same graph with every initializer turned into a Constant node (as some toolchains write)."""
    model = onnx.load(str(src))
    consts = [helper.make_node("Constant", [], [i.name], value=i) for i in model.graph.initializer]
    names = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in names]
    del model.graph.initializer[:]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(consts + nodes)
    onnx.save(model, str(dst))
    return Path(dst)


def to_float16(src: Path, dst: Path) -> Path:
    """The same model computing in float16, float32 at its interface (as onnxconverter-common's
    `convert_float_to_float16(keep_io_types=True)` writes it): weights and inner tensors float16, a
    Cast after each input and before each output."""
    model = onnx.load(str(src))
    g = model.graph
    for init in g.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype("float16"), init.name))
    del g.value_info[:]
    nodes = list(g.node)
    casts_in = [helper.make_node("Cast", [i.name], [f"{i.name}_f16"], to=onnx.TensorProto.FLOAT16) for i in g.input]
    casts_out = [helper.make_node("Cast", [f"{o.name}_f16"], [o.name], to=onnx.TensorProto.FLOAT) for o in g.output]
    io = {v.name: f"{v.name}_f16" for v in [*g.input, *g.output]}
    for node in nodes:
        node.input[:] = [io.get(n, n) for n in node.input]
        node.output[:] = [io.get(n, n) for n in node.output]
    del g.node[:]
    g.node.extend([*casts_in, *nodes, *casts_out])
    onnx.save(onnx.shape_inference.infer_shapes(model), str(dst))
    return Path(dst)


def weight_tensor(model: onnx.ModelProto, name: str):
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))
