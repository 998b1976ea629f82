"""The activation cache: one onnxruntime pass of the teacher over the calibration data, every
boundary and side-input tensor stored (float16 on disk, memory-mapped; in RAM when small)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ndonnx.data import Dataset
from ndonnx.sample import ort_session

HOLDOUT = 0.1
FLOAT16_MAX = 60000.0  # a tensor with larger values is stored float32 (float16 would overflow to inf)
RAM_LIMIT = 2 << 30  # caches smaller than this are read fully into memory


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_cache(model: onnx.ModelProto, names: list[str], data: Dataset, cache_dir: Path, seed: int,
                fingerprint: str, batch: int = 256, progress=None) -> None:
    """Write `names` for every sample of `data` into `cache_dir`, then the manifest (last, atomically:
    a cache without a manifest is incomplete and rebuilt)."""
    manifest_path = cache_dir / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text()).get("fingerprint") == fingerprint:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    sess = ort_session(m)
    inputs = [s.name for s in data.specs]
    files: dict[str, np.ndarray] = {}
    axes: dict[str, int] = {}  # the batch axis of each tensor (seq-first transformers carry it at 1)
    pos = 0
    shards = list(data.iter_shards()) if progress is None else progress(data.iter_shards(), len(data.shards), "cache")
    for shard in shards:
        n = len(shard[inputs[0]])
        for lo in range(0, n, batch):
            feeds = {k: shard[k][lo:lo + batch] for k in inputs}
            outs = dict(zip(names, sess.run(names, feeds)))
            outs.update({k: v for k, v in feeds.items() if k in names})
            if not axes:
                axes = _batch_axes(sess, names, feeds, outs)
            for k, v in outs.items():
                v = np.moveaxis(v, axes[k], 0)  # stored batch-first
                if k not in files:
                    # float16 from the start (half the bytes to write); upgraded if a value overflows
                    dtype = np.float16 if v.dtype == np.float32 else v.dtype
                    files[k] = np.lib.format.open_memmap(cache_dir / f"{len(files):04d}.npy", mode="w+",
                                                         dtype=dtype, shape=(data.size, *v.shape[1:]))
                if files[k].dtype == np.float16 and np.abs(v).max(initial=0.0) >= FLOAT16_MAX:
                    files[k] = _to_float32(files[k])
                files[k][pos:pos + len(v)] = v
            pos += len(feeds[inputs[0]])
        if data.labels_key:
            files.setdefault("__labels__", np.lib.format.open_memmap(
                cache_dir / "labels.npy", mode="w+", dtype=np.int64, shape=(data.size,)))
            files["__labels__"][pos - n:pos] = shard[data.labels_key]
    entries = {}
    for k, arr in files.items():
        arr.flush()
        entries[k] = {"file": Path(arr.filename).name, "batch_axis": axes.get(k, 0)}
    perm = np.random.default_rng(seed).permutation(data.size)
    hold = max(1, int(round(HOLDOUT * data.size))) if data.size > 1 else 0
    np.save(cache_dir / "holdout.npy", np.sort(perm[:hold]))
    np.save(cache_dir / "train.npy", np.sort(perm[hold:]) if data.size > 1 else perm)
    atomic_write_text(manifest_path, json.dumps({"fingerprint": fingerprint, "size": data.size, "files": entries}, indent=1))


def _to_float32(half: np.memmap) -> np.memmap:
    """Rewrite a float16 cache file as float32 (values written so far were in range)."""
    path = Path(half.filename)
    full = np.lib.format.open_memmap(path.with_suffix(".f32.npy"), mode="w+", dtype=np.float32, shape=half.shape)
    for lo in range(0, len(half), 4096):
        full[lo:lo + 4096] = half[lo:lo + 4096]
    full.flush()
    del half
    path.unlink()
    return full


def _batch_axes(sess, names: list[str], feeds: dict, outs: dict) -> dict[str, int]:
    """The axis of each tensor that follows the batch: the one whose size changes when the same
    graph runs on one sample instead of the whole first batch (axis 0 when nothing tells)."""
    n = len(next(iter(feeds.values())))
    if n < 2:
        return {k: 0 for k in outs}
    one = {k: v[:1] for k, v in feeds.items()}
    small = dict(zip(names, sess.run(names, one)))
    small.update({k: v for k, v in one.items() if k in names})
    axes = {}
    for k, v in outs.items():
        diff = [j for j, (a, b) in enumerate(zip(v.shape, small[k].shape)) if a != b]
        axes[k] = diff[0] if len(diff) == 1 else 0
    return axes


@dataclass
class CacheReader:
    """Reads cached tensors by name and sample index; memory-mapped, or in RAM when small."""

    directory: Path

    def __post_init__(self):
        meta = json.loads((self.directory / "manifest.json").read_text())
        self.size = meta["size"]
        self.arrays = {k: np.load(self.directory / f["file"], mmap_mode="r") for k, f in meta["files"].items()}
        self.batch_axis = {k: f["batch_axis"] for k, f in meta["files"].items()}
        widened = sum(a.nbytes * (2 if a.dtype == np.float16 else 1) for a in self.arrays.values())
        if widened < RAM_LIMIT:  # small: in RAM, already float32, so a batch is one indexing
            self.arrays = {k: np.asarray(a, np.float32 if a.dtype == np.float16 else a.dtype)
                           for k, a in self.arrays.items()}
        self.train = np.load(self.directory / "train.npy")
        self.holdout = np.load(self.directory / "holdout.npy")

    def read(self, name: str, idx: np.ndarray) -> np.ndarray:
        a = self.arrays[name][idx]  # callers pass sorted indices: sequential reads from a memmap
        a = a.astype(np.float32) if a.dtype == np.float16 else np.asarray(a)
        return np.moveaxis(a, 0, self.batch_axis.get(name, 0))

    def labels(self, idx: np.ndarray) -> np.ndarray | None:
        return self.read("__labels__", idx) if "__labels__" in self.arrays else None
