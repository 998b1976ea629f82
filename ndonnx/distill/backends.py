"""Where the job groups of a run execute. `local`: a process pool on this machine, one worker per core
on CPU and one per GPU on CUDA (each pinned to its device). `ray`: `ndonnx.distill.ray_backend`.
Either way the workers only train and return weights and records; this process (the driver) writes
them, so it stays the only writer of the run directory. No torch at import: pool workers load this
module before they are pinned to a GPU."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import signal
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Callable


@dataclass(frozen=True)
class LocalPlan:
    workers: int
    threads: int  # torch intra-op threads of each job
    devices: tuple[str | None, ...]  # CUDA_VISIBLE_DEVICES of each worker (None: CPU, left as it is)


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them (indices or UUIDs)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:n] if len(listed) >= n else [str(k) for k in range(n)]


def plan_local(device: str, jobs: int, groups: int) -> LocalPlan:
    """CPU: `jobs` workers (default one per core), the cores shared out as threads. CUDA: one worker per
    GPU by default; more (`--jobs`) are dealt round-robin over the GPUs. Never more workers than groups."""
    if device == "cuda":
        gpus = visible_gpus() or ["0"]
        workers = max(1, min(jobs or len(gpus), groups))
        devices = tuple(gpus[k % len(gpus)] for k in range(workers)) if len(gpus) > 1 else (None,) * workers
        return LocalPlan(workers, 1, devices)
    cores = os.cpu_count() or 1
    workers = max(1, min(jobs or cores, groups))
    return LocalPlan(workers, max(1, cores // workers), (None,) * workers)


def run_pool(batches: list, plan: LocalPlan, progress: Callable | None) -> None:
    """Train the groups in `plan.workers` processes; write each group's results here as it comes back."""
    from ndonnx.distill.job import train_group, write_results

    # Not `with`: its exit waits for the jobs in flight. On an interrupt the pool is stopped instead.
    # Workers ended mid-job can leave a queue semaphore for multiprocessing's resource tracker, which
    # removes it and says so at exit; harmless, and not the user's concern (the tracker reads this
    # variable: it is its own process).
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:multiprocessing.resource_tracker")
    ctx = multiprocessing.get_context("spawn")
    pins = ctx.SimpleQueue()  # each worker takes one device as it starts
    for d in plan.devices:
        pins.put(d)
    pool = None
    try:
        with _signals_ignored(signal.SIGINT):  # workers inherit it ignored: a ^C to the group reaches only us
            pool = ProcessPoolExecutor(max_workers=plan.workers, mp_context=ctx, initializer=worker_start,
                                       initargs=(pins, os.getpid()))
            futures = {pool.submit(train_group, g): g for g in batches}

        def finished():
            for f in as_completed(futures):
                # popped: a future keeps its result (a group's trained weights and fitted students) as
                # long as it is referenced, so the driver held every group's until the pool finished
                group = futures.pop(f)
                write_results(group, f.result())
                yield f"finished neighbourhood {group[0].neighbourhood} ({plan.workers} workers)"

        for _ in shown(finished(), progress, len(batches)):
            pass
    except BaseException:
        if pool is not None:
            _stop(pool)
        raise
    pool.shutdown()


def worker_start(pins, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is the parent's to handle: it ends the workers
    end_with_parent(parent)
    pin(pins.get())


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(parent: int) -> bool:
    """Have the kernel send this process SIGTERM when its parent dies, however it dies (SIGKILL, an
    OOM kill, a CI timeout): orphaned workers trained on for an hour, and held the dead driver's
    stdout open, so a caller reading it hung. Linux only (elsewhere False). The parent is the
    driver's main thread, which lives as long as the driver (the pool starts its workers from it)."""
    if platform.system() != "Linux":
        return False
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # it died before the request: nobody would send the signal
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def pin(device: str | None) -> None:
    """Pin this worker to one GPU. CUDA reads the variable when it first starts in the process, which
    a pool worker has not done yet; "cuda" then means that GPU to torch and onnxruntime alike."""
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device


@contextlib.contextmanager
def _signals_ignored(*signals: signal.Signals):
    """Signals dropped (main thread only). SIGINT while the workers start: they inherit it ignored (a
    handler would not survive their exec), SIGTERM not, as `_stop` ends them with it. Both while the
    workers are stopped, so that a second ^C cannot cut the stop short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the workers now; a second ^C meanwhile is ignored, so
    stopping cannot be cut short and leave workers behind. Finished jobs are already journalled."""
    with _signals_ignored(signal.SIGINT, signal.SIGTERM):
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def with_threads(batches: list, threads: int, device: str | None = None) -> list:
    """The groups with each job's thread count (and device, when the backend decides it) set."""
    def set_(j):
        s = replace(j.settings, threads=threads, **({"device": device} if device else {}))
        return replace(j, settings=s)
    return [[set_(j) for j in g] for g in batches]


def shown(items, progress: Callable | None, total: int | None = None, label: str = "distill"):
    """`items` through the progress bar when there is one; labels say which neighbourhood."""
    if progress is None:
        return items
    items = items if total is not None else list(items)
    return progress(items, total if total is not None else len(items), label)
