"""Services that tests and benchmarks start on this machine, on 127.0.0.1 only, and stop by the
PIDs they started: an MLflow tracking server and the single-node SLURM cluster of
``tests/cluster/slurm.sh``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SLURM_SCRIPT = Path(__file__).resolve().parent / "cluster" / "slurm.sh"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (all started by the process ``pgid``)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command name: state, ppid, pgrp; a zombie is no longer running
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def stop_group(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process group that ``process`` leads (it was started in a new session, so
    the group holds exactly it and its children), SIGKILL what is left after ``grace`` s."""
    if process.poll() is None or group_members(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(0.25)
        if group_members(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10  # SIGKILLed processes take a moment to go
            while group_members(process.pid) and time.monotonic() < deadline:
                time.sleep(0.25)
    process.wait(timeout=10)
    left = group_members(process.pid)
    assert not left, f"processes of group {process.pid} still alive: {left}"


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    artifacts: Path
    pid: int
    log: Path


@contextlib.contextmanager
def mlflow_server(
    root: Path,
    backend_store_uri: str | None = None,
    timeout: float = 120.0,
    port: int | None = None,
) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1 and ``port`` (a free one by default), its artifacts
    served from ``root/artifacts`` (``--artifacts-destination``), its store a SQLite file in
    ``root`` unless ``backend_store_uri`` says otherwise; stopped (the whole process group)
    on exit. Started again on the same ``root`` and port, it serves what it held."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    artifacts = root / "artifacts"
    backend = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
    log = root / f"server-{time.time_ns()}.log"
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--backend-store-uri", backend, "--artifacts-destination", str(artifacts)),
    ]
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as answer:
                    answer.read()
                break
            except (urllib.error.URLError, OSError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlflow server did not come up: {log.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.5)
        yield MlflowServer(uri, artifacts, process.pid, log)
    finally:
        stop_group(process)


def slurm(command: str, directory: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """``tests/cluster/slurm.sh COMMAND DIRECTORY``; raises with its output when it fails."""
    result = subprocess.run(
        ["bash", str(SLURM_SCRIPT), command, str(directory)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"slurm.sh {command} failed:\n{result.stdout}\n{result.stderr}")
    return result


@contextlib.contextmanager
def slurm_cluster(directory: Path) -> Iterator[dict[str, str]]:
    """A single-node SLURM cluster (this host) kept in ``directory``; yields the environment in
    which sbatch and snakemake's SLURM executor find it. Stopped, by its recorded PIDs, on exit,
    and checked to be gone."""
    try:
        slurm("start", directory)
        yield {**os.environ, "SLURM_CONF": str(directory / "etc" / "slurm.conf")}
    finally:
        pids = [
            int(path.read_text())
            for path in (directory / "run").glob("*.pid")
            if path.stem in ("munged", "slurmctld", "slurmd") and path.read_text().strip()
        ]
        slurm("stop", directory)
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        assert not alive, f"slurm.sh stop left daemons running: {alive}"


def run_with_timeout(
    command: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """Run ``command``; past ``timeout`` s send SIGINT, which snakemake obeys while SLURM jobs
    are pending (it ignores SIGTERM then), and report the run as failed (returncode 124)."""
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        return subprocess.CompletedProcess(command, 124, stdout, stderr + "\n[timed out]")
