"""Calibration data: `.npz` files (one array per graph input, or a lone array for a one-input model),
or a folder of `.npz` shards for sets larger than memory. Checked against the model up front."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper

from ndonnx.errors import NdonnxError
from ndonnx.graph import Teacher


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints, or strings for symbolic dims


def input_specs(teacher: Teacher) -> list[InputSpec]:
    out = []
    for vi in teacher.model.graph.input:
        if vi.name in teacher.input_names:
            t = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
            out.append(InputSpec(vi.name, np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)), dims))
    return out


@dataclass
class Dataset:
    """Shards of arrays keyed by graph input name (and labels when asked for)."""

    shards: list[Path]
    specs: list[InputSpec]
    labels_key: str | None
    size: int

    def iter_shards(self) -> Iterator[dict[str, np.ndarray]]:
        for path in self.shards:
            yield _read_shard(path, self.specs, self.labels_key)

    def head(self, n: int) -> dict[str, np.ndarray]:
        """The first `n` samples' inputs (no labels): a sample run with the data's own shapes."""
        first = next(self.iter_shards())
        return {s.name: first[s.name][:n] for s in self.specs}

    def read_all(self) -> dict[str, np.ndarray]:
        parts = list(self.iter_shards())
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz (or of an .npy: one array); nothing is unpickled."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise NdonnxError(f"{path}: cannot be read ({e.strerror})") from e
    if magic[:2] != b"PK" and magic != b"\x93NUMPY":  # numpy would guess a pickle; say what it is not
        raise NdonnxError(f"{path}: not an .npz file (arrays saved with numpy.savez, one per model input)")
    try:
        if magic == b"\x93NUMPY":
            return {"array": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        msg = "holds object arrays, which are refused" if "pickle" in str(e) else f"is not a readable .npz file ({e})"
        raise NdonnxError(f"{path}: {msg}") from e


def _read_shard(path: Path, specs: list[InputSpec], labels_key: str | None) -> dict[str, np.ndarray]:
    arrays = _read_arrays(path)
    if not arrays:
        raise NdonnxError(f"{path}: empty data file")
    names = [s.name for s in specs]
    if len(specs) == 1 and names[0] not in arrays:
        candidates = [k for k in arrays if k != labels_key]
        if len(candidates) == 1:
            arrays[names[0]] = arrays.pop(candidates[0])
    out = {}
    for spec in specs:
        if spec.name not in arrays:
            raise NdonnxError(f"{path}: no array named {spec.name!r} (the model's inputs: {', '.join(names)}; "
                              f"the file holds: {', '.join(arrays)})")
        out[spec.name] = _check_array(path, spec, arrays[spec.name])
    n = len(out[names[0]])
    if labels_key is not None:
        if labels_key not in arrays:
            raise NdonnxError(f"{path}: no labels array named {labels_key!r} (the file holds: {', '.join(arrays)})")
        labels = arrays[labels_key]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise NdonnxError(f"{path}: labels {labels_key!r} must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        out[labels_key] = labels.astype(np.int64)
    for k, v in out.items():
        if len(v) != n:
            raise NdonnxError(f"{path}: arrays have different lengths ({names[0]}: {n}, {k}: {len(v)})")
    if n == 0:
        raise NdonnxError(f"{path}: no samples")
    return out


def _check_array(path: Path, spec: InputSpec, a: np.ndarray) -> np.ndarray:
    want = "x".join(str(d) for d in spec.shape)
    if a.dtype == object:
        raise NdonnxError(f"{path}: {spec.name!r} is an object array; refused")
    if a.ndim != len(spec.shape) or any(isinstance(d, int) and d > 0 and d != s for d, s in zip(spec.shape[1:], a.shape[1:])):
        raise NdonnxError(f"{path}: {spec.name!r} has shape {'x'.join(map(str, a.shape))}, the model expects {want}")
    if a.dtype != spec.dtype:
        if np.issubdtype(a.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating):
            a = a.astype(spec.dtype)
        elif np.issubdtype(a.dtype, np.integer) and np.issubdtype(spec.dtype, np.integer):
            a = a.astype(spec.dtype)
        else:
            raise NdonnxError(f"{path}: {spec.name!r} has dtype {a.dtype}, the model expects {spec.dtype}")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise NdonnxError(f"{path}: {spec.name!r} contains NaN or Inf")
    return a


def load_data(path: str | Path, teacher: Teacher, labels_key: str | None = None) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise NdonnxError(f"{path}: no such data file or folder")
    shards = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not shards:
        raise NdonnxError(f"{path}: folder holds no .npz shards")
    specs = input_specs(teacher)
    size = 0
    for shard in shards:  # validate every shard now: a bad one found mid-run would waste the run
        size += len(next(iter(_read_shard(shard, specs, labels_key).values())))
    return Dataset(shards=shards, specs=specs, labels_key=labels_key, size=size)


def teacher_hash(model: onnx.ModelProto) -> str:
    import hashlib

    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()[:16]
