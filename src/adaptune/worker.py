"""A warm process that runs the workflow's Python jobs, so that they do not each pay for
importing torch, transformers and MLflow (4-5 s of a fresh process on a 2-core machine, before
the job's own first import of a model's modules or of MLflow's SQLite store).

Snakemake starts every ``script:`` job as a fresh interpreter. Where the workflow runs its jobs on
this machine, ``rules/common.smk`` starts one *worker* beside it (``python -m adaptune.worker``):
it imports those libraries once and then waits on a Unix socket. Each stage script's first line,
:func:`delegate`, hands its job to the worker, which forks a process that runs the script from
the start (Snakemake's preamble included) with the job's folder, environment, stdin, stdout and
stderr, while the job's own process waits and ends as that process ended: with its exit status,
or killed by the same signal. What each job imported that the worker had not, the worker then
imports too, so the next job of that kind starts warmer (only modules of the libraries listed in
:data:`LEARNED_PACKAGES`).

What stays true of a job run this way:

- Signals sent to the job's process (Ctrl-C, SIGTERM from Snakemake or SLURM, SIGUSR1) are sent
  on to the process running the job; if the job's process is killed outright (``kill -9``), the
  process running the job kills itself at once.
- The job's start-up is still counted from its own process's start (``ADAPTUNE_JOB_STARTED``,
  read by :class:`adaptune.timing.StageClock`), and the peak memory of the process that ran it is
  appended to its log ("adaptune worker: ..."), which ``benchmarks/job_time.py`` reads, since
  Snakemake's ``benchmark:`` sees only the job's own waiting process.
- Anything the worker cannot guarantee runs the job in its own process, as before: no worker
  (``ADAPTUNE_WORKER=off``, a cluster or container executor, the worker still importing), another
  Python or installation, environment variables that libraries read when they are imported
  (:data:`IMPORT_TIME_VARIABLES`) set differently from the worker's, or a worker that has come
  to hold a second Python thread or to have initialised CUDA (forking is then unsafe; it forks
  no more).

Linux only (file descriptors passed over ``AF_UNIX``); elsewhere every job runs in its own
process.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

FOLDER_PREFIX = "adaptune-worker-"  # the folder of the worker's socket (in the temporary folder)
ENV = "ADAPTUNE_WORKER"  # the worker's socket; "off" (or unset): every job in its own process
STARTED = "ADAPTUNE_JOB_STARTED"  # the job's own process's start (seconds since the epoch)
MESSAGE = 1 << 20  # the longest message either side sends (a job's environment is the largest)
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# Imported before the worker listens: what every stage or most of them import.
PRELOAD = (
    "snakemake.io",
    "snakemake.script",
    "numpy",
    "pandas",
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "adaptune.finetune",
    "adaptune.evaluation",
    "adaptune.importance",
    "adaptune.report",
)
# Computed once in the worker, for every job after: tables that depend only on what is installed.
# MLflow maps every installed distribution to its modules (reading each one's file list: about
# 2 s on a 2-core machine) the first time a process logs a model, to check its requirements.
WARM = ("mlflow.utils.requirements_utils:_init_modules_to_packages_map",)
# A job's newly imported modules the worker imports after it, from these packages only.
LEARNED_PACKAGES = (
    "adaptune",
    "mlflow",
    "numpy",
    "pandas",
    "PIL",
    "safetensors",
    "scipy",
    "sklearn",
    "sqlalchemy",
    "alembic",
    "timm",
    "tokenizers",
    "torch",
    "torchvision",
    "transformers",
    "huggingface_hub",
)
# The thread counts Snakemake gives each job (its threads): read by OpenBLAS, MKL and OpenMP when
# they load, so in a job that the worker runs they are applied as the job starts instead (torch's
# and the BLAS and OpenMP libraries' thread pools, through threadpoolctl).
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
# Read by a library when it is imported: a job whose value differs from the worker's runs in its
# own process (the worker's copy of the library would not see it).
IMPORT_TIME_VARIABLES = (
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "MLFLOW_",
    "TORCH",
    "PYTORCH_",
    "OMP_",
    "MKL_",
    "KMP_",
    "OPENBLAS_",
    "PYTHON",
    "LD_",
    "XDG_CACHE_HOME",
)

NOTE = "adaptune worker:"  # the line a job's client adds to the job's log
_in_worker = False  # true in a process the worker forked to run a job


# --------------------------------------------------------------------------------------------
# The job's side


def delegate() -> None:
    """Run this job in the worker, if one serves this workflow, and end this process as the job
    ended; return (and let the script go on here) where there is none or it declines.

    Call it first thing in a stage script run by Snakemake's ``script:`` directive, before any
    heavy import.
    """
    if _in_worker or not sys.platform.startswith("linux"):
        return
    address = os.environ.get(ENV, "off")
    script = getattr(sys.modules["__main__"], "__real_file__", None)  # Snakemake's preamble
    if address == "off" or script is None:
        return
    try:
        import psutil

        started = psutil.Process().create_time()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(address)
    except OSError:
        return  # no worker (yet, or any more): this process runs the job
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: pending.append(s)) for sig in FORWARDED}
    request = {
        "script": os.path.abspath(script),
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "executable": sys.executable,
        "prefix": sys.prefix,
        "started": started,
    }
    try:
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
        reply = _receive(conn)
    except OSError:
        reply = None
    if reply is None or "pid" not in reply:
        conn.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in pending:
            signal.raise_signal(sig)
        return
    pid = reply["pid"]

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def pause(_sig: int, _frame: object) -> None:
        # Ctrl-Z: the process running the job stops too (with SIGSTOP: it is in a process group
        # without a terminal, where SIGTSTP would be discarded), then this one.
        forward(signal.SIGSTOP, None)
        os.kill(os.getpid(), signal.SIGSTOP)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    signal.signal(signal.SIGTSTP, pause)
    signal.signal(signal.SIGCONT, forward)  # this process went on: so does the job's
    for sig in pending:
        forward(sig, None)
    result = _receive(conn)
    if result is None:
        sys.stderr.write(
            f"adaptune worker: the process running this job ({pid}) ended without a status "
            "(the worker stopped?)\n"
        )
        sys.stderr.flush()
        os._exit(1)
    _note_in_log(pid, result)
    status = result["status"]
    sys.stdout.flush()
    sys.stderr.flush()
    if os.WIFSIGNALED(status):  # killed by a signal: so is this process
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # (a signal whose default action is not to end the process)
    os._exit(os.waitstatus_to_exitcode(status))


def _receive(conn: socket.socket) -> dict | None:
    """One JSON message, or None at the end of the connection."""
    while True:
        try:
            data = conn.recv(MESSAGE)
        except InterruptedError:
            continue
        except OSError:
            return None
        return json.loads(data) if data else None


def _note_in_log(pid: int, result: dict) -> None:
    """Append the job's process and peak memory to its Snakemake log, if it has one."""
    snakemake = getattr(sys.modules["__main__"], "snakemake", None)
    logs = list(getattr(snakemake, "log", []) or [])
    if not logs:
        return
    try:
        with open(logs[0], "a") as log:
            log.write(
                f"{NOTE} the job ran in process {pid} of the worker: "
                f"{result['seconds']:.1f} s, peak resident memory {result['max_rss_mb']:.0f} MB\n"
            )
    except OSError:
        pass


def peak_memory_in_log(path: str | os.PathLike[str]) -> float | None:
    """The peak resident memory (MB) that :func:`delegate` noted in a job's log, if the job ran
    in the worker."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        if line.startswith(NOTE) and "peak resident memory" in line:
            return float(line.rsplit("peak resident memory", 1)[1].split()[0])
    return None


def job_started() -> float | None:
    """When the job's own process started, if another process runs it (seconds since the
    epoch)."""
    value = os.environ.get(STARTED)
    return float(value) if _in_worker and value else None


# --------------------------------------------------------------------------------------------
# The worker's side


def import_time_environment(env: dict[str, str]) -> dict[str, str]:
    """The variables of ``env`` that libraries read when they are imported (but the thread
    counts, which a job applies as it starts: :func:`limit_threads`)."""
    return {
        k: v
        for k, v in env.items()
        if k.startswith(IMPORT_TIME_VARIABLES) and k not in THREAD_VARIABLES
    }


def thread_count(env: dict[str, str]) -> int | None:
    """The job's thread count that Snakemake gave it (``OMP_NUM_THREADS``), if any."""
    value = env.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def limit_threads(count: int | None) -> None:
    """What the thread variables would have done in a fresh process: torch's intra-op threads
    and every loaded BLAS and OpenMP pool at ``count``; nothing where the job has none."""
    if count is None:
        return
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(count)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=count)


def threads() -> int:
    """The Python threads of this process. Forking is safe with one: the native pools that
    numpy's OpenBLAS and pyarrow's jemalloc start at import re-create themselves in a forked
    process (as in every ``fork`` DataLoader worker); torch's OpenMP pool, which would not, the
    worker never starts (it computes nothing)."""
    import threading

    return threading.active_count()


def native_threads() -> int:
    """All threads of this process, the native libraries' pools included."""
    return len(os.listdir("/proc/self/task"))


def cuda_driver_loaded() -> bool:
    """Whether this process has loaded the CUDA driver (which a forked process cannot use)."""
    with open("/proc/self/maps") as maps:
        return any("libcuda.so" in line for line in maps)


def fork_unsafe(native_baseline: int | None = None) -> str:
    """Why forking this process would be unsafe ('' if it is not): a second Python thread,
    more native threads than ``native_baseline`` (those of the libraries loaded before the
    worker listened: a pool started since, such as OpenMP's after a computation, would not
    survive the fork), or CUDA initialised or its driver loaded."""
    if threads() != 1:
        return f"the worker holds {threads()} Python threads"
    if native_baseline is not None and native_threads() > native_baseline:
        return f"the worker's native threads grew from {native_baseline} to {native_threads()}"
    torch = sys.modules.get("torch")
    if (torch is not None and torch.cuda.is_initialized()) or cuda_driver_loaded():
        return "the worker initialised CUDA"
    return ""


class Worker:
    """The serving loop: accept a job, fork a process for it, report its end to its client."""

    def __init__(self, address: str, parent: int, environment: dict[str, str]) -> None:
        self.address = address
        self.parent = parent
        # The environment the worker started with, and what its imports added to it (as they
        # would in a job's own process: torch's inductor sets its cache folder).
        self.environment = import_time_environment(environment)
        self.added = {k: v for k, v in os.environ.items() if environment.get(k) != v}
        self.clients: dict[int, tuple[socket.socket, float]] = {}  # pid -> client, start
        self.to_learn: list[str] = []
        self.known = set(sys.modules)
        self.stopping = False
        self.listener: socket.socket | None = None
        self.native_baseline = native_threads()
        # Why it forks no more ('' while it may): only its own imports can change that.
        self.unsafe = fork_unsafe()

    def log(self, message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the jobs' clients pass Ctrl-C on
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.address + ".binding")
        self.listener.listen(64)
        os.rename(self.address + ".binding", self.address)  # clients see a listening socket
        self.log(f"listening on {self.address} ({len(sys.modules)} modules imported)")
        try:
            while not (self.stopping and not self.clients):
                if os.getppid() != self.parent and not self.stopping:
                    self.log("the workflow's process is gone: taking no more jobs")
                    self.stop()
                if self.stopping:
                    self.close_listener()
                self.reap()
                ready = self.wait_for_clients(0.2 if self.clients or self.to_learn else 1.0)
                if ready:
                    self.accept()
                elif self.to_learn:
                    self.learn(self.to_learn.pop(0))
        finally:
            self.close_listener()
            self.log("stopped")

    def stop(self, *_args: object) -> None:
        """Take no more jobs; end once the running ones have."""
        self.stopping = True

    def close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            for path in (self.address, self.address + ".binding"):
                if os.path.exists(path):
                    os.unlink(path)

    def wait_for_clients(self, timeout: float) -> bool:
        if self.listener is None:
            time.sleep(timeout)
            return False
        try:
            readable, _, _ = select.select([self.listener], [], [], timeout)
        except InterruptedError:
            return False
        return bool(readable)

    def accept(self) -> None:
        """Take one job: fork its process, or tell its client why not. A client that is gone
        by then costs nothing but its job (its process, without a client, kills itself)."""
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        fds: list[int] = []
        try:
            data, fds, _flags, _address = socket.recv_fds(conn, MESSAGE, 3)
            request = json.loads(data)
            refused = self.refusal(request, fds)
            if refused:
                self.log(f"{Path(request.get('script', '?')).name}: in its own process: {refused}")
                conn.send(json.dumps({"refused": refused}).encode())
                conn.close()
                return
            # Signals the client passes on as soon as it has the pid wait, blocked, until the
            # forked process has put the job's handlers in place.
            signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
            pid = os.fork()
            if pid == 0:
                others = [self.listener, *(client for client, _ in self.clients.values())]
                request["env"] = {**self.added, **request["env"]}
                run_job(request, fds, conn, others)  # never returns
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
            self.clients[pid] = (conn, time.time())
            self.log(f"{Path(request['script']).name}: process {pid}")
            conn.send(json.dumps({"pid": pid}).encode())
        except (OSError, ValueError) as error:
            self.log(f"a job's client: {error!r}")
        finally:
            for fd in fds:
                os.close(fd)

    def refusal(self, request: dict, fds: list[int]) -> str:
        """Why this job must run in its own process ('' if it need not)."""
        if len(fds) != 3:
            return "stdin, stdout and stderr were not passed"
        if request.get("executable") != sys.executable or request.get("prefix") != sys.prefix:
            return f"another Python ({request.get('executable')}) than the worker's"
        theirs = import_time_environment(request.get("env", {}))
        if theirs != self.environment:
            differ = sorted(set(theirs.items()) ^ set(self.environment.items()))
            return f"environment variables read at import differ: {sorted({k for k, _ in differ})}"
        return self.unsafe

    def reap(self) -> None:
        while self.clients:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid not in self.clients:
                continue
            conn, started = self.clients.pop(pid)
            seconds = time.time() - started
            self.log(f"process {pid} ended: status {status}, {seconds:.1f} s")
            result = {
                "status": status,
                "max_rss_mb": usage.ru_maxrss / 1024,
                "seconds": seconds,
            }
            with contextlib.suppress(OSError):
                conn.send(json.dumps(result).encode())
            conn.close()
            self.collect_learned(pid)

    def learned_file(self, pid: int) -> Path:
        return Path(self.address).with_name(f"learned-{pid}.json")

    def collect_learned(self, pid: int) -> None:
        path = self.learned_file(pid)
        try:
            names = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            return
        for name in names:
            if name not in self.known and name not in self.to_learn:
                self.to_learn.append(name)

    def learn(self, name: str) -> None:
        """Import one module a job imported (unless it would leave the worker threaded)."""
        self.known.add(name)
        if self.unsafe:
            return
        try:
            importlib.import_module(name)
        except Exception as error:
            self.log(f"not importing {name}: {error!r}")
        self.unsafe = fork_unsafe(self.native_baseline)
        if self.unsafe:
            self.log(f"after importing {name}, {self.unsafe}: every job in its own process now")


def run_job(
    request: dict, fds: list[int], conn: socket.socket, others: Iterable[socket.socket | None]
) -> None:
    """In the forked process: become the job's process and run its script (``others``: the
    worker's sockets that are not this job's, closed here); never returns."""
    global _in_worker
    code = 1
    try:
        for other in others:
            if other is not None:
                other.close()
        for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        sys.stdout.flush()
        sys.stderr.flush()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        # as a fresh interpreter has them: stdout line-buffered on a terminal only
        sys.stdout.reconfigure(line_buffering=os.isatty(1))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[STARTED] = str(request["started"])
        tempfile.tempdir = None  # the job's TMPDIR (Snakemake sets one per job), not the worker's
        sys.argv = [request["script"]]
        sys.path[0] = os.path.dirname(request["script"])  # as ``python script`` has it
        _in_worker = True
        _reseed()
        limit_threads(thread_count(os.environ))
        _die_with_client(conn)
        before = set(sys.modules)
        code = _run_script(request["script"])
        _note_learned(before)
        code = _shutdown(code)
    except KeyboardInterrupt:  # Ctrl-C before the script began: ended by SIGINT, as it would be
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _reseed() -> None:
    """Fresh random states where a fresh process would have them (the worker's were drawn once,
    and every job would share them)."""
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _die_with_client(conn: socket.socket) -> None:
    """Kill this process the moment the job's own process is gone (``kill -9`` included)."""
    import threading

    def watch() -> None:
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="adaptune-worker-client", daemon=True).start()


def _run_script(script: str) -> int:
    """Run ``script`` as ``__main__``; its exit code as a fresh interpreter's would be (an
    uncaught Ctrl-C ends this process by SIGINT, as it would end one)."""
    import runpy

    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None:
            return 0
        if isinstance(exit_.code, int):
            return exit_.code
        print(exit_.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        _shutdown(0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _shutdown(code: int) -> int:
    """What the interpreter does before it exits: wait for non-daemon threads, run ``atexit``
    functions, flush."""
    import atexit
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except Exception:
        traceback.print_exc()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _note_learned(before: Iterable[str]) -> None:
    """Leave the worker the names of the modules this job imported from its packages."""
    known = set(before)
    names = [
        name
        for name in list(sys.modules)
        if name not in known and name.split(".")[0] in LEARNED_PACKAGES
    ]
    address = os.environ.get(ENV)
    if not names or not address:
        return
    path = Path(address).with_name(f"learned-{os.getpid()}.json")
    with contextlib.suppress(OSError):
        path.write_text(json.dumps(names))


# --------------------------------------------------------------------------------------------
# Starting and stopping it (rules/common.smk)


class Handle:
    """A worker started for this workflow process."""

    def __init__(self, process: subprocess.Popen, address: str) -> None:
        self.process = process
        self.address = address

    def stop(self) -> None:
        """Ask it to end (it finishes running jobs first) and remove its folder once it has."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(Path(self.address).parent, ignore_errors=True)


def start(log: str | os.PathLike[str], environ: dict[str, str] | None = None) -> Handle | None:
    """Start a worker for this process's jobs (which find it through ``ADAPTUNE_WORKER``, set
    here in ``os.environ``); None where jobs are to run in their own processes (not Linux,
    ``ADAPTUNE_WORKER=off``, or inside a SLURM allocation). Its log goes to ``log``; it stops
    by itself when this process is gone."""
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or environ.get(ENV) == "off":
        return None
    if "SLURM_JOB_ID" in environ:
        # Inside a SLURM allocation, SLURM signals every process of the step: a job's own
        # process would pass on a signal that the process running it had already had, and a
        # second SIGTERM means "now" to a job (adaptune.signals.deferred).
        return None
    try:
        # Where its log or its socket cannot be written (a read-only or full results folder, a
        # full temporary folder), the jobs run in their own processes and meet the problem there,
        # each naming it, as without a worker.
        folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX)
    except OSError:
        return None
    try:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "w")  # noqa: SIM115 - the worker's stdout; closed here once it has it
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    address = os.path.join(folder, "socket")
    with out:
        process = subprocess.Popen(
            [sys.executable, "-m", "adaptune.worker", address, str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the jobs' own processes, which pass it on
        )
    environ[ENV] = address
    return Handle(process, address)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="adaptune's worker (started by the workflow)")
    parser.add_argument("address", help="the Unix socket to listen on")
    parser.add_argument("parent", type=int, help="the workflow's process: stop when it is gone")
    args = parser.parse_args(argv)
    folder = Path(args.address).parent
    # SIGTERM while it imports (the workflow ended first): end, through the cleanup below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(args.address, args.parent)
    finally:
        if folder.name.startswith(FOLDER_PREFIX):  # its own (start made it): gone with it
            shutil.rmtree(folder, ignore_errors=True)


def serve(address: str, parent: int) -> None:
    """Import what the jobs need, then serve them (unless forking has become unsafe)."""
    os.environ.pop(ENV, None)
    environment = dict(os.environ)
    began = time.perf_counter()
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError as error:
            print(f"not importing {name}: {error!r}", flush=True)
    for target in WARM:
        module, _, function = target.partition(":")
        try:
            getattr(importlib.import_module(module), function)()
        except (ImportError, AttributeError) as error:  # another MLflow: jobs compute it
            print(f"not warming {target}: {error!r}", flush=True)
    worker = Worker(address, parent, environment)
    worker.log(f"imported in {time.perf_counter() - began:.1f} s")
    if worker.unsafe:
        worker.log(f"after its imports, {worker.unsafe}: not serving")
        return
    worker.serve()


if __name__ == "__main__":
    # The worker's code must be module adaptune.worker, not __main__: the jobs it forks import
    # adaptune.worker and read its _in_worker.
    from adaptune.worker import main as worker_main

    worker_main()
