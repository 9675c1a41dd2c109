"""adaptune's worker (adaptune.worker): a job handed to it ends as it would in its own process
(output, exit status, death by a signal), signals reach it, a killed job's process takes the
worker's process with it, and what the worker cannot vouch for runs in the job's own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from adaptune import worker

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

# What Snakemake's preamble leaves a script (__real_file__), then a stage script's first lines.
JOB = """
__real_file__ = __file__
from adaptune import worker
worker.delegate()
import json, os, sys, time
import torch
from threadpoolctl import threadpool_info
print(json.dumps({
    "pid": os.getpid(), "in_worker": worker._in_worker, "cwd": os.getcwd(),
    "mark": os.environ.get("MARK"), "argv": sys.argv, "torch": torch.ones(2).sum().item(),
    "threads": torch.get_num_threads(),
    "blas": sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}),
}), flush=True)
print("to stderr", file=sys.stderr, flush=True)
if os.environ.get("PIDFILE"):
    open(os.environ["PIDFILE"], "w").write(str(os.getpid()))
    time.sleep(60)
sys.exit(int(os.environ.get("CODE", "0")))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A worker for this test process, and a job script."""
    folder = tmp_path_factory.mktemp("worker")
    script = folder / "job.py"
    script.write_text(textwrap.dedent(JOB))
    environ = dict(os.environ)
    environ.pop(worker.ENV, None)
    handle = worker.start(folder / "worker.log", environ)
    assert handle is not None
    deadline = time.time() + 120
    while not os.path.exists(handle.address):
        assert handle.process.poll() is None, (folder / "worker.log").read_text()
        assert time.time() < deadline, "the worker never listened"
        time.sleep(0.1)
    yield handle, script, environ
    handle.stop()
    assert handle.process.returncode == 0
    assert not Path(handle.address).parent.exists()


def job(served, cwd: Path, **env: str) -> subprocess.Popen:
    _handle, script, environ = served
    return subprocess.Popen(
        [sys.executable, str(script)],
        cwd=cwd,
        env={**environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def served_by(served, pid: int) -> bool:
    handle, _script, _environ = served
    return psutil.Process(pid).ppid() == handle.process.pid


def test_a_job_runs_in_the_worker_as_in_its_own_process(served, tmp_path):
    import json

    process = job(served, tmp_path, MARK="one", CODE="3")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 3, err
    ran = json.loads(out)
    assert ran["in_worker"] and ran["pid"] != process.pid
    assert ran["cwd"] == str(tmp_path) and ran["mark"] == "one" and ran["torch"] == 2.0
    assert ran["argv"] == [str(served[1])]
    assert "to stderr" in err
    # the next job sees its own environment, not the last one's, and runs on the threads
    # Snakemake gave it (as OMP_NUM_THREADS and the BLAS variables, which the worker's libraries
    # read when they loaded), as its own process would
    for threads in (1, 2):
        counts = {name: str(threads) for name in worker.THREAD_VARIABLES}
        process = job(served, tmp_path, MARK=f"two{threads}", **counts)
        out, _ = process.communicate(timeout=120)
        ran = json.loads(out)
        assert process.returncode == 0 and ran["in_worker"] and ran["mark"] == f"two{threads}"
        assert ran["threads"] == threads and set(ran["blas"]) == {threads}


def test_a_failing_job_shows_its_traceback_and_fails(served, tmp_path):
    process = job(served, tmp_path, CODE="not a number")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert '"in_worker": true' in out
    assert "ValueError: invalid literal for int()" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_to_the_job_reaches_the_process_running_it(served, tmp_path, sig):
    pidfile = tmp_path / "pid"
    process = job(served, tmp_path, PIDFILE=str(pidfile))
    deadline = time.time() + 120
    while not pidfile.exists() or not pidfile.read_text():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    running = int(pidfile.read_text())
    assert served_by(served, running)
    process.send_signal(sig)
    process.wait(timeout=60)
    # ended as a process of its own would: by the signal (SIGINT: Python's KeyboardInterrupt,
    # uncaught, ends it by SIGINT)
    assert process.returncode == -sig
    deadline = time.time() + 30
    while psutil.pid_exists(running) and psutil.Process(running).status() != "zombie":
        assert time.time() < deadline, f"process {running} outlived its job ({sig.name})"
        time.sleep(0.05)
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in process.stderr.read()


def started(served, tmp_path: Path, **env: str) -> tuple[subprocess.Popen, int]:
    """A job that waits, and the pid of the worker's process that runs it."""
    pidfile = tmp_path / f"pid{time.monotonic_ns()}"
    process = job(served, tmp_path, PIDFILE=str(pidfile), **env)
    deadline = time.time() + 120
    while not pidfile.exists() or not pidfile.read_text():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    return process, int(pidfile.read_text())


def test_jobs_run_side_by_side_and_a_killed_process_kills_its_job(served, tmp_path):
    first, first_pid = started(served, tmp_path)
    second, second_pid = started(served, tmp_path)
    assert (
        first_pid != second_pid and served_by(served, first_pid) and served_by(served, second_pid)
    )
    os.kill(second_pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    assert second.wait(timeout=60) == -signal.SIGKILL
    assert first.poll() is None  # the other job goes on
    first.terminate()
    assert first.wait(timeout=60) == -signal.SIGTERM


def test_a_client_gone_before_its_reply_costs_the_worker_nothing(served, tmp_path):
    import json
    import socket

    handle, script, environ = served
    for _ in range(3):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(handle.address)
        request = {
            "script": str(script),
            "cwd": str(tmp_path),
            "env": {**environ, "PIDFILE": str(tmp_path / "never")},
            "executable": sys.executable,
            "prefix": sys.prefix,
            "started": time.time(),
        }
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
        conn.close()
    time.sleep(1)
    process = job(served, tmp_path)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and json.loads(out)["in_worker"]
    assert handle.process.poll() is None


def test_what_the_worker_cannot_vouch_for_runs_in_the_jobs_own_process(served, tmp_path):
    import json

    # an environment variable that a library reads when it is imported, set differently
    process = job(served, tmp_path, HF_HOME=str(tmp_path / "hf"))
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and not json.loads(out)["in_worker"]
    # no worker at that address, or the worker turned off
    for address in (str(tmp_path / "none"), "off"):
        process = job(served, tmp_path, **{worker.ENV: address})
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0 and json.loads(out)["pid"] == process.pid
    _handle, script, _environ = served
    log = script.with_name("worker.log").read_text()
    assert (
        "job.py: in its own process: environment variables read at import differ: ['HF_HOME']"
        in log
    )


def test_the_peak_memory_note_is_read_back(tmp_path):
    log = tmp_path / "job.log"
    log.write_text(
        "stage output\nadaptune worker: the job ran in process 12 of the worker: 3.0 s, "
        "peak resident memory 2148 MB\n"
    )
    assert worker.peak_memory_in_log(log) == 2148
    assert worker.peak_memory_in_log(tmp_path / "absent.log") is None


def test_the_worker_stops_when_the_workflow_process_is_gone(tmp_path):
    address = tmp_path / "socket"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, os, time; "
            f"p = subprocess.Popen([sys.executable, '-m', 'adaptune.worker', {str(address)!r}, "
            "str(os.getpid())]); print(p.pid, flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    served_pid = int(parent.stdout.readline())
    deadline = time.time() + 120
    while not address.exists():
        assert time.time() < deadline
        time.sleep(0.1)
    parent.kill()
    parent.wait()
    deadline = time.time() + 30
    while psutil.pid_exists(served_pid) and psutil.Process(served_pid).status() != "zombie":
        assert time.time() < deadline, "the worker outlived the workflow's process"
        time.sleep(0.1)
    assert not address.exists()


def catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (its SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_a_worker_stopped_while_it_imports_leaves_no_folder(tmp_path):
    environ = dict(os.environ)
    environ.pop(worker.ENV, None)
    handle = worker.start(tmp_path / "worker.log", environ)
    assert handle is not None
    folder = Path(handle.address).parent
    assert folder.is_dir()
    deadline = time.time() + 60
    while not catches_sigterm(handle.process.pid):
        assert handle.process.poll() is None and time.time() < deadline
        time.sleep(0.01)
    assert not Path(handle.address).exists()  # still importing: not listening yet
    handle.process.send_signal(signal.SIGTERM)
    assert handle.process.wait(timeout=60) == 0
    assert not folder.exists()


def test_a_log_that_cannot_be_written_means_no_worker_and_no_folder(tmp_path, monkeypatch):
    """A read-only or full results folder: the jobs run in their own processes and meet the
    problem there, each naming it (test_faults' read-only and full-disk runs)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    environ: dict[str, str] = {}
    assert worker.start("/proc/adaptune/worker.log", environ) is None
    assert worker.ENV not in environ
    assert not list(tmp_path.glob(f"{worker.FOLDER_PREFIX}*"))


def test_ctrl_z_stops_the_process_running_the_job_and_fg_resumes_it(served, tmp_path):
    process, running = started(served, tmp_path)

    def state(pid: int) -> str:
        return psutil.Process(pid).status()

    def wait_for(pid: int, wanted: str) -> None:
        deadline = time.time() + 30
        while state(pid) != wanted:
            assert time.time() < deadline, f"{pid} is {state(pid)}, not {wanted}"
            time.sleep(0.05)

    process.send_signal(signal.SIGTSTP)  # Ctrl-Z
    wait_for(process.pid, psutil.STATUS_STOPPED)
    wait_for(running, psutil.STATUS_STOPPED)
    process.send_signal(signal.SIGCONT)  # fg
    wait_for(running, psutil.STATUS_SLEEPING)
    assert state(process.pid) != psutil.STATUS_STOPPED
    process.terminate()
    assert process.wait(timeout=60) == -signal.SIGTERM
