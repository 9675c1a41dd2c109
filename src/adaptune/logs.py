"""Send everything a stage prints to its Snakemake log file."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adaptune.errors import AdaptuneError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOTICE = "adaptune.notice"  # a logger whose records reach the terminal as well as the log


@contextmanager
def to_log_file(path: str | os.PathLike[str], job: bool = True) -> Iterator[logging.Logger]:
    """Redirect stdout, stderr (at the file-descriptor level, so that C extensions, tqdm and
    third-party loggers are caught too) and the root logger to ``path`` for the duration.

    An exception is written to the log with its traceback, and the job fails. An error that
    adaptune raises on purpose (:class:`AdaptuneError`: a config, data, model, plan or
    tracking problem, whose message names the cause and the fix) then ends the process with
    that message alone on stderr, which Snakemake shows; any other exception is raised again,
    its traceback shown as well. Outside a job (``job=False``) every exception is raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    # What the job must tell the user while it goes on (logged to "adaptune.notice"): on the
    # terminal too, not only in the log.
    terminal = logging.StreamHandler(os.fdopen(os.dup(saved[2]), "w", buffering=1))
    terminal.setFormatter(logging.Formatter("adaptune: %(message)s"))
    notice = logging.getLogger(NOTICE)
    notice.addHandler(terminal)
    with open(path, "w", buffering=1) as log:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()
        root.addHandler(handler)
        previous_level = root.level
        root.setLevel(logging.INFO)
        logger = logging.getLogger("adaptune")
        failure = None
        try:
            yield logger
        except AdaptuneError as err:
            logger.exception("stage failed")
            if not job:
                raise
            failure = err
        except BaseException:
            logger.exception("stage failed")
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            root.removeHandler(handler)
            root.setLevel(previous_level)
            notice.removeHandler(terminal)
            terminal.stream.close()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
    if failure is not None:
        raise SystemExit(f"{type(failure).__name__}: {failure} (traceback: {path})")
