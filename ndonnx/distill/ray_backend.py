"""`--backend ray`: each neighbourhood's job group is one Ray task.

Without RAY_ADDRESS a local Ray starts over this machine's cores (and GPUs); with it, the run joins
that cluster. Tasks only train: they return each job's weights and record through Ray's object store
and this process (the driver) writes them, so it is the only writer of the run directory and a crash
of the driver or of a worker leaves a directory that a rerun resumes. A worker lost mid-task (killed,
out of memory, its node gone) has its task rerun, up to MAX_RETRIES times.

Data reaches the tasks by path: the teacher pieces, students and the activation cache in the run
directory, memory-mapped by every worker on this machine. Across machines the run directory must be on
storage that every node mounts at the same path (NFS, a cluster filesystem); a task that cannot see it
fails with a one-line error naming its host.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ndonnx.config import DistillConfig
from ndonnx.distill.backends import shown, with_threads
from ndonnx.errors import NdonnxError, Terminated

MAX_RETRIES = 3


def require_ray():
    try:
        import ray
    except ImportError:
        raise NdonnxError("--backend ray needs Ray, which is not installed: pip install -e '.[ray]'") from None
    return ray


def preflight() -> None:
    """Before any work: Ray is installed, and something answers at RAY_ADDRESS (Ray itself retries an
    address that is down for minutes before it gives up)."""
    require_ray()
    address = os.environ.get("RAY_ADDRESS", "")
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():  # unset, "auto", "local": Ray's to resolve
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise NdonnxError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: nothing answers there "
                          f"({e.strerror or e})") from None


def _connect(ray) -> tuple[bool, str]:
    """Join RAY_ADDRESS's cluster, or start a local Ray over this machine's cores; a Ray this process
    already holds (a notebook's, a test's) is used as it is. Returns (connected here, which cluster)."""
    if ray.is_initialized():
        return False, "existing"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reporting home from a compression run
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _token_auth_if_available()
    quiet = dict(logging_level=logging.ERROR, log_to_driver=False)  # errors come back through ray.get
    # ray.init takes SIGTERM over (a local head drains for up to 30 s, then exits 1); ours stops the
    # run at once with 143 and ray.shutdown() still ends the local Ray
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
    except Exception as e:  # Ray's own errors: connection refused, a bad address, a missing token, ...
        where = f"join the Ray cluster at RAY_ADDRESS={address}" if address else "start a local Ray"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if "AuthToken" in str(e):
            first = "it wants its token: set RAY_AUTH_TOKEN (or ~/.ray/auth_token) and RAY_AUTH_MODE=token"
        raise NdonnxError(f"cannot {where}: {first}") from None
    finally:
        if main and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    return True, address or "local"


def _token_auth_if_available() -> None:
    """`ray start --head` turns token auth on when a token exists, but a client joining it does not
    unless RAY_AUTH_MODE says so: with a token at hand (and no mode set), send it, as `ray start` would.
    Ray's own helper, as it also refreshes Ray's cached settings; Rays without token auth lack it."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:
        return
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)  # its notice is Ray's, not ours
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _absolute(job):
    """Paths as every node sees them (a worker's working folder is not the driver's)."""
    a = lambda p: str(Path(p).resolve()) if p else p
    return replace(job, student=a(job.student), teacher=a(job.teacher), cache=a(job.cache), noise=a(job.noise),
                   lookahead=tuple(a(p) for p in job.lookahead))


def _group_task(jobs: list) -> list[tuple[dict, dict]]:
    """One neighbourhood's jobs on a Ray worker: train, return the results, write nothing."""
    from ndonnx.distill.job import train_group

    for p in (jobs[0].teacher, jobs[0].cache):
        if p and not Path(p).exists():
            raise NdonnxError(f"Ray worker on {socket.gethostname()} cannot see {p}: across machines the run "
                              "directory must be on storage every node mounts at the same path")
    return train_group(jobs)


def plan(cfg: DistillConfig, groups: int, nodes: list[dict]) -> dict:
    """Device and per-task resources from the cluster's alive nodes' resources. CPU: `--jobs` tasks at
    once (default one per core), the cores shared out as torch threads, never more than one node has.
    CUDA: `--gpus-per-job` of a GPU and one core each; a GPU task's worker process ends with the task,
    as GPU workers keep their memory."""
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    if cfg.device == "cuda" and not gpus:
        raise NdonnxError("--device cuda: the Ray cluster has no GPU")
    if cfg.device != "cpu" and gpus:
        if max(n.get("GPU", 0) for n in nodes) < cfg.gpus_per_job:
            raise NdonnxError(f"--gpus-per-job {cfg.gpus_per_job}: no node of the Ray cluster has that much GPU")
        return {"device": "cuda", "threads": 1, "workers": int(gpus / cfg.gpus_per_job),
                "options": {"num_cpus": 1, "num_gpus": cfg.gpus_per_job, "max_calls": 1}}
    workers = max(1, min(cfg.jobs or int(cpus), groups))
    threads = max(1, min(int(cpus) // workers, int(max(n.get("CPU", 0) for n in nodes))))
    return {"device": "cpu", "threads": threads, "workers": workers, "options": {"num_cpus": threads}}


def remote_task(ray, options: dict):
    """The Ray task with the plan's resources (`max_calls` is a definition option, not a call one)."""
    return ray.remote(max_retries=MAX_RETRIES, **options)(_group_task)


def run_ray(groups: list[list], cfg: DistillConfig, progress: Callable | None) -> dict:
    """Run the job groups as Ray tasks; write each group's results here as it comes back."""
    from ndonnx.distill.job import write_results

    ray = require_ray()
    connected, cluster = _connect(ray)
    pending: dict = {}
    try:
        p = plan(cfg, len(groups), [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        task = remote_task(ray, p["options"])
        batches = with_threads([[_absolute(j) for j in g] for g in groups], p["threads"], p["device"])
        pending = {task.remote(g): g for g in batches}

        def finished():
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                g = pending.pop(ref)
                write_results(g, _get(ray, ref, g[0].neighbourhood))
                yield f"finished neighbourhood {g[0].neighbourhood} (Ray, {p['workers']} workers)"

        with _sigterm_seen() as seen:
            try:
                for _ in shown(finished(), progress, len(batches)):
                    pass
            except KeyboardInterrupt:
                if seen:  # Ray's wait turns any exception from a signal handler into KeyboardInterrupt
                    raise Terminated() from None
                raise
        return {"name": "ray", "cluster": cluster, "workers": p["workers"], "device": p["device"],
                "task_resources": {k: v for k, v in p["options"].items() if k != "max_calls"}}
    finally:
        for ref in pending:  # an interrupt or a failed group: the others stop too
            ray.cancel(ref, force=True)
        if connected:
            ray.shutdown()


@contextlib.contextmanager
def _sigterm_seen():
    """A list that holds True once SIGTERM arrived, where a Python handler (the CLI's) takes it; that
    handler still runs."""
    seen: list[bool] = []
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):
        yield seen
        return

    def note(signum, frame):
        seen.append(True)
        previous(signum, frame)

    signal.signal(signal.SIGTERM, note)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)


def _get(ray, ref, nid: int):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # the job's own error, raised as itself (one line, not Ray's)
        raise (e.cause if isinstance(e.cause, Exception) else e) from None
    except ray.exceptions.RayError as e:  # the worker or its node was lost more often than retried
        raise NdonnxError(f"neighbourhood {nid}: its Ray task was lost {MAX_RETRIES + 1} times ({type(e).__name__}); "
                          "finished jobs are journalled and the same command resumes") from None
