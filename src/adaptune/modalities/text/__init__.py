"""Text: Hugging Face transformers on labelled texts.

Sources are read by :mod:`.sources`, models by :mod:`.models`. A prepared split holds ``text``
and ``input_ids`` (token ids, unpadded, truncated to ``data.max_length``); batches are padded to
their longest example, so short texts cost little. The baseline is TF-IDF word 1-2 grams with
logistic regression.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from adaptune.modalities.base import (
    NOT_INPUTS,
    Baseline,
    Batch,
    Examples,
    Modality,
    TaskModel,
    installed_version,
)
from adaptune.modalities.files import local_file, read_input_table
from adaptune.modalities.shifts import Shift, perturbed
from adaptune.modalities.text import models, sources
from adaptune.modalities.text.shifts import SHIFTS
from adaptune.settings import DataSettings, ModelSettings
from adaptune.tracking import log_flavor_model

log = logging.getLogger(__name__)


TOKENIZE_CHUNK = 2048  # texts per tokenizer call: its Python lists of ids stay small


def tokenize(frame: pd.DataFrame, tokenizer: Any, max_length: int) -> pd.DataFrame:
    """Add ``input_ids`` (unpadded, truncated to ``max_length``, int32 arrays) from the model's
    tokenizer, a chunk of texts at a time, so that memory holds the arrays, not the tokenizer's
    lists of Python ints for the whole split."""
    ids: list[np.ndarray] = []
    texts = frame["text"].tolist()
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        encoded = tokenizer(
            texts[start : start + TOKENIZE_CHUNK], truncation=True, max_length=max_length
        )
        ids += [np.asarray(row, dtype=np.int32) for row in encoded["input_ids"]]
    return frame.assign(input_ids=ids)


def ends_with(frame: pd.DataFrame, token: int) -> int:
    """How many texts of a tokenised split end with ``token``."""
    return sum(1 for ids in frame["input_ids"] if len(ids) and ids[-1] == token)


class TokenExamples(Examples):
    """Token ids of a split held as one flat int32 array with offsets (no Python object per
    token), padded per batch to its longest text."""

    def __init__(self, frame: pd.DataFrame, pad_token_id: int) -> None:
        super().__init__(frame["label_id"].to_numpy())
        rows = frame["input_ids"].tolist()
        self.lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.ids = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
        self.pad_token_id = pad_token_id

    def inputs(self, index: int) -> dict[str, torch.Tensor]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return {"input_ids": torch.from_numpy(self.ids[start:end].astype(np.int64))}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> Batch:
        longest = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            attention_mask[row, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.stack([item["labels"] for item in items]),
            "index": torch.stack([item["index"] for item in items]),
        }


def tfidf_logreg(seed: int) -> Any:
    """TF-IDF (word 1-2 grams, sublinear term frequency) + multinomial logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
        LogisticRegression(C=10.0, max_iter=2000, random_state=seed),
    )


class TextModality(Modality):
    name = "text"
    local_models = "a Hugging Face model folder (config.json)"
    baselines: ClassVar[Mapping[str, Baseline]] = {
        "tfidf_logreg": Baseline(
            "tfidf_logreg",
            features=lambda frame: frame["text"],
            make=tfidf_logreg,
            describe=lambda fitted: {"vocabulary": len(fitted[0].vocabulary_)},
        )
    }

    def reads_source(self, data: DataSettings) -> bool:
        if data.kind == "bundled":
            return data.location in sources.BUNDLED_SOURCES
        if data.kind == "csv":
            return not data.image_column
        return data.kind in sources.SOURCE_KINDS

    def downloads(self, data: DataSettings, model: ModelSettings) -> bool:
        return data.kind == "hf" or model.kind == "hf"

    def reads_model(self, model: ModelSettings) -> bool:
        if model.kind == "bundled":
            return model.location in models.BUNDLED_MODELS
        if model.kind == "path":
            return models.is_model_folder(model.location)
        return model.kind == "hf"

    def check(self, data: DataSettings, model: ModelSettings) -> None:
        models.check_max_length(data.max_length, model.name, models.local_token_limit(model.name))

    def source_files(self, data: DataSettings) -> list[Path]:
        if data.kind in ("csv", "parquet"):
            return [local_file(data)]
        return []

    def source_version(self, data: DataSettings) -> str:
        if data.kind == "hf":
            return f"revision {data.revision or 'default branch'}"
        return installed_version(sources.BUNDLED_PACKAGE) if data.kind == "bundled" else ""

    def model_version(self, model: ModelSettings) -> str:
        if model.kind == "bundled":
            return installed_version(models.BUNDLED_MODELS[model.location][0].replace("_", "-"))
        return ""

    def load_examples(self, data: DataSettings) -> pd.DataFrame:
        return sources.load_texts(data)

    def input_key(self, frame: pd.DataFrame) -> pd.Series:
        return frame["text"]

    def fingerprint(self, frame: pd.DataFrame) -> str:
        digest = hashlib.sha256()
        for text, label in zip(frame["text"], frame["label"], strict=True):
            digest.update(label.encode())
            digest.update(b"\x1f")
            digest.update(text.encode())
            digest.update(b"\x1e")
        return digest.hexdigest()

    def encode(
        self, splits: dict[str, pd.DataFrame], data: DataSettings, model: ModelSettings
    ) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
        tokenizer = models.load_tokenizer(model.name)
        models.check_model(model.name, data.max_length, tokenizer)
        splits = {name: tokenize(part, tokenizer, data.max_length) for name, part in splits.items()}
        lengths = np.array([len(ids) for ids in splits["train"]["input_ids"]])
        pad = int(tokenizer.pad_token_id)  # never None: models.apply_padding_rule
        ending = {name: ends_with(part, pad) for name, part in splits.items()}
        if any(ending.values()):
            log.warning(
                "texts that end with the pad token %r (%s): their model classifies them from "
                "the last token before it",
                tokenizer.pad_token,
                ", ".join(f"{n} in {name}" for name, n in ending.items() if n),
            )
        return splits, {
            "max_length": data.max_length,
            "truncated_fraction_train": float(np.mean(lengths >= data.max_length)),
            "pad_token_id": pad,
        }

    shifts: ClassVar[Mapping[str, Shift]] = SHIFTS

    def shift(
        self,
        frame: pd.DataFrame,
        kind: str,
        severity: int,
        seed: int,
        data: DataSettings,
        model: ModelSettings,
    ) -> pd.DataFrame:
        """The texts perturbed (:mod:`.shifts`), then tokenised as :meth:`encode` does."""
        texts = perturbed(frame["text"], frame["example_id"], SHIFTS[kind], severity, seed)
        return tokenize(
            frame.assign(text=texts), models.load_tokenizer(model.name), data.max_length
        )

    def examples(
        self,
        frame: pd.DataFrame,
        augment: Sequence[str] = (),
        seed: int = 0,
    ) -> Examples:
        """``{input_ids, attention_mask, labels, index}`` batches, right-padded to the batch's
        longest text (``augment`` does not apply to text)."""
        return TokenExamples(frame, int(self.info.encoding["pad_token_id"]))

    def model_inputs(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), {k: v for k, v in batch.items() if k not in NOT_INPUTS}

    def sub_batch(self, batch: Batch, start: int, stop: int) -> Batch:
        """Some of a batch's texts, without the padding only the others needed."""
        part = super().sub_batch(batch, start, stop)
        width = int(part["attention_mask"].sum(1).max())
        return {
            k: v[:, :width] if k in ("input_ids", "attention_mask") else v for k, v in part.items()
        }

    def split_features(self, features: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
        """Per-token features (batch x padded length x ...) are cut to each text's length."""
        lengths = batch["attention_mask"].sum(1).tolist()
        if features.dim() >= 3 and features.shape[1] == batch["attention_mask"].shape[1]:
            return [row[:length] for row, length in zip(features, lengths, strict=True)]
        return super().split_features(features, batch)

    def join_features(self, pieces: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        """Per-token features are padded (with zeros, which the attention mask hides) to the
        batch's width."""
        width = batch["attention_mask"].shape[1]
        if pieces[0].dim() >= 2 and all(len(p) <= width for p in pieces):
            padded = pieces[0].new_zeros((len(pieces), width, *pieces[0].shape[1:]))
            for row, piece in enumerate(pieces):
                padded[row, : len(piece)] = piece
            return padded
        return super().join_features(pieces, batch)

    def example_chunks(self, batch: Batch, chunk_size: int) -> Iterator[Batch]:
        """Right-padded examples regrouped by length, their padding and attention mask removed:
        each is computed exactly as it would be alone, no compute goes to padding, and the model
        never branches on a mask's values (transformers' attention does, which ``vmap``
        refuses)."""
        mask = batch["attention_mask"]
        lengths = mask.sum(1)
        right_padded = torch.equal(
            mask.bool(), torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
        )
        if not right_padded:
            yield from super().example_chunks(batch, chunk_size)
            return
        width = mask.shape[1]
        for length in lengths.unique().tolist():
            chosen = (lengths == length).nonzero().flatten()
            for start in range(0, len(chosen), chunk_size):
                rows = chosen[start : start + chunk_size]
                yield {
                    k: v[rows, :length] if v.dim() == 2 and v.shape[1] == width else v[rows]
                    for k, v in batch.items()
                    if k != "attention_mask"
                }

    def load_pretrained(self, model: ModelSettings, seed: int) -> TaskModel:
        torch.manual_seed(seed)
        network, head = models.load_classifier(model, self.info.labels)
        log.info(
            "Loaded %s; new for this task, initialised from seed %d (expected): %s",
            model.name,
            seed,
            ", ".join(head),
        )
        return TaskModel(network, head, self)

    def save(self, task: TaskModel, directory: str | Path, model: ModelSettings) -> None:
        """A Hugging Face folder that loads and predicts on its own: the weights, the config
        (with the labels) and the tokenizer, truncating at the ``max_length`` the run trained
        with, so ``transformers.pipeline("text-classification", model=directory)`` works."""
        models.save_classifier(task.model, directory)
        tokenizer = models.load_tokenizer(model.name)
        tokenizer.model_max_length = int(self.info.encoding["max_length"])
        tokenizer.save_pretrained(str(directory))

    def load_finetuned(self, directory: str | Path) -> TaskModel:
        network = models.load_saved_classifier(directory)
        return TaskModel(network, models.find_head(network, network.config.num_labels), self)

    def saved_here(self, directory: Path) -> bool:
        return (directory / "config.json").is_file() and (
            directory / "tokenizer_config.json"
        ).is_file()

    def read_inputs(self, source: Path, column: str | None) -> pd.DataFrame:
        return read_input_table(source, column or "text", "a CSV with a column of texts")

    def predict(
        self, directory: str | Path, inputs: Sequence[Any], batch_size: int = 32
    ) -> tuple[list[str], np.ndarray]:
        """Tokenized by the model folder's own tokenizer, truncated where training truncated."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        network = models.load_saved_classifier(directory).eval()
        probabilities = []
        for start in range(0, len(inputs), batch_size):
            encoded = tokenizer(
                [str(text) for text in inputs[start : start + batch_size]],
                truncation=True,
                padding=True,
                return_tensors="pt",
            )
            with torch.no_grad():
                probabilities.append(network(**encoded).logits.float().softmax(-1).numpy())
        labels = [network.config.id2label[i] for i in range(network.config.num_labels)]
        return labels, np.concatenate(probabilities or [np.zeros((0, len(labels)))])

    def log_model(
        self, directory: str | Path, run_id: str, tracking_uri: str, example: pd.DataFrame
    ) -> str:
        """``mlflow.transformers``: the saved folder as a ``text-classification`` pipeline;
        strings in, a label and its score out, each text truncated where training truncated
        (a pipeline does not truncate unless asked). (MLflow's log-from-a-folder path does not
        work with transformers 5, so the pipeline is loaded from the folder.)"""
        import mlflow.transformers
        from mlflow.types import ColSpec, Schema
        from transformers import pipeline

        models._quiet_transformers()
        classify = pipeline("text-classification", model=str(directory), tokenizer=str(directory))
        return log_flavor_model(
            mlflow.transformers.log_model,
            run_id,
            tracking_uri,
            ("transformers", "tokenizers", "safetensors"),
            inputs=Schema([ColSpec("string")]),
            outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
            transformers_model=classify,
            input_example=example["text"].astype(str).tolist(),
            model_config={"truncation": True},
        )


MODALITY = TextModality()
