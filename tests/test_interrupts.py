"""Real signals to a real `ndonnx distill` with worker processes: the first ^C or SIGTERM ends the
workers and exits 130 / 143 at once; a second signal while stopping changes nothing; journalled
jobs stay and the rerun resumes from them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# Long enough that no job ends by itself while the test waits: every stop is the signal's doing.
LONG = ["--steps", "1000000", "--min-gain", "0", "--batch", "8", "--candidates", "width:0.5,teacher", "--jobs", "2"]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ignored(pid: int) -> set[int]:
    """The signals a process ignores (its SigIgn mask)."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("SigIgn"))
    mask = int(line.split()[1], 16)
    return {s for s in range(1, 64) if mask >> (s - 1) & 1}


def _workers(pid: int) -> list[int]:
    """The pool's workers: children running multiprocessing's spawn entry point."""
    found = []
    for child in _children(pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            found.append(child)
    return found


@pytest.fixture()
def setup(zoo, tmp_path):
    x = np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ndonnx_cli", "distill", str(zoo["resnet_legacy"]), "--data",
           str(tmp_path / "calib.npz"), "--run-dir", str(run)]
    return cmd, run


def _start_and_wait_for_workers(cmd: list[str]) -> tuple[subprocess.Popen, list[int]]:
    # Its own process group, as a terminal's foreground job; ^C restored to its default, since a
    # runner that started these tests in the background (`cmd &`) hands its children SIGINT ignored.
    proc = subprocess.Popen(cmd + LONG, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        workers = _workers(proc.pid)
        if len(workers) == 2:
            time.sleep(3)  # let them get into training
            return proc, workers
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no workers started: {proc.communicate()[1][-2000:]}")


def _wait(proc: subprocess.Popen, workers: list[int], limit: float = 60) -> str:
    """The command's stderr once it exits; it used to train on for minutes after ^C, or hang for good."""
    try:
        return proc.communicate(timeout=limit)[1]
    except subprocess.TimeoutExpired:
        states = {p: Path(f"/proc/{p}/wchan").read_text() if _alive(p) else "gone" for p in [proc.pid, *workers]}
        stack = subprocess.run(["py-spy", "dump", "--pid", str(proc.pid)], capture_output=True, text=True).stdout \
            if subprocess.run(["which", "py-spy"], capture_output=True).returncode == 0 else ""
        os.killpg(proc.pid, signal.SIGKILL)
        err = proc.communicate()[1]
        pytest.fail(f"still running {limit:.0f} s after the signal; states {states}; {stack}\n{err[-3000:]}")


@pytest.mark.parametrize("signals, code", [
    ((("group", signal.SIGINT),), 130),  # ^C in a terminal reaches the whole process group
    ((("parent", signal.SIGTERM), ("group", signal.SIGINT), ("parent", signal.SIGTERM)), 143),
])
def test_signal_stops_workers_and_keeps_journal(setup, signals, code):
    cmd, run = setup
    proc, workers = _start_and_wait_for_workers(cmd)
    for w in workers:  # ^C is the parent's to handle; SIGTERM must still end a worker at once
        assert signal.SIGINT in _ignored(w) and signal.SIGTERM not in _ignored(w)
    done_before = sorted(p.name for p in (run / "done").glob("*.json"))
    for target, sig in signals:
        os.killpg(proc.pid, sig) if target == "group" else proc.send_signal(sig)
        time.sleep(0.1)
    err = _wait(proc, workers)
    assert proc.returncode == code, err[-2000:]
    assert ("terminated" if code == 143 else "interrupted") in err and "Traceback" not in err
    assert "leaked" not in err and "Warning" not in err  # exit handlers ran: nothing left for the tracker
    assert "jobs are journalled" in err
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "workers outlived the command"
    assert json.loads((run / "run.json").read_text())["teacher_hash"]
    after = list((run / "done").glob("*.json"))
    assert set(done_before) <= {p.name for p in after}  # nothing lost (untrained teacher jobs may finish)
    assert all(json.loads(p.read_text())["status"] for p in after)  # nothing half-written
    assert not list(run.rglob("*.tmp"))


def test_rerun_after_interrupt_resumes(setup):
    """Jobs journalled before the interrupt are kept and skipped by the rerun."""
    cmd, run = setup
    quick = subprocess.run(cmd + ["--steps", "2", "--batch", "8", "--candidates", "teacher", "--jobs", "1"],
                           capture_output=True, text=True)
    assert quick.returncode == 0, quick.stderr[-2000:]
    journalled = sorted(p.name for p in (run / "done").glob("*.json"))
    proc, workers = _start_and_wait_for_workers(cmd)
    os.killpg(proc.pid, signal.SIGINT)
    err = _wait(proc, workers)
    assert proc.returncode == 130
    assert f"{len(journalled)} of " in err  # the finished jobs are counted as kept
    assert set(journalled) <= {p.name for p in (run / "done").glob("*.json")}


def test_workers_end_when_the_driver_is_killed(setup):
    """SIGKILL (an OOM kill, a CI timeout) gives the driver no chance to stop its workers: the
    kernel ends them (PR_SET_PDEATHSIG), and a caller reading the driver's output is not left hanging."""
    cmd, run = setup
    proc, workers = _start_and_wait_for_workers(cmd)
    proc.kill()
    try:
        proc.communicate(timeout=60)  # returns once no process holds the pipes open
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the driver's output stayed open after it was killed: its workers live on")
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [w for w in workers if _alive(w)]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, "workers outlived the killed driver"
