"""Send everything a stage prints to its Snakemake log file."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def to_log_file(path: str | os.PathLike[str]) -> Iterator[logging.Logger]:
    """Redirect stdout, stderr (at the file-descriptor level, so that C extensions, tqdm and
    third-party loggers are caught too) and the root logger to ``path`` for the duration.

    An exception is written to the log with its traceback and raised again, so Snakemake marks
    the job failed and points at this log.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
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
        try:
            yield logger
        except BaseException:
            logger.exception("stage failed")
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            root.removeHandler(handler)
            root.setLevel(previous_level)
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
