"""The activation cache: one onnxruntime pass of the teacher over the calibration data, every
boundary and side-input tensor stored (float16 on disk, memory-mapped; in RAM when small)."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import mmap
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np
import onnx

from ndonnx.data import Dataset
from ndonnx.errors import NdonnxError
from ndonnx.files import atomic_write_text
from ndonnx.sample import ort_session

HOLDOUT = 0.1
FLOAT16_MAX = 60000.0  # a tensor with larger values is stored float32 (float16 would overflow to inf)
FLOAT16_TINY = 2.0 ** -10  # ... and one whose values all stay below this (float16: subnormal under 6.1e-5, 0 under 6e-8)
RAM_LIMIT = 2 << 30  # caches smaller than this are read fully into memory
PROBE = 16  # samples that show how each tensor follows the batch
BATCH_BYTES = 12 << 20  # a batch of the cache pass stores about this much, at most `batch` samples


def fingerprint(teacher_digest: str, data: Dataset) -> str:
    """What a cache was made from: the teacher's hash first, then the labels and the data files."""
    stats = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in data.shards]
    return f"{teacher_digest}|{data.labels_key}|{'|'.join(stats)}"


def build_cache(model: onnx.ModelProto, names: list[str], data: Dataset, cache_dir: Path, seed: int,
                fingerprint: str, batch: int = 256, progress=None, shape_only: list[str] = (), cuda: bool = False) -> None:
    """Write `names` for every sample of `data` into `cache_dir`, then the manifest (last, atomically:
    a cache without a manifest is incomplete and rebuilt). Tensors in `shape_only` are read by the
    students for their shape alone: only how their shape follows the batch is recorded. With `cuda`
    the teacher runs on the GPU where onnxruntime can (`ort_session`).

    Where the time went (bench/distill_speed.py, README): float32 tensors leave onnxruntime already
    float16 (a Cast in the graph costs a fraction of numpy's conversion), into buffers of our own
    (`_HalfSession`); batches are a power of two of about BATCH_BYTES (larger ones ran slower); each
    file is written front to back by a background thread, with direct writes where the file system
    allows (`_Rows`). Nothing is fsync'ed, like every other file of a run: the manifest guards against
    a killed process, not a lost machine."""
    manifest_path = cache_dir / "manifest.json"
    if manifest_path.exists():
        meta = json.loads(manifest_path.read_text())
        if meta.get("fingerprint") == fingerprint and all("dtype" in f for f in meta["files"].values()):
            return  # (a cache from before dtypes were recorded is made again)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, _Rows] = {}
    try:
        probed = _write_rows(model, names, data, cache_dir, files, batch, progress, list(shape_only), cuda)
        for f in files.values():
            f.close()
    except BaseException:  # an error or an interrupt: descriptors closed, files left unfinished (no manifest)
        for f in files.values():
            f.discard()
        raise
    entries = {}
    for k, f in files.items():
        axis, per = probed.layouts.get(k, (0, 1))
        entries[k] = {"file": f.path.name, "batch_axis": axis, "per_sample": per,
                      "dtype": str(probed.dtypes.get(k, f.dtype))}  # the teacher's: what reads give back
    perm = np.random.default_rng(seed).permutation(data.size)
    hold = max(1, int(round(HOLDOUT * data.size))) if data.size > 1 else 0
    np.save(cache_dir / "holdout.npy", np.sort(perm[:hold]))
    np.save(cache_dir / "train.npy", np.sort(perm[hold:]) if data.size > 1 else perm)
    atomic_write_text(manifest_path, json.dumps({"fingerprint": fingerprint, "size": data.size, "files": entries,
                                                 "shape_only": probed.shape_only}, indent=1))


def _write_rows(model: onnx.ModelProto, names: list[str], data: Dataset, cache_dir: Path, files: dict[str, _Rows],
                batch: int, progress, shape_only: list[str], cuda: bool) -> _Probed:
    """The pass itself: every sample's `names` into `files` (opened here, one per tensor, closed by the
    caller); how each tensor follows the batch is returned."""
    inputs = [s.name for s in data.specs]
    run = [k for k in names if k not in inputs]  # graph inputs come from the data, not from the session
    probed, teacher, first = None, None, None
    with _Writer() as writer:
        shards = list(data.iter_shards()) if progress is None else progress(data.iter_shards(), len(data.shards), "cache")
        for path, shard in zip(data.shards, shards):
            n = len(shard[inputs[0]])
            rows = {k: shard[k].shape[1:] for k in inputs}
            first = first or rows
            if rows != first:  # each tensor is one file of rows of one shape
                k = next(k for k in inputs if rows[k] != first[k])
                raise NdonnxError(f"{path.name}: {k!r} has samples of shape {list(rows[k])}, the first shard's are "
                                  f"{list(first[k])}; the activation cache needs one shape (pad to one length)")
            if teacher is None:  # a few samples tell: probing costs a fraction of a batch
                probed = _probe(model, names, shape_only, {k: shard[k][:PROBE] for k in inputs}, cuda)
                batch = _batch_size(batch, probed.bytes_per_sample())
                teacher = _HalfSession(model, run, probed, cuda)
            for lo in range(0, n, batch):
                feeds = {k: shard[k][lo:lo + batch] for k in inputs}
                outs, widened = teacher.run(feeds)
                if widened & files.keys():  # rows already written are rewritten float32
                    writer.settle()
                    for k in widened & files.keys():
                        files[k].widen()
                outs.update({k: v for k, v in feeds.items() if k in names})
                todo = []
                for k, v in outs.items():
                    axis, per = probed.layouts[k]
                    if axis is None:  # the same for every sample (a position table): stored once
                        if k not in files:
                            files[k] = _Rows(cache_dir / f"{len(files):04d}.npy", _stored(v.dtype, k in teacher.wide), v.shape)
                            todo.append((files[k], v))
                        continue
                    v = np.moveaxis(v, axis, 0)  # stored batch-first, one row per sample
                    v = v.reshape(len(v) // per, per, *v.shape[1:]) if per > 1 else v
                    if k not in files:
                        files[k] = _Rows(cache_dir / f"{len(files):04d}.npy", _stored(v.dtype, k in teacher.wide),
                                         (data.size, *v.shape[1:]))
                    if k in inputs and files[k].dtype == np.float16 and _needs_float32(v):  # data, converted here
                        writer.settle()
                        files[k].widen()
                    todo.append((files[k], v))
                writer.post(todo)
            if data.labels_key:
                files.setdefault("__labels__", _Rows(cache_dir / "labels.npy", np.int64, (data.size,)))
                writer.post([(files["__labels__"], shard[data.labels_key])])
    return probed


def _batch_size(most: int, sample_bytes: int) -> int:
    """Samples per batch: a power of two (a batch of rows then fills whole blocks of each file, so
    direct writes take onnxruntime's buffers uncopied), storing about BATCH_BYTES, at most `most`."""
    n = 1 << max(0, (BATCH_BYTES // max(1, sample_bytes)).bit_length() - 1)
    return max(1, min(most, n))


def _stored(dtype: np.dtype, wide: bool) -> np.dtype:
    """How a tensor is stored: float32 as float16, unless float16 cannot hold its values (`wide`)."""
    return np.dtype(np.float16) if dtype in (np.float16, np.float32) and not wide else np.dtype(dtype)


def _needs_float32(v: np.ndarray) -> bool:
    """Whether float16 cannot hold this tensor: its largest magnitude reaches FLOAT16_MAX (a Cast rounds
    it to inf) or stays below FLOAT16_TINY (float16 keeps few bits of it, or none: a tensor of zeros
    counts, as a Cast may have flushed it to zero)."""
    if not v.size or v.dtype not in (np.float16, np.float32):
        return False
    if v.dtype == np.float16:  # on the bits (numpy's float16 arithmetic is slow); NaN counts as large
        bits = v.reshape(-1).view(np.uint16)  # two reductions, no temporary: as uint16 the largest
        # negative magnitude is the maximum (if any value is negative), as int16 the largest positive one
        neg, pos = int(bits.max()), int(bits.view(np.int16).max())
        top = max(pos, neg - 0x8000 if neg >= 0x8000 else 0, 0)
        return top >= _F16_LIMIT_BITS or top < _F16_TINY_BITS
    top = max(float(v.max()), -float(v.min()))
    return not FLOAT16_TINY <= top < FLOAT16_MAX  # NaN too


_F16_LIMIT_BITS = int(np.array(FLOAT16_MAX, np.float16).view(np.uint16))
_F16_TINY_BITS = int(np.array(FLOAT16_TINY, np.float16).view(np.uint16))


class _HalfSession:
    """The teacher giving `names`, float32 ones through a Cast to float16 in the graph (a fraction of
    numpy's cost), except those float16 cannot hold (`wide`, see `_needs_float32`): they are given float32.

    Full batches are written into two sets of page-aligned buffers of our own, used in turn: fresh
    output memory for every batch cost page faults, and aligned rows go to direct writes uncopied.
    A set is reused two batches later, when the writer has settled the batch written from it."""

    def __init__(self, model: onnx.ModelProto, names: list[str], probed: _Probed, cuda: bool = False):
        self.model, self.names, self.probed, self.wide, self.cuda = model, names, probed, set(), cuda
        self._build()

    def _build(self) -> None:
        self.half = {k: f"{k}__ndonnx_f16" for k in self.names if self.probed.dtypes[k] == np.float32 and k not in self.wide}
        casts = [onnx.helper.make_node("Cast", [k], [h], to=onnx.TensorProto.FLOAT16) for k, h in self.half.items()]
        self.sess = None  # (a session being remade goes first)
        self.sess = ort_session(self.model, self.cuda, [*(k for k in self.names if k not in self.half),
                                                        *self.half.values()], casts)
        self.outputs = [self.half.get(k, k) for k in self.names]
        self.bound: tuple[int, list[list[np.ndarray]]] | None = None  # (batch size, two sets of buffers)
        self.turn = 0

    def run(self, feeds: dict) -> tuple[dict[str, np.ndarray], set[str]]:
        """The outputs for `feeds`, and the tensors that became float32 with this batch (it is run again)."""
        widened: set[str] = set()
        while True:
            outs = dict(zip(self.names, self._run(feeds)))
            over = {k for k in self.half if _needs_float32(outs[k])}
            if not over:
                return outs, widened
            self.wide |= over
            widened |= over
            self._build()

    def _run(self, feeds: dict) -> list[np.ndarray]:
        n = len(next(iter(feeds.values())))
        if self.bound is None:  # sized for the first batch, from the probe
            sizes = [(self.probed.shape_at(k, n), np.float16 if k in self.half else self.probed.dtypes[k]) for k in self.names]
            self.bound = (n, [[_aligned(*size) for size in sizes] for _ in range(2)])
        if self.bound[0] != n:  # a shard's last, shorter batch
            return self.sess.run(self.outputs, feeds)
        bufs = self.bound[1][self.turn]
        self.turn ^= 1
        binding = self.sess.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, np.ascontiguousarray(v))
        for name, buf in zip(self.outputs, bufs):
            binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        self.sess.run_with_iobinding(binding)
        return bufs


def _aligned(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A zeroed page-aligned array (an anonymous memory map, its pages made at once: faulting them in
    one at a time cost a third of a batch)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, max(n, 1), flags=flags), np.uint8)[:n].view(dtype).reshape(shape)


class _Writer:
    """Writes each batch's rows on one background thread, in order, while onnxruntime computes the
    next batch; one batch at most waits to be written."""

    def __init__(self):
        self.pool, self.pending = ThreadPoolExecutor(1), None

    def post(self, todo: list[tuple[_Rows, np.ndarray]]) -> None:
        self.settle()
        self.pending = self.pool.submit(lambda: [rows.write(v) for rows, v in todo])

    def settle(self) -> None:
        """Wait for what was posted (a failed write raises here)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.settle()  # a failed write raises even after another error: the first one is chained
        finally:
            self.pool.shutdown()


class _Rows:
    """One .npy file written front to back: the header for all rows, then each batch's rows in turn.

    Written with O_DIRECT where the file system allows it: the bytes go from our buffer to the disk
    without the page cache, whose copies and writeback took CPU from onnxruntime's threads (on 2 cores
    the writes slowed inference by 20%). Direct writes must start and end on BLOCK boundaries: the
    header is padded to one block, each write sends whole blocks and keeps the tail for the next, and
    close() sends the last block padded, then cuts the file to its true length."""

    def __init__(self, path: Path, dtype, shape: tuple):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), tuple(shape)
        self.fd = _open_direct(path)
        self.tail = np.zeros(0, np.uint8)  # bytes written by no whole block yet
        self.size = 0  # bytes sent to the file
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": self.shape})
        head = header.getvalue()  # numpy pads it to 64 bytes ending in a newline: widen that padding
        head = head[:-1] + b" " * (-len(head) % BLOCK) + b"\n"
        head = head[:8] + (len(head) - 10).to_bytes(2, "little") + head[10:]  # the header's length field
        self.start = len(head)
        self._send(np.frombuffer(head, np.uint8))

    def write(self, v: np.ndarray) -> None:
        self._send(np.ascontiguousarray(v, self.dtype).reshape(-1).view(np.uint8))

    def _send(self, data: np.ndarray) -> None:
        if len(self.tail):  # complete the pending block first
            fill = data[:BLOCK - len(self.tail)]
            data = data[len(fill):]
            self.tail = np.concatenate([self.tail, fill])
            if len(self.tail) < BLOCK:
                return
            self._put(self.tail)
        whole = len(data) - len(data) % BLOCK
        if whole:
            self._put(data[:whole])
        self.tail = data[whole:].copy()

    def _put(self, blocks: np.ndarray) -> None:
        """Send whole blocks. Direct writes read aligned memory only: onnxruntime's outputs are written
        into aligned buffers (`_HalfSession`) and go as they are; other bytes are copied to a staging buffer."""
        if blocks.ctypes.data % BLOCK == 0:
            self._write(blocks)
            return
        for lo in range(0, len(blocks), STAGE):
            part = blocks[lo:lo + STAGE]
            staged = _stage(len(part))[:len(part)]
            staged[:] = part
            self._write(staged)

    def _write(self, blocks: np.ndarray) -> None:
        view, done = memoryview(blocks), 0
        while done < len(blocks):
            try:
                done += os.write(self.fd, view[done:])
            except OSError as e:  # a file system that opened the file O_DIRECT but refuses such writes
                flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
                if e.errno != errno.EINVAL or not flags & _O_DIRECT:
                    raise
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
        self.size += len(blocks)

    def widen(self) -> None:
        """Rewrite as float32 (the rows written so far were in float16's range) and go on in float32."""
        self.close()
        done = np.fromfile(self.path, np.float16, offset=self.start)
        self.path.unlink()
        self.__init__(self.path.with_suffix(".f32.npy"), np.float32, self.shape)
        self.write(done)

    def discard(self) -> None:
        """Close without finishing the file (the cache is abandoned)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        if self.fd is None:
            return
        n = self.size + len(self.tail)
        if len(self.tail):
            self._put(np.concatenate([self.tail, np.zeros(BLOCK - len(self.tail), np.uint8)]))
        os.ftruncate(self.fd, n)
        os.close(self.fd)
        self.fd = None


BLOCK = 4096  # the largest logical block size direct writes ask alignment to
STAGE = 8 << 20  # bytes per staged direct write
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere plain writes
_local = threading.local()  # a staging buffer per thread: the main thread writes headers while the writer writes rows


def _stage(n: int) -> np.ndarray:
    """This thread's aligned buffer of at least n bytes."""
    if getattr(_local, "stage", None) is None or len(_local.stage) < n:
        _local.stage = _aligned((max(n, STAGE),), np.uint8)
    return _local.stage


def _open_direct(path: Path) -> int:
    """A new file open for writing, with O_DIRECT where the file system takes it (tmpfs does not)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, 0o644)
        except OSError:
            pass
    return os.open(path, flags, 0o644)


@dataclass
class _Probed:
    layouts: dict[str, tuple[int | None, int]]  # tensor -> (batch axis or None, rows per sample)
    shape_only: dict[str, dict]  # tensor -> its shapes at one sample and at n (see `shape_at`)
    dtypes: dict[str, np.dtype]
    shapes: dict[str, tuple[int, ...]]  # at the probe's n samples
    n: int

    def bytes_per_sample(self) -> int:
        """What one sample adds to the cache (float32 stored float16)."""
        return int(sum(np.prod(self.shapes[k]) // self.n * _stored(d, False).itemsize
                       for k, d in self.dtypes.items() if self.layouts[k][0] is not None))

    def shape_at(self, name: str, batch: int) -> tuple[int, ...]:
        axis, per = self.layouts[name]
        shape = list(self.shapes[name])
        if axis is not None:
            shape[axis] = batch * per
        return tuple(shape)


def _probe(model: onnx.ModelProto, names: list[str], shape_only: list[str],
           feeds: dict, cuda: bool = False) -> _Probed:
    """How each tensor follows the batch, from a batch (n samples) and its last sample alone; and
    each tensor's dtype and shape at n.

    Layouts: (batch axis, rows per sample); the axis is None for a tensor that is the same whatever
    the batch, and rows per sample > 1 for a flattened (batch*seq, ...) tensor. Shape-only tensors:
    their shapes at both sizes, so that any batch size's shape follows (see `shape_at`).

    The lone sample is the batch's last, so an integer tensor whose values name a sample's place in
    the batch (the (sentence, position) pairs of a ragged token batch) differs from its rows there
    and is refused: cached rows would point into batches that training never builds."""
    every = names + [n for n in shape_only if n not in names]
    sess = ort_session(model, cuda, every)
    n = len(next(iter(feeds.values())))
    big = dict(zip(every, sess.run(every, feeds)))
    big.update({k: v for k, v in feeds.items() if k in every})
    one = {k: v[-1:] for k, v in feeds.items()}
    small = dict(zip(every, sess.run(every, one)))
    small.update({k: v for k, v in one.items() if k in every})
    layouts = {}
    for k in names:
        diff = [j for j, (a, b) in enumerate(zip(big[k].shape, small[k].shape)) if a != b]
        if n < 2:
            layouts[k] = (0, 1)
        elif not diff:
            layouts[k] = (None, 1)
        elif len(diff) == 1 and big[k].shape[diff[0]] == n * small[k].shape[diff[0]]:
            layouts[k] = (diff[0], small[k].shape[diff[0]])
            axis, rows = layouts[k]
            last = np.take(big[k], range((n - 1) * rows, n * rows), axis=axis)
            if not np.issubdtype(big[k].dtype, np.floating) and not np.array_equal(last, small[k]):
                raise NdonnxError(f"tensor {k!r} holds values that depend on a sample's place in the batch "
                                  "(e.g. the positions of a ragged token batch); ndonnx cannot cache it")
        else:
            raise NdonnxError(f"tensor {k!r} changes shape with the batch in a way ndonnx cannot cache "
                              f"({list(small[k].shape)} for one sample, {list(big[k].shape)} for {n})")
    shapes = {k: {"one": list(small[k].shape), "many": list(big[k].shape), "n": n, "dtype": str(big[k].dtype)}
              for k in shape_only}
    return _Probed(layouts, shapes, {k: big[k].dtype for k in names}, {k: big[k].shape for k in names}, n)


def shape_at(rule: dict, batch: int) -> list[int]:
    """A shape-only tensor's shape for `batch` samples: each dim is linear in the batch size."""
    if rule["n"] < 2:
        return [batch if j == 0 else d for j, d in enumerate(rule["many"])]
    return [a + (b - a) * (batch - 1) // (rule["n"] - 1) for a, b in zip(rule["one"], rule["many"])]


@dataclass
class CacheReader:
    """Reads cached tensors by name and sample index; memory-mapped, or in RAM when small.
    Shape-only tensors read as zero-stride zeros of the right shape (no memory behind them)."""

    directory: Path

    def __post_init__(self):
        path = self.directory / "manifest.json"
        if not path.exists():  # build_cache writes it last: without it the cache is incomplete
            raise NdonnxError(f"{self.directory}: incomplete activation cache (no manifest); rerun the distillation")
        meta = json.loads(path.read_text())
        self.fingerprint = meta["fingerprint"]
        self.size = meta["size"]
        self.arrays = {k: np.load(self.directory / f["file"], mmap_mode="r") for k, f in meta["files"].items()}
        self.batch_axis = {k: f["batch_axis"] for k, f in meta["files"].items()}
        self.per_sample = {k: f.get("per_sample", 1) for k, f in meta["files"].items()}
        self.shape_only = meta.get("shape_only", {})
        # float16 storage reads back float32, unless the teacher's tensor is float16 itself
        self.dtype = {k: np.dtype(np.float32 if a.dtype == np.float16 and meta["files"][k].get("dtype") != "float16"
                                  else a.dtype) for k, a in self.arrays.items()}
        widened = sum(a.nbytes * (2 if a.dtype == np.float16 else 1) for a in self.arrays.values())
        # small: each tensor goes to RAM when first read, already in the dtype reads give, so a batch
        # is one indexing (a job reads a few of the tensors: converting them all cost ~2 s per job)
        self._in_ram = widened < RAM_LIMIT
        self.train = np.load(self.directory / "train.npy")
        self.holdout = np.load(self.directory / "holdout.npy")

    @property
    def teacher_hash(self) -> str:
        return self.fingerprint.split("|")[0]

    def read(self, name: str, idx: np.ndarray) -> np.ndarray:
        if name in self.shape_only:
            rule = self.shape_only[name]
            return np.broadcast_to(np.zeros((), rule["dtype"]), shape_at(rule, len(idx)))
        axis = self.batch_axis.get(name, 0)
        if axis is None:  # one copy, the same for every sample
            return np.asarray(self.arrays[name], self.dtype[name])
        if self._in_ram and isinstance(self.arrays[name], np.memmap):
            self.arrays[name] = np.asarray(self.arrays[name], self.dtype[name])
        a = self.arrays[name][idx]  # callers pass sorted indices: sequential reads from a memmap
        a = a.astype(self.dtype[name]) if a.dtype != self.dtype[name] else np.asarray(a)
        if self.per_sample.get(name, 1) > 1:
            a = a.reshape(-1, *a.shape[2:])
        return np.moveaxis(a, 0, axis)

    def tensors(self, names: list[str], idx: np.ndarray) -> Mapping[str, np.ndarray]:
        """The cached tensors `names` at samples `idx`, each read when first asked for."""
        return _Tensors(self, tuple(n for n in names if n in self.arrays or n in self.shape_only), idx)

    def labels(self, idx: np.ndarray) -> np.ndarray | None:
        return self.read("__labels__", idx) if "__labels__" in self.arrays else None


class _Tensors(Mapping):
    def __init__(self, reader: CacheReader, names: tuple[str, ...], idx: np.ndarray):
        self.reader, self.names, self.idx, self.read = reader, names, idx, {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        if name not in self.read:
            self.read[name] = self.reader.read(name, self.idx)
        return self.read[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
