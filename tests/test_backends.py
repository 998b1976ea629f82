"""Where jobs run: the local pool's worker/GPU assignment (CUDA mocked: CI has no GPU), the Ray
backend's plan, and real Ray on 2 CPUs: the same candidates as the local backend, a killed worker's
task rerun, an existing cluster joined through RAY_ADDRESS, a missing Ray refused in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import multiprocessing
import numpy as np
import pytest
from safetensors.numpy import load_file

from ndonnx.config import DistillConfig
from ndonnx.distill import backends, runner
from ndonnx.distill.backends import LocalPlan, plan_local
from ndonnx.distill.ray_backend import plan as ray_plan
from ndonnx.errors import NdonnxError
from ndonnx_cli.main import main

import pool_probe

FAST = dict(candidates="width:0.5,teacher", steps=15, batch=16)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def gpus(monkeypatch):
    """Pretend torch sees `n` CUDA devices."""
    import torch

    def set_(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return set_


def test_teacher_passes_ask_onnxruntime_for_cuda_where_it_has_it(gpus, monkeypatch, caplog, tmp_path):
    """The activation cache runs the teacher through onnxruntime's CUDA provider when distillation is on
    CUDA and onnxruntime has the provider (the gpu extra); without it, the CPU and one warning."""
    import onnx
    import onnxruntime as ort

    from ndonnx import sample
    from ndonnx.data import load_data
    from ndonnx.distill import cache
    from ndonnx.graph import load_teacher

    gpus(1)
    assert runner._cuda_here("cuda") and runner._cuda_here("auto") and not runner._cuda_here("cpu")
    gpus(0)  # a Ray driver without a GPU, the cluster's workers given --device cuda: the cache on its CPU
    assert not runner._cuda_here("auto") and not runner._cuda_here("cuda")

    asked: list[list[str]] = []
    real_session = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda m, o, providers: asked.append(providers)
                        or real_session(m, o, providers=["CPUExecutionProvider"]))
    model = onnx.load(ROOT / "models" / "resnet20_fmnist.onnx")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    sample.ort_session(model, cuda=True)
    sample.ort_session(model)
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]

    asked.clear()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    sample._warn_once.cache_clear()
    teacher = load_teacher(ROOT / "models" / "resnet20_fmnist.onnx")
    x = np.load(ROOT / "models" / "fmnist_subset.npz")["input"][:20]
    np.savez(tmp_path / "d.npz", input=x)
    with caplog.at_level("WARNING"):
        cache.build_cache(teacher.model, ["input", "logits"], load_data(tmp_path / "d.npz", teacher), tmp_path / "c",
                          seed=0, fingerprint="f", cuda=True)
    assert len(asked) == 2 and all(p == ["CPUExecutionProvider"] for p in asked)  # probe and pass: CPU given
    assert [r.message for r in caplog.records].count(
        "onnxruntime has no CUDA provider: the teacher runs on the CPU (install the gpu extra and uninstall "
        "onnxruntime, see the README)") == 1


def test_local_plan_one_worker_per_gpu(gpus, monkeypatch):
    gpus(3)
    assert runner.resolve_device("auto") == "cuda"
    assert plan_local("cuda", 0, 10) == LocalPlan(3, 1, ("0", "1", "2"))
    assert plan_local("cuda", 0, 2) == LocalPlan(2, 1, ("0", "1"))  # never more workers than groups
    assert plan_local("cuda", 5, 10).devices == ("0", "1", "2", "0", "1")  # --jobs: round-robin
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")  # the user's choice of GPUs is kept
    assert plan_local("cuda", 0, 10).devices == ("4", "6", "7")
    gpus(1)  # one GPU: workers share it, unpinned, as before
    assert plan_local("cuda", 0, 10) == LocalPlan(1, 1, (None,))
    gpus(0)
    assert runner.resolve_device("auto") == "cpu"
    with pytest.raises(NdonnxError, match="no CUDA device"):
        runner.resolve_device("cuda")
    cores = os.cpu_count()
    assert plan_local("cpu", 0, 100) == LocalPlan(cores, 1, (None,) * cores)
    assert plan_local("cpu", 1, 100) == LocalPlan(1, cores, (None,))


def test_pool_workers_are_pinned_to_their_gpu(tmp_path):
    """The initializer that `run_pool` gives its workers, in real spawned workers: each takes one GPU."""
    ctx = multiprocessing.get_context("spawn")
    pins = ctx.SimpleQueue()
    for d in ("3", "5"):
        pins.put(d)
    with ProcessPoolExecutor(2, mp_context=ctx, initializer=backends.worker_start, initargs=(pins, os.getpid())) as pool:
        got = dict(f.result() for f in [pool.submit(pool_probe.where, str(tmp_path)) for _ in range(2)])
    assert sorted(got.values()) == ["3", "5"], got


def test_ray_plan_gpus_and_cpus():
    nodes = [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}]
    p = ray_plan(DistillConfig(backend="ray", gpus_per_job=0.5), 10, nodes)
    assert p["device"] == "cuda" and p["workers"] == 8 and p["threads"] == 1
    assert p["options"] == {"num_cpus": 1, "num_gpus": 0.5, "max_calls": 1}
    assert ray_plan(DistillConfig(backend="ray", device="cpu"), 10, nodes)["device"] == "cpu"
    cpu = [{"CPU": 4}, {"CPU": 4}]
    assert ray_plan(DistillConfig(backend="ray"), 2, cpu)["options"] == {"num_cpus": 4}  # 8 cores, 2 groups
    assert ray_plan(DistillConfig(backend="ray", jobs=1), 9, cpu)["options"] == {"num_cpus": 4}  # fits a node
    with pytest.raises(NdonnxError, match="no GPU"):
        ray_plan(DistillConfig(backend="ray", device="cuda"), 2, cpu)


def test_ray_gpu_task_is_a_valid_ray_task():
    """Ray checks the options when the task is defined, GPUs or not (`max_calls` is refused in
    `.options()`, for one)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'): Ray backend untested")
    from ndonnx.distill.ray_backend import remote_task

    p = ray_plan(DistillConfig(backend="ray", gpus_per_job=0.5), 4, [{"CPU": 4, "GPU": 1}])
    assert remote_task(ray, p["options"]).options(name="check") is not None


def test_bad_backend_options_exit_2(zoo, calib, tmp_path, capsys, monkeypatch):
    base = ["distill", str(zoo["resnet_legacy"]), "--data", str(calib), "--run-dir", str(tmp_path / "r")]
    assert main([*base, "--gpus-per-job", "0.5"]) == 2
    assert "--gpus-per-job applies to --backend ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert main([*base, "--backend", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ndonnx: error: --backend ray needs Ray, which is not installed: pip install -e '.[ray]'"]
    assert not (tmp_path / "r").exists()
    if importlib.util.find_spec("ray") is not None:  # (the real one)
        monkeypatch.delitem(sys.modules, "ray")
        with socket.socket() as s:  # a port where nothing listens
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        assert main([*base, "--backend", "ray"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot join the Ray cluster at RAY_ADDRESS=127.0.0.1" in err[0], err
        assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(path, input=rng.standard_normal((80, 3, 16, 16)).astype(np.float32), labels=rng.integers(0, 10, 80))
    return path


@pytest.fixture(scope="module")
def ray2():
    """Ray on 2 CPUs, whatever the host; the backend uses a Ray this process already holds."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'): Ray backend untested")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def _same_candidates(a: Path, b: Path) -> None:
    strip = lambda d: [{k: v for k, v in r.items() if k not in ("seconds", "host")}
                       for r in json.loads((d / "candidates.json").read_text())]
    assert strip(a) == strip(b)
    names = sorted(p.name for p in (a / "weights").iterdir())
    assert names and names == sorted(p.name for p in (b / "weights").iterdir())
    for n in names:
        x, y = load_file(str(a / "weights" / n)), load_file(str(b / "weights" / n))
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), n


@pytest.fixture(scope="module")
def local_run(zoo, calib, tmp_path_factory):
    """The local backend's run, one thread per job like the Ray tasks on 2 CPUs (threads change the
    last bits of the sums)."""
    run = tmp_path_factory.mktemp("local") / "run"
    mp = pytest.MonkeyPatch()
    mp.setattr(runner, "plan_local", lambda device, jobs, groups: LocalPlan(1, 1, (None,)))
    try:
        runner.distill(zoo["resnet_legacy"], run, DistillConfig(**FAST), data_path=calib)
    finally:
        mp.undo()
    return run


def test_existing_cluster_through_ray_address(zoo, calib, local_run, tmp_path, monkeypatch):
    """`ray start --head` in a subprocess; with RAY_ADDRESS the backend joins it (and leaves it
    running). Before `ray2`: a process holds one Ray at a time."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'): Ray backend untested")
    assert not ray.is_initialized(), "this test must run before the module's own Ray starts"
    ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ndonnx-ray", dir="/tmp")  # short: Ray's socket paths live under it
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", f"--temp-dir={temp}", "--node-ip-address=127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the head's GCS listens
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, "ray start --head failed"
            time.sleep(0.2)
        address = f"127.0.0.1:{port}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        run = tmp_path / "run"
        runner.distill(zoo["resnet_legacy"], run, DistillConfig(**FAST, backend="ray"), data_path=calib)
        assert not ray.is_initialized()  # disconnected after the run
        assert json.loads((run / "run.json").read_text())["backend"]["cluster"] == address
        _same_candidates(local_run, run)
    finally:
        # The head's own process group (raylet, GCS, workers); its SIGTERM drain takes up to 30 s
        for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 20)):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_backend_same_candidates_as_local(ray2, zoo, calib, local_run, tmp_path):
    run = tmp_path / "run"
    runner.distill(zoo["resnet_legacy"], run, DistillConfig(**FAST, backend="ray"), data_path=calib)
    _same_candidates(local_run, run)
    meta = json.loads((run / "run.json").read_text())
    assert meta["backend"]["name"] == "ray" and meta["backend"]["workers"] == 2 and meta["config"]["backend"] == "ray"
    hosts = {json.loads(p.read_text())["host"] for p in (run / "done").glob("*.json")}
    assert hosts == {socket.gethostname()}


def test_killed_ray_worker_is_rerun(ray2, zoo, calib, local_run, tmp_path, monkeypatch):
    """The first task to start kills its own worker process; Ray reruns it and the run completes."""
    from ndonnx.distill import ray_backend

    real = ray_backend._group_task
    marker = str(tmp_path / "killed")

    def crash_once(jobs):  # a closure: Ray ships it by value, so the workers need not import this test
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(jobs)

    monkeypatch.setattr(ray_backend, "_group_task", crash_once)
    run = tmp_path / "run"
    runner.distill(zoo["resnet_legacy"], run, DistillConfig(**FAST, backend="ray"), data_path=calib)
    assert os.path.exists(marker)
    _same_candidates(local_run, run)


