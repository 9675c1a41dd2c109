"""Modalities: each subpackage (``text``, ``image``) implements :class:`Modality` and exposes it
as ``MODALITY``. Adding one (audio, tabular) is one new subpackage; nothing else changes.

The modality is chosen once, from the config, by ``prepare_data`` (:func:`choose`), which writes
its name into ``data.json``; every later stage binds it to that file's contents
(:func:`for_data`).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from pathlib import Path

from adaptune.data_info import DataInfo
from adaptune.errors import ConfigError
from adaptune.modalities.base import Baseline, Batch, Examples, Modality, TaskModel, loader
from adaptune.settings import DataSettings, ModelSettings

__all__ = [
    "Baseline",
    "Batch",
    "Examples",
    "Modality",
    "TaskModel",
    "all_modalities",
    "choose",
    "for_data",
    "get",
    "loader",
    "saved_in",
]


@functools.cache
def all_modalities() -> dict[str, Modality]:
    """Every modality subpackage of this package, by name."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            modality = importlib.import_module(f"{__name__}.{info.name}").MODALITY
            found[modality.name] = modality
    return found


def get(name: str) -> Modality:
    """The modality called ``name`` (not bound to data)."""
    modalities = all_modalities()
    if name not in modalities:
        raise ConfigError(f"unknown modality {name!r}; known: {', '.join(modalities)}")
    return modalities[name]


def for_data(info: DataInfo) -> Modality:
    """The modality of prepared data, bound to it (:meth:`Modality.bind`)."""
    return get(info.modality).bind(info)


def choose(data: DataSettings, model: ModelSettings, baselines: list[str] = ()) -> Modality:
    """The modality of the data; the model and the baselines must be of the same one."""
    modalities = all_modalities().values()
    readers = [m for m in modalities if m.reads_source(data)]
    if not readers:
        raise ConfigError(f"data.source = {data.source!r}: no modality reads this source")
    modality = readers[0]
    if model.kind == "path" and not any(m.reads_model(model) for m in modalities):
        folder = Path(model.location).resolve()
        what = ", nor ".join(m.local_models for m in modalities)
        raise ConfigError(
            f"model.name = {model.name!r}: {folder} does not exist"
            if not folder.exists()
            else f"model.name = {model.name!r}: {folder} is neither {what}"
        )
    if not modality.reads_model(model):
        others = [m.name for m in modalities if m.reads_model(model)]
        kind = f"a model for {others[0]}" if others else "not a model adaptune can load"
        raise ConfigError(
            f"data.source = {data.source!r} holds {modality.name} examples, but model.name = "
            f"{model.name!r} is {kind}"
        )
    wrong = [b for b in baselines if b not in modality.baselines]
    if wrong:
        raise ConfigError(
            f"baselines: {', '.join(wrong)} cannot run on {modality.name} data; use "
            f"{', '.join(modality.baselines) or 'none'}"
        )
    return modality


def saved_in(directory: str | Path) -> Modality:
    """The modality whose :meth:`Modality.save` wrote the model folder ``directory``."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such model folder")
    for modality in all_modalities().values():
        if modality.saved_here(folder):
            return modality
    raise ConfigError(
        f"{folder}: not a model folder the finetune stage wrote "
        "(results/<experiment>/runs/<strategy>/k<shots>/seed<seed>/model)"
    )
