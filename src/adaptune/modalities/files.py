"""Local files that sources and models are read from, for every modality: the file a ``csv:`` or
``parquet:`` source names, CSV tables in the configured encoding, and the files of a folder.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from adaptune.errors import DataError
from adaptune.settings import DataSettings


def local_file(settings: DataSettings) -> Path:
    """The file a ``csv:`` or ``parquet:`` source names, or a DataError saying what is there
    instead."""
    path = Path(settings.location)
    if path.is_dir():
        raise DataError(
            f"data.source = {settings.source!r}: {path.resolve()} is a folder, not a file"
        )
    if not path.is_file():
        raise DataError(f"data.source = {settings.source!r}: no file at {path.resolve()}")
    return path


def read_csv(path: Path, encoding: str, columns_as_text: list[str]) -> pd.DataFrame:
    """A CSV in ``encoding`` (``data.encoding``), the given columns read as text (labels stay
    as written: "01" is not 1, and a column of numbers with a gap does not become floats)."""
    try:
        return pd.read_csv(path, encoding=encoding, dtype=dict.fromkeys(columns_as_text, str))
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not valid {encoding} text ({err.reason} at byte {err.start}); set "
            "data.encoding to the file's encoding (e.g. latin-1, cp1252 or utf-16)"
        ) from err
    except LookupError as err:
        raise DataError(f"data.encoding = {encoding!r} is not an encoding Python knows") from err
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{path}: the file is empty (not even a header line)") from err
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: not a well-formed CSV: {err}") from err


def files_under(folder: str | Path) -> list[Path]:
    """Every file under ``folder``, recursively, in a stable order (hidden ones skipped)."""
    root = Path(folder)
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
