"""What every modality provides, and the model-with-a-head that the stages pass around.

A modality (text, images, ...) is everything that differs with the kind of input: which sources
and models it reads, how examples are encoded for the model and batched, how a pretrained model
gets a new head and how a fine-tuned one is saved and loaded again, and which classical baseline
applies. The stages and the training loop ask the modality named in ``data.json`` and never
look at the kind of input themselves.

A modality has two lives. Before the data is prepared (the config's checks, ``prepare_data``)
it is the registry's object, and reads sources and encodes them. After, it is *bound* to the
prepared data's :class:`~adaptune.data_info.DataInfo` (:meth:`Modality.bind`, after Hugging
Face's ``AutoProcessor``): it knows the class names and the encoding (the pad token, the input
transform), so examples, models and saving need nothing passed along.
"""

from __future__ import annotations

import copy
import importlib.metadata
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
import torch
from torch import nn

from adaptune.data_info import DataInfo
from adaptune.errors import ConfigError
from adaptune.modalities.files import files_under
from adaptune.modalities.shifts import Shift
from adaptune.settings import DataSettings, ModelSettings

Batch = dict[str, torch.Tensor]
# Keys of a batch that are not the model's inputs: the targets, and each example's row in its
# split (which the frozen-prefix cache and length-sorted inference use).
NOT_INPUTS = ("labels", "index")


class Examples(torch.utils.data.Dataset):
    """A prepared split as a map-style dataset of single examples (dicts of tensors, with
    ``labels`` and ``index``), with :meth:`collate` to make batches of them. ``lengths`` (the
    cost of each example, for sorting inference batches) is None where all cost the same.
    :meth:`set_epoch` reseeds train-time augmentation (each example's draws depend on the
    seed, the epoch and its index only, so data-loading workers change nothing)."""

    lengths: np.ndarray | None = None

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = torch.as_tensor(np.array(labels, dtype=np.int64))
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**self.inputs(index), "labels": self.labels[index], "index": torch.tensor(index)}

    def inputs(self, index: int) -> dict[str, torch.Tensor]:
        """The model inputs of one example."""
        raise NotImplementedError

    def collate(self, items: list[dict[str, torch.Tensor]]) -> Batch:
        """Stack examples of equal shapes (a modality with ragged inputs pads here)."""
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def loader(
    examples: Examples,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    by_length: bool = False,
    workers: int = 0,
    pin_memory: bool = False,
    shard: Callable[[list[int]], list[int]] | None = None,
    start: int = 0,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` of batches of ``examples``: in row order, shuffled by ``generator``, or
    (``by_length``, for inference) longest first, so that each batch pads little. Every batch
    carries ``index``, the rows it holds. ``workers`` processes decode and augment examples;
    the batches and their order are the same with any number. ``shard`` keeps, of each batch's
    rows, those this process trains on (:func:`adaptune.distributed.shard`). ``start`` skips
    the first batches of the order (a run resumed within an epoch), without loading them."""
    count = len(examples)
    if shuffle:
        order = torch.randperm(count, generator=generator).tolist()
    elif by_length and examples.lengths is not None:
        order = np.argsort(-examples.lengths, kind="stable").tolist()
    else:
        order = list(range(count))
    batches = [order[first : first + batch_size] for first in range(0, count, batch_size)]
    batches = batches[start:]
    return torch.utils.data.DataLoader(
        examples,
        batch_sampler=[shard(b) for b in batches] if shard else batches,
        collate_fn=examples.collate,
        num_workers=workers,
        pin_memory=pin_memory,
    )


def installed_version(package: str) -> str:
    """``package==version`` of an installed distribution ("" when it is not installed)."""
    try:
        return f"{package}=={importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return ""


@dataclass
class TaskModel:
    """A pretrained model with a classification head for the task's classes.

    ``head`` lists the parameters that are new for the task (not in the pretrained checkpoint);
    ``modality`` knows how to feed the model a batch.
    """

    model: nn.Module
    head: tuple[str, ...]
    modality: Modality

    def logits(self, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits for a batch; with ``params``, computed with those tensors (``torch.func``)."""
        return self.modality.forward(self.model, batch, params)


@dataclass(frozen=True)
class Baseline:
    """A classical classifier fitted on the same few-shot split as the fine-tuned models.

    ``features`` turns a prepared split into the estimator's input; ``make(seed)`` returns an
    unfitted scikit-learn estimator (its last step a linear classifier with ``coef_``);
    ``describe`` gives what to log about a fitted one.
    """

    name: str
    features: Callable[[pd.DataFrame], Any]
    make: Callable[[int], Any]
    describe: Callable[[Any], dict[str, Any]] = field(default=lambda fitted: {})


class Modality(ABC):
    """The interface every modality implements (see the module docstring)."""

    name: ClassVar[str]
    baselines: ClassVar[Mapping[str, Baseline]]
    # What a ``path:DIR`` model of this modality is, for messages.
    local_models: ClassVar[str]
    # The prepared data this modality is bound to (:meth:`bind`); None in the registry.
    bound_to: DataInfo | None = None

    def bind(self, info: DataInfo) -> Self:
        """This modality bound to prepared data: a copy that answers :attr:`info`."""
        if info.modality != self.name:
            raise ConfigError(f"data.json is of {info.modality} data, not {self.name}")
        bound = copy.copy(self)
        bound.bound_to = info
        return bound

    @property
    def info(self) -> DataInfo:
        """The prepared data this modality is bound to."""
        if self.bound_to is None:
            raise RuntimeError(
                f"the {self.name} modality is not bound to prepared data: use "
                "adaptune.modalities.for_data(DataInfo.read(...))"
            )
        return self.bound_to

    # --- which config it serves -------------------------------------------------------------

    @abstractmethod
    def reads_source(self, data: DataSettings) -> bool:
        """Whether ``data.source`` holds this modality's examples."""

    @abstractmethod
    def downloads(self, data: DataSettings, model: ModelSettings) -> bool:
        """Whether loading ``data`` or ``model`` fetches files from a network (a hub dataset or
        model, library weights named but not given as a file): the workflow's ``fetch`` stage
        then fetches them once, where there is a network, before any compute job."""

    @abstractmethod
    def reads_model(self, model: ModelSettings) -> bool:
        """Whether ``model.name`` is a model for this modality."""

    def check(self, data: DataSettings, model: ModelSettings) -> None:
        """Refuse data settings the model cannot honour (a ConfigError naming both numbers),
        from what its files say where they are at hand when the config is validated."""
        return None

    # --- prepare_data -----------------------------------------------------------------------

    @abstractmethod
    def source_files(self, data: DataSettings) -> list[Path]:
        """The local files the examples are read from (the workflow's inputs of
        ``prepare_data``, so that editing one reruns it); a DataError when one is missing."""

    def source_version(self, data: DataSettings) -> str:
        """What identifies the content of a source that is not a local file (the version of
        the package that ships it); a change reruns ``prepare_data``."""
        return ""

    def model_files(self, model: ModelSettings) -> list[Path]:
        """The local files the pretrained model is read from (a ``path:`` folder, a weights
        file): inputs of every stage that loads the model."""
        if model.kind == "path":
            return files_under(model.location)
        return []

    def model_version(self, model: ModelSettings) -> str:
        """What identifies a model that is not a local file (the version of the package that
        ships it, or of the library that downloads it)."""
        return ""

    @abstractmethod
    def load_examples(self, data: DataSettings) -> pd.DataFrame:
        """The source's examples, checked for this modality: a table with the input column(s)
        and ``label``, in the source's order."""

    @abstractmethod
    def input_key(self, frame: pd.DataFrame) -> pd.Series:
        """One hashable value per example, equal exactly when two examples have the same input
        (the same text; the same decoded pixels): how duplicates are found."""

    @abstractmethod
    def fingerprint(self, frame: pd.DataFrame) -> str:
        """SHA-256 of the examples (inputs and labels, in order): changes whenever they do."""

    @abstractmethod
    def encode(
        self, splits: dict[str, pd.DataFrame], data: DataSettings, model: ModelSettings
    ) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
        """The splits in the form batches are made from (token ids; cached pixels), and what
        ``data.json`` must hold for that (the pad token; the model's input transform)."""

    # --- shifted test splits (evaluate) ---------------------------------------------------

    # This modality's shift kinds, by name (see :mod:`adaptune.modalities.shifts`).
    shifts: ClassVar[Mapping[str, Shift]] = {}

    @abstractmethod
    def shift(
        self,
        frame: pd.DataFrame,
        kind: str,
        severity: int,
        seed: int,
        data: DataSettings,
        model: ModelSettings,
    ) -> pd.DataFrame:
        """A prepared split with shift ``kind`` at ``severity`` applied to every example's
        input (seeded per example: :func:`adaptune.modalities.shifts.example_rng`), prepared
        again exactly as :meth:`encode` prepared it; labels and ids unchanged."""

    # --- batches ----------------------------------------------------------------------------

    @abstractmethod
    def examples(
        self,
        frame: pd.DataFrame,
        augment: Sequence[str] = (),
        seed: int = 0,
    ) -> Examples:
        """A prepared split as :class:`Examples`; ``augment`` (train-time augmentations) drawn
        from ``seed``, the epoch and each example's index."""

    def batches(
        self,
        frame: pd.DataFrame,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[Batch]:
        """Batches of a prepared split, in row order or shuffled by ``generator``, without
        augmentation."""
        yield from loader(self.examples(frame), batch_size, shuffle, generator)

    @abstractmethod
    def model_inputs(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The positional and keyword arguments of the model's forward for a batch."""

    def forward(
        self, model: nn.Module, batch: Batch, params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Logits for a batch (``labels`` ignored). With ``params``, the model runs on those
        tensors instead of its own (``torch.func.functional_call``)."""
        args, kwargs = self.model_inputs(batch)
        if params is None:
            output = model(*args, **kwargs)
        else:
            output = torch.func.functional_call(model, params, args, kwargs)
        return output.logits if hasattr(output, "logits") else output

    def sub_batch(self, batch: Batch, start: int, stop: int) -> Batch:
        """The examples ``start:stop`` of a batch, as a batch."""
        return {key: value[start:stop] for key, value in batch.items()}

    def split_features(self, features: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
        """A batch of a module's inputs (the frozen-prefix cache) as one tensor per example."""
        return list(features.unbind(0))

    def join_features(self, pieces: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        """The inverse of :meth:`split_features` for the examples of ``batch``."""
        return torch.stack(pieces)

    def example_chunks(self, batch: Batch, chunk_size: int) -> Iterator[Batch]:
        """A batch's examples in chunks of at most ``chunk_size``, each chunk computable per
        example (``torch.func.vmap``). The default slices the batch."""
        for start in range(0, len(batch["labels"]), chunk_size):
            yield {k: v[start : start + chunk_size] for k, v in batch.items()}

    # --- models -----------------------------------------------------------------------------

    @abstractmethod
    def load_pretrained(self, model: ModelSettings, seed: int) -> TaskModel:
        """The pretrained model with a new head for the bound data's labels, initialised from
        ``seed``."""

    @abstractmethod
    def save(self, task: TaskModel, directory: str | Path, model: ModelSettings) -> None:
        """Save a fine-tuned model so that :meth:`load_finetuned` (and its own library) loads
        it."""

    @abstractmethod
    def load_finetuned(self, directory: str | Path) -> TaskModel:
        """A model saved by :meth:`save`."""

    @abstractmethod
    def saved_here(self, directory: Path) -> bool:
        """Whether ``directory`` holds a model :meth:`save` wrote."""

    @abstractmethod
    def read_inputs(self, source: Path, column: str | None) -> pd.DataFrame:
        """New, unlabelled inputs to predict: an ``id`` column and what :meth:`predict`
        takes (``input``), read from a CSV (``column`` names its input column) or, where the
        modality has one, a folder."""

    @abstractmethod
    def predict(
        self, directory: str | Path, inputs: Sequence[Any], batch_size: int = 32
    ) -> tuple[list[str], np.ndarray]:
        """The saved model's labels and its class probabilities (inputs x labels) for
        ``inputs``, preprocessed exactly as ``evaluate`` preprocessed the test split."""

    @abstractmethod
    def log_model(
        self, directory: str | Path, run_id: str, tracking_uri: str, example: pd.DataFrame
    ) -> str:
        """Log the saved model to the MLflow run with its own library's flavor, a signature
        and an input example (made from ``example``, a few rows of a prepared split); returns
        the logged model's URI."""
