"""Calibration data of real English sentences for the zoo2 BERT encoders, from text already on the machine.

    python bench/zoo2/sentences.py OUT_DIR [--model /tmp/zoo2/hf_bert_legacy.onnx] [--length 32]
                                   [--train 2000] [--test 500] [--seed 0]

Source: the docstrings of the running interpreter's standard library, read with `ast` from the
.py files under sysconfig's stdlib path (nothing is imported or executed; test suites,
idlelib, lib2to3, site-packages, ensurepip's bundled wheels and `this.py` are skipped). Every
docstring (module, class, function) is cut into paragraphs; paragraphs that look like code or
doctests are dropped; the rest is split into sentences, and only plain-prose ASCII sentences of
6-40 words that start with a capital letter and end with . ? or ! are kept, deduplicated and
sorted. The same CPython version therefore gives the same sentences on any machine: no
download, no dependency on which Debian packages happen to be installed (CPython 3.11.7 gives
6,123 distinct sentences).

The sorted sentences are shuffled with random.Random(seed); the first --test form the held-out
set, the next --train the training set. A WordPiece tokenizer (tokenizers'
BertWordPieceTokenizer, lowercase, [PAD]/[UNK]/[CLS]/[SEP]/[MASK]) is trained on every sentence
that is not held out, with vocab_size = the model's vocabulary (first dim of the word-embedding
table: the rank-2 initializer that a Gather indexes with input_ids). tokenizers' trainer has no
seed and is not deterministic as it stands (see train_tokenizer for why and the fix); the script
trains twice and stops if the two vocabularies differ. Each sentence becomes [CLS] ... [SEP],
truncated and padded with [PAD] to --length tokens (token_type_ids all 0: one segment).

Writes to OUT_DIR:
  sentences_train.npz, sentences_test.npz  input_ids, attention_mask, token_type_ids (int64, N x length)
  sentences_train.txt, sentences_test.txt  the sentences, one a line, in the same order
  vocab.txt                                the WordPiece vocabulary (line number = token id)
  sentences.json                           source, versions, counts, vocab size, sha256 of the sentence lists

Needs `tokenizers` (with onnx and numpy): it runs in the /tmp/zoo-hf venv that export_zoo2.py
describes (`python -m venv --system-site-packages /tmp/zoo-hf && /tmp/zoo-hf/bin/pip install
transformers`, which brings tokenizers), e.g.

    /tmp/zoo-hf/bin/python bench/zoo2/sentences.py /tmp/zoo2/sentences
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages", "_bundled",
             "__pycache__", "turtledemo"}
SKIP_FILES = {"this.py", "antigravity.py"}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_ABBREV = re.compile(r"\b(e\.g|i\.e|etc|vs|cf|Mr|Dr|No|approx)\.$", re.IGNORECASE)
_WORD = re.compile(r"^[A-Za-z][A-Za-z'\-]*[A-Za-z]?[.,;:!?]?$|^[aAI][.,;:!?]?$|^\d{1,4}[.,;:]?$")


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or p.name in SKIP_FILES or p.name.startswith("test_"):
            continue
        out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node, clean=True)
            if d:
                out.append(d)
    return out


def prose_paragraphs(doc: str) -> list[str]:
    """Paragraphs of a docstring that read as prose: no doctests, no indented (code/list) lines."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.split("\n")
        if any(ln.lstrip().startswith((">>>", "...", "$ ", "%", "#", "-", "*", "+", "|", "=")) for ln in lines):
            continue
        if any(ln.startswith((" ", "\t")) for ln in lines):
            continue
        if para.rstrip().endswith("::"):
            continue
        out.append(" ".join(ln.strip() for ln in lines))
    return out


def is_sentence(s: str) -> bool:
    if not s.isascii() or not s[:1].isupper() or s[-1] not in ".?!" or _ABBREV.search(s):
        return False
    words = s.split()
    if not 6 <= len(words) <= 40:
        return False
    if any(not _WORD.match(w) for w in words):  # identifiers, code, paths, markup, quotes
        return False
    return sum(c.isalpha() or c == " " for c in s) / len(s) >= 0.9


def sentences() -> list[str]:
    seen = set()
    for path in stdlib_files():
        for doc in docstrings(path):
            for para in prose_paragraphs(doc):
                for s in _SPLIT.split(re.sub(r"\s+", " ", para).strip()):
                    s = s.strip()
                    if is_sentence(s):
                        seen.add(s)
    return sorted(seen)


def model_vocab(model: Path) -> int:
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type == "Gather" and node.input[1] == "input_ids" and node.input[0] in inits:
            dims = list(inits[node.input[0]].dims)
            if len(dims) == 2:
                return int(dims[0])
    raise SystemExit(f"{model}: no Gather of a rank-2 initializer indexed by input_ids (word embeddings)")


def train_tokenizer(texts: list[str], vocab_size: int):
    """tokenizers' WordPiece trainer, made deterministic; returns a fresh BertWordPieceTokenizer on its vocabulary.

    The trainer (a BPE trainer underneath) breaks ties between equally frequent pairs by token id,
    and gives the continuation characters ("##e") ids in the iteration order of a Rust HashMap of
    words, which is randomly seeded per process: the last merges, and so the vocabulary, changed
    from run to run. Passing every continuation character, sorted, as a special token makes those
    ids fixed (special tokens get the first ids), so the whole training is deterministic. The
    tokenizer is then rebuilt from the learned vocabulary with only the five real special tokens,
    so "##e" is an ordinary vocabulary entry, as in BERT's own vocab.txt.
    """
    from tokenizers import BertWordPieceTokenizer

    def fresh(vocab=None):
        return BertWordPieceTokenizer(vocab, lowercase=True, clean_text=True, handle_chinese_chars=True,
                                      strip_accents=True, wordpieces_prefix="##")

    tok = fresh()
    cont = set()
    for t in texts:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(t)):
            cont.update(word[1:])
    pinned = SPECIALS + ["##" + c for c in sorted(cont)]
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, limit_alphabet=1000,
                            special_tokens=pinned, wordpieces_prefix="##", show_progress=False)
    return fresh(tok.get_vocab())


def encode(tok, texts: list[str], length: int):
    import numpy as np

    tok.enable_truncation(max_length=length)
    tok.enable_padding(length=length, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    arr = lambda f: np.array([f(e) for e in enc], dtype=np.int64)
    return {"input_ids": arr(lambda e: e.ids), "attention_mask": arr(lambda e: e.attention_mask),
            "token_type_ids": arr(lambda e: e.type_ids)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--model", type=Path, default=Path("/tmp/zoo2/hf_bert_legacy.onnx"))
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    import numpy as np
    import tokenizers

    vocab = model_vocab(a.model)
    sents = sentences()
    if len(sents) < a.train + a.test:
        raise SystemExit(f"only {len(sents)} sentences found, {a.train + a.test} needed")
    order = list(sents)
    random.Random(a.seed).shuffle(order)
    test, pool = order[:a.test], order[a.test:]
    train = pool[:a.train]

    tok = train_tokenizer(pool, vocab)
    again = train_tokenizer(pool, vocab)
    if tok.get_vocab() != again.get_vocab():
        raise SystemExit("tokenizers' WordPiece training was not deterministic here")
    got = tok.get_vocab_size()
    if got > vocab:
        raise SystemExit(f"tokenizer vocabulary {got} exceeds the model's {vocab}")

    a.out_dir.mkdir(parents=True, exist_ok=True)
    id2tok = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (a.out_dir / "vocab.txt").write_text("".join(t + "\n" for t, _ in id2tok), encoding="utf-8")
    info = {"source": f"docstrings of the CPython {sys.version.split()[0]} standard library "
                      f"({sysconfig.get_paths()['stdlib']}), read with ast",
            "python": sys.version, "tokenizers": tokenizers.__version__, "model": str(a.model),
            "model_vocab": vocab, "tokenizer_vocab": got, "length": a.length, "seed": a.seed,
            "sentences_found": len(sents), "files": {}}
    for name, texts in (("train", train), ("test", test)):
        arrays = encode(tok, texts, a.length)
        assert int(arrays["input_ids"].max()) < vocab
        np.savez(a.out_dir / f"sentences_{name}.npz", **arrays)
        (a.out_dir / f"sentences_{name}.txt").write_text("".join(s + "\n" for s in texts), encoding="utf-8")
        real = arrays["attention_mask"].sum(1)
        unk = int((arrays["input_ids"] == tok.token_to_id("[UNK]")).sum())
        info["files"][name] = {
            "sentences": len(texts), "sha256_text": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
            "tokens_mean": round(float(real.mean()), 2), "truncated": int((real == a.length).sum()), "unk": unk}
        print(f"{name}: {len(texts)} sentences -> {a.out_dir / f'sentences_{name}.npz'} "
              f"(tokens/sentence mean {real.mean():.1f}, {int((real == a.length).sum())} truncated at {a.length}, "
              f"{unk} [UNK])")
    (a.out_dir / "sentences.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"{len(sents)} distinct sentences from the stdlib docstrings; vocab {got} (model {vocab})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
