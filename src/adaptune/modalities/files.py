"""Local files that sources and models are read from, for every modality: the file a ``csv:`` or
``parquet:`` source names, CSV tables in the configured encoding, the files of a folder, and the
content fingerprint that decides when what reads them reruns.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import hashlib
import json
import logging
import lzma
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from adaptune.errors import DataError
from adaptune.settings import DataSettings

log = logging.getLogger(__name__)


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


SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "vertical bar"}
SNIFF_BYTES = 1 << 16
# The compressed files pandas reads by their suffix, and how to read their first bytes.
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def table_suffix(path: Path) -> str:
    """The suffix that says what a file holds: ``.tsv`` for ``news.tsv.gz`` too."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) > 1 and suffixes[-1] in (*COMPRESSED, ".zip"):
        return suffixes[-2]
    return path.suffix.lower()


def first_bytes(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of what ``path`` holds, decompressed where pandas would
    decompress it (``.gz``, ``.bz2``, ``.xz``, a ``.zip`` of one file)."""
    suffix = path.suffix.lower()
    if suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if len(names) != 1:
                raise DataError(f"{path}: a zip of {len(names)} files; give one file")
            with archive.open(names[0]) as stream:
                return stream.read(size)
    with COMPRESSED.get(suffix, open)(path, "rb") as stream:
        return stream.read(size)


def separator_name(separator: str) -> str:
    """``semicolon (';')``, for messages."""
    return (
        f"{SEPARATORS[separator]} ({separator!r})" if separator in SEPARATORS else repr(separator)
    )


def first_lines(path: Path, encoding: str) -> str:
    """The first :data:`SNIFF_BYTES` of what the CSV ``path`` holds, as text (a BOM dropped):
    what the separator and the header are read from."""
    try:
        head = first_bytes(path, SNIFF_BYTES)
    except (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: cannot read it as a {path.suffix} file: {err}") from err
    return head.decode(encoding, errors="replace").lstrip("\ufeff")


def header_fields(sample: str, separator: str) -> list[str]:
    """The header line of ``sample`` split at ``separator``, each field stripped."""
    header = sample.splitlines()[:1]
    return [f.strip() for f in next(csv.reader(header, delimiter=separator), [])]


def choose_separator(
    path: Path, sample: str, columns: Sequence[str], separator: str = ""
) -> tuple[str, str]:
    """The field separator of the CSV ``path`` (whose first lines are ``sample``) and why it
    was chosen: ``separator`` when set; a tab for ``.tsv`` and ``.tab`` files; else the
    candidate (comma, semicolon, tab, vertical bar) that splits the header line into all of
    ``columns``; else what :class:`csv.Sniffer` finds in the first lines; else a comma."""
    if separator:
        return separator, "data.separator"
    if table_suffix(path) in (".tsv", ".tab"):
        return "\t", f"the file ends in {''.join(path.suffixes[-2:])}"
    for candidate in SEPARATORS:
        fields = header_fields(sample, candidate)
        if columns and all(column in fields for column in columns):
            return candidate, f"it splits the header line into {', '.join(columns)}"
    try:
        sniffed = csv.Sniffer().sniff(sample, delimiters="".join(SEPARATORS)).delimiter
    except csv.Error:
        return ",", "the default; no other separator fits its first lines"
    return sniffed, "sniffed from its first lines"


def check_unique_columns(path: Path, sample: str, separator: str, columns: Sequence[str]) -> None:
    """Refuse a header that names one of ``columns`` more than once (pandas would read the
    first and rename the others ``NAME.1``, silently)."""
    fields = header_fields(sample, separator)
    twice = [c for c in columns if fields.count(c) > 1]
    if twice:
        counts = ", ".join(f"{c!r} {fields.count(c)} times" for c in twice)
        raise DataError(
            f"{path}: its header names {counts}; which one holds the data is ambiguous: "
            "rename the others"
        )


def read_csv(
    path: Path,
    encoding: str,
    columns_as_text: list[str],
    separator: str = "",
    fix: str = "set data.separator",
) -> pd.DataFrame:
    """A CSV in ``encoding`` (``data.encoding``), its fields separated by ``separator`` (empty:
    :func:`choose_separator` picks it, from the columns the source must have, which are
    ``columns_as_text``), those columns read as text (labels stay as written: "01" is not 1,
    and a column of numbers with a gap does not become floats). ``fix`` says how a user
    chooses another separator, for messages."""
    try:
        sample = first_lines(path, encoding)
        chosen, why = choose_separator(path, sample, columns_as_text, separator)
        log.info("%s: fields separated by %s (%s)", path, separator_name(chosen), why)
        frame = pd.read_csv(
            path, encoding=encoding, sep=chosen, dtype=dict.fromkeys(columns_as_text, str)
        )
        frame.attrs["separator"] = f"fields separated by {separator_name(chosen)}: {why}"
        check_unique_columns(path, sample, chosen, columns_as_text)
        return frame
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
        detail = str(err).strip().splitlines()[-1]
        raise DataError(
            f"{path}: not a well-formed CSV with the fields separated by "
            f"{separator_name(chosen)} ({why}): {detail}. If another character separates its "
            f"fields, {fix}; if a text holds the separator, quote that text"
        ) from err


def read_input_table(
    path: Path, column: str, what: str, encoding: str = "utf-8", separator: str = ""
) -> pd.DataFrame:
    """New inputs to predict from a CSV: ``id`` (its ``id`` column, else the row number) and
    ``input`` (its ``column``)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected {what})")
    fix = "give it a header line that names the input column"
    frame = read_csv(path, encoding, [column], separator, fix=fix)
    if column not in frame.columns:
        raise DataError(
            f"{path}: no column {column!r}; its columns are {list(frame.columns)} "
            "(name the input column with --column)"
        )
    ids = frame["id"] if "id" in frame.columns else pd.Series(range(len(frame)))
    return pd.DataFrame({"id": ids.to_numpy(), "input": frame[column].to_numpy()})


def files_under(folder: str | Path) -> list[Path]:
    """Every file under ``folder``, recursively, in a stable order (hidden ones skipped)."""
    root = Path(folder)
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def digest_cache() -> Path:
    """Where file digests are remembered between runs (by path, size and modification time)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "adaptune" / "file-digests.json"


def file_digests(files: Sequence[Path]) -> list[str]:
    """SHA-256 of each file's bytes; a file whose size and modification time are as when it was
    last hashed is not read again."""
    cache_path = digest_cache()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    digests, changed = [], False
    for path in files:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in cache:
            digest = hashlib.sha256()
            with path.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
            cache[key], changed = digest.hexdigest(), True
        digests.append(cache[key])
    if changed:
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            partial = cache_path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(cache))
            partial.replace(cache_path)
    return digests


def content_fingerprint(files: Sequence[Path], version: str = "") -> str:
    """What identifies the content of a source or a model: SHA-256 over each file's name and
    bytes, and the version of what is not a file. It changes exactly when a byte, a file name
    or the version does (not when a file is only touched or copied)."""
    digest = hashlib.sha256(version.encode())
    for path, file_digest in zip(files, file_digests(files), strict=True):
        digest.update(f"\x1e{path}\x1f{file_digest}".encode())
    return digest.hexdigest()
