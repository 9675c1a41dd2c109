"""Labelled examples, whatever the modality: checking labels, the stratified split, few-shot
sampling, the split files and ``data.json``, and batches in a seeded order.

Every split is a parquet table with ``example_id`` (row of the source), ``label`` (class name)
and ``label_id`` (index into the sorted class names), plus the modality's encoded inputs (see
:mod:`adaptune.modalities`). ``data.json`` beside the splits names the modality and holds the
class names, class counts per split, a content fingerprint of the source, and what batching
needs (the modality's own keys).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adaptune import modalities
from adaptune.data_info import DataInfo
from adaptune.errors import DataError
from adaptune.modalities.files import content_fingerprint
from adaptune.settings import DataSettings, ModelSettings

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


INTEGRAL_FLOAT = re.compile(r"^[+-]?[0-9]+\.0*$")
NUMBER = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")


def integral_names(labels: pd.Series, source: str) -> pd.Series:
    """Labels written as integral floats (``0.0``, ``1.0``: a column of class numbers that a
    gap made floats, then saved) named as the integers they are (``0``, ``1``), and the log
    says so. They keep their spelling, and the log says why, where renaming would merge two
    classes (``1`` and ``1.0`` both present) or where other labels are fractional numbers (the
    column holds real values, not class numbers)."""
    written = list(labels.unique())
    floats = [label for label in written if INTEGRAL_FLOAT.match(label)]
    if not floats:
        return labels
    shown = ", ".join(map(repr, floats[:5]))
    fractional = [
        label
        for label in written
        if NUMBER.match(label)
        and not INTEGRAL_FLOAT.match(label)
        and not label.lstrip("+-").isdigit()
    ]
    if fractional:
        log.warning(
            "%s: labels %s look like integers written as floats, but others (%s) are "
            "fractional numbers: every label is kept as written",
            source,
            shown,
            ", ".join(map(repr, fractional[:5])),
        )
        return labels
    renamed = {label: str(int(label.partition(".")[0])) for label in floats}
    names = [renamed.get(label, label) for label in written]
    if len(set(names)) < len(names):
        merged = sorted(label for label in written if names.count(renamed.get(label, label)) > 1)
        log.warning(
            "%s: labels %s are integers written as floats, but naming them as integers would "
            "merge classes %s: every label is kept as written",
            source,
            shown,
            ", ".join(map(repr, merged[:6])),
        )
        return labels
    log.warning(
        "%s: labels %s are integers written as floats (a numeric label column with a gap is "
        "read as floats): named %s",
        source,
        shown,
        ", ".join(renamed[label] for label in floats[:5]),
    )
    return labels.map(lambda label: renamed.get(label, label))


def check_labels(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Refuse data that cannot train a classifier; return it with text labels (surrounding
    whitespace removed, which the log reports) and a stable ``example_id`` (its row in the
    source). Labels that differ only in case are refused: they are almost always one class
    written two ways, and the model cannot know."""
    if frame.empty:
        raise DataError(f"{source}: no examples")
    missing_label = frame["label"].isna()
    if missing_label.any():
        rows = frame.index[missing_label][:5].tolist()
        raise DataError(
            f"{source}: {int(missing_label.sum())} example(s) have no label (rows {rows})"
        )
    written = frame["label"].astype(str)
    labels = written.str.strip()
    padded = int((labels != written).sum())
    if padded:
        log.warning("%s: %d label(s) had surrounding whitespace, removed", source, padded)
    if (labels == "").any():
        rows = frame.index[labels == ""][:5].tolist()
        raise DataError(
            f"{source}: {int((labels == '').sum())} example(s) have a blank label (rows {rows})"
        )
    labels = integral_names(labels, source)
    spellings: dict[str, list[str]] = {}
    for label in labels.unique():
        spellings.setdefault(label.casefold(), []).append(label)
    clashes = [sorted(group) for group in spellings.values() if len(group) > 1]
    if clashes:
        raise DataError(
            f"{source}: labels {', '.join(' / '.join(map(repr, c)) for c in clashes)} differ only "
            "in case; write each class one way in the source"
        )
    frame = frame.assign(label=labels)
    if frame["label"].nunique() < 2:
        raise DataError(
            f"{source}: only one class ({frame['label'].iloc[0]!r}); a classifier needs two or more"
        )
    return frame.reset_index(drop=True).rename_axis("example_id").reset_index()


def deduplicate(
    frame: pd.DataFrame, keys: pd.Series, policy: str, source: str
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Group examples with the same input (``keys``, one per row): the groups are what the split
    assigns, so copies never straddle splits. Inputs that carry different labels are reported
    and, with ``policy`` "drop", removed with every copy (their label is unknown); "drop" keeps
    one copy of the rest, "keep" every copy. Returns the table with a ``group`` column (the
    ``example_id`` of the group's first row) and what was found, for data.json."""
    ids = pd.Series(frame["example_id"].to_numpy(), index=frame.index)
    frame = frame.assign(group=ids.groupby(keys.to_numpy(), sort=False).transform("first"))
    labels_per_group = frame.groupby("group")["label"].nunique()
    conflicting = labels_per_group.index[labels_per_group > 1]
    copies = frame.duplicated("group")
    report = {
        "policy": policy,
        "duplicate_copies": int(copies.sum()),
        "conflicting_inputs": len(conflicting),
        "conflicting_examples": [
            {
                "example_ids": part["example_id"].tolist()[:5],
                "labels": sorted(part["label"].unique()),
            }
            for _, part in frame[frame["group"].isin(conflicting)].groupby("group")
        ][:5],
    }
    if report["duplicate_copies"]:
        action = "removed" if policy == "drop" else "kept, each with its original in one split"
        log.warning(
            "%s: %d example(s) repeat an earlier input exactly: %s", source, copies.sum(), action
        )
    if len(conflicting):
        log.warning(
            "%s: %d input(s) appear with different labels, e.g. %s: %s",
            source,
            len(conflicting),
            report["conflicting_examples"][0],
            "all their copies removed" if policy == "drop" else "kept",
        )
    if policy == "drop":
        frame = frame[~copies & ~frame["group"].isin(conflicting)]
    report["examples_kept"] = len(frame)
    return frame, report


def split_sizes(count: int, val_size: float, test_size: float) -> dict[str, int]:
    """How many of ``count`` examples each split gets, rounded as scikit-learn's
    ``train_test_split`` rounds (the held-out part up)."""
    test = math.ceil(test_size * count)
    val = math.ceil(val_size / (1 - test_size) * (count - test))
    return {"train": count - test - val, "val": val, "test": test}


def _shortest_between(low: float, high: float) -> float:
    """The number with the fewest decimals (two at least) in ``(low, high]``."""
    for decimals in range(2, 8):
        scale = 10**decimals
        value = (math.floor(low * scale + 1e-9) + 1) / scale
        if value <= high + 1e-12:
            return value
    return high


def split_problem(count: int, classes: int, val_size: float, test_size: float) -> str:
    """Why ``count`` examples of ``classes`` classes cannot be split, stratified, with these
    fractions (every class needs an example in every split), and the fractions that would
    work, or that none would."""
    sizes = split_sizes(count, val_size, test_size)
    said = (
        f"{count} examples of {classes} classes split into {sizes['train']} train, "
        f"{sizes['val']} validation and {sizes['test']} test examples (data.val_size = "
        f"{val_size}, data.test_size = {test_size}), but a stratified split needs at least one "
        f"example of each class in each split: {classes} per split"
    )
    # The smallest fractions that hold `classes` examples, where the configured ones hold fewer.
    test, val = test_size, val_size
    if sizes["test"] < classes:
        test = _shortest_between((classes - 1) / count, classes / count)
    rest = count - math.ceil(test * count)
    if split_sizes(count, val, test)["val"] < classes and rest > 0:
        share = (1 - test) / rest
        val = _shortest_between((classes - 1) * share, classes * share)
    proposed = split_sizes(count, val, test) if val + test < 1 else {"train": 0}
    if (val, test) != (val_size, test_size) and min(proposed.values()) >= classes:
        changes = [
            f"data.{key} = {value}"
            for key, value, old in (("val_size", val, val_size), ("test_size", test, test_size))
            if value != old
        ]
        return f"{said}. Set {' and '.join(changes)}"
    if sizes["train"] < classes and min(sizes["val"], sizes["test"]) >= classes:
        return f"{said}. Lower data.val_size or data.test_size"
    return (
        f"{said}; no fractions give every class an example in every split at this size. Add "
        "examples (or remove classes with few)"
    )


def split_examples(
    frame: pd.DataFrame, val_size: float, test_size: float, seed: int
) -> dict[str, pd.DataFrame]:
    """Stratified train/val/test split with a fixed seed; every class appears in every split.
    Rows of one ``group`` (copies of one input), when the table has groups, go to one split:
    the groups' first rows are split, the other rows follow them."""
    if "group" in frame.columns and frame["group"].duplicated().any():
        firsts = frame.drop_duplicates("group")
        parts = split_examples(firsts, val_size, test_size, seed)
        return {
            name: frame[frame["group"].isin(part["group"])].sort_values("example_id")
            for name, part in parts.items()
        }
    # Imported here: scikit-learn takes 0.8 s to import (measured), and this module is read by
    # every stage while only prepare_data splits.
    from sklearn.model_selection import train_test_split

    counts = frame["label"].value_counts()
    too_small = counts[counts < 3]
    if not too_small.empty:
        raise DataError(
            f"class(es) {too_small.to_dict()} have fewer than 3 examples; a stratified "
            "train/val/test split needs at least one per split"
        )
    try:
        rest, test = train_test_split(
            frame, test_size=test_size, stratify=frame["label"], random_state=seed
        )
        train, val = train_test_split(
            rest, test_size=val_size / (1 - test_size), stratify=rest["label"], random_state=seed
        )
    except ValueError as err:
        raise DataError(split_problem(len(frame), len(counts), val_size, test_size)) from err
    return {
        name: part.sort_values("example_id")
        for name, part in zip(SPLITS, (train, val, test), strict=True)
    }


def sample_few_shot(
    train: pd.DataFrame, shots: int | None, seed: int, at_most: bool = False
) -> pd.DataFrame:
    """``shots`` examples of each class from a split (all of it when None); with ``at_most``, a
    class with fewer gives all it has (the validation sample), else that is an error.

    Each class is permuted once with ``seed`` and the first ``shots`` are taken, so smaller
    few-shot sets are nested inside larger ones and a new shot count changes no existing one.
    """
    if shots is None:
        return train
    counts = train["label"].value_counts()
    short = counts[counts < shots]
    if not short.empty and not at_most:
        raise DataError(
            f"{shots} shots per class asked, but the training split has only "
            f"{short.sort_index().to_dict()} of these classes; lower data.shots or data.val_size/"
            "test_size"
        )
    parts = []
    for label, group in train.groupby("label", sort=True):
        # One generator per class, seeded from the class name: independent of other classes.
        class_seed = int(hashlib.sha256(f"{seed}:{label}".encode()).hexdigest()[:8], 16)
        order = np.random.default_rng(class_seed).permutation(len(group))
        parts.append(group.sort_values("example_id").iloc[order[:shots]])
    return pd.concat(parts).sort_values("example_id")


def class_counts(frame: pd.DataFrame, labels: Sequence[str]) -> dict[str, int]:
    counts = frame["label"].value_counts()
    return {label: int(counts.get(label, 0)) for label in labels}


def prepare(
    settings: DataSettings, model: ModelSettings
) -> tuple[dict[str, pd.DataFrame], DataInfo]:
    """Load, check and split the data, then encode it for the model (token ids; cached pixels)
    as its modality says. Returns the splits and ``data.json``."""
    modality = modalities.choose(settings, model)
    loaded = modality.load_examples(settings)
    unreadable = loaded.attrs.get("unreadable_images")
    frame = check_labels(loaded, settings.source)
    frame, duplicates = deduplicate(
        frame, modality.input_key(frame), settings.duplicates, settings.source
    )
    labels = sorted(frame["label"].unique())
    label_ids = {label: i for i, label in enumerate(labels)}
    frame = frame.assign(label_id=frame["label"].map(label_ids).astype("int64"))
    splits = split_examples(frame, settings.val_size, settings.test_size, settings.seed)
    splits, encoding = modality.encode(splits, settings, model)
    info = DataInfo(
        source=settings.source,
        modality=modality.name,
        fingerprint=modality.fingerprint(frame),
        source_fingerprint=content_fingerprint(
            modality.source_files(settings), modality.source_version(settings)
        ),
        source_version=modality.source_version(settings),
        num_examples=len(frame),
        duplicates=duplicates,
        unreadable_images=unreadable or {},
        labels=tuple(labels),
        class_counts={name: class_counts(part, labels) for name, part in splits.items()},
        encoding=encoding,
    )
    return splits, info


def save_split(frame: pd.DataFrame, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


def read_split(path: str | Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def run_prepare_data(
    settings: DataSettings, model: ModelSettings, split_paths: dict[str, str], info_path: str
) -> DataInfo:
    """The ``prepare_data`` stage: :func:`prepare`, then write the splits and ``data.json``."""
    splits, info = prepare(settings, model)
    for name, part in splits.items():
        save_split(part, split_paths[name])
        log.info("%s: %d examples %s", name, len(part), info.class_counts[name])
    info.write(info_path)
    return info


def run_sample_few_shot(
    split_path: str, shots: int | None, seed: int, out_path: str, at_most: bool = False
) -> None:
    """The few-shot step of the data stage: k examples per class of the training split (or, with
    ``at_most``, up to k of the validation split)."""
    few = sample_few_shot(read_split(split_path), shots, seed, at_most)
    save_split(few, out_path)
    log.info(
        "%s per class: %d examples %s",
        shots or "all",
        len(few),
        few["label"].value_counts().to_dict(),
    )
