"""The experiment as a whole: the config validated once, when the workflow is parsed.

:func:`validate_config` checks the config against the schema (filling in its defaults), builds
every typed setting (which checks the rules between keys), expands each strategy's ``sweep``
into one strategy per value (:mod:`adaptune.sweeps`), checks each strategy with the
training settings of its runs, and that the data, the model and the baselines are of one
modality, so that any mistake stops before a job starts, in one line naming the key. It returns
what the workflow needs to know about the world outside ``results/``: fingerprints of the data
and of the model (the bytes and names of their local files, the versions of packaged ones),
params of the stages that read them, so that a change of content reruns them and a file that is
only touched or copied does not.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptune import config, modalities, strategies, sweeps, tracking
from adaptune.devices import check_device
from adaptune.errors import ConfigError
from adaptune.modalities import Modality
from adaptune.modalities.files import content_fingerprint
from adaptune.settings import DataSettings, ImportanceSettings, ModelSettings, TrainSettings


@dataclass(frozen=True)
class Experiment:
    """A validated experiment: its modality and the content fingerprints of its data source
    and its pretrained model (:func:`adaptune.modalities.files.content_fingerprint`)."""

    modality: Modality
    source_fingerprint: str
    model_fingerprint: str
    downloads: bool  # the data or the model come from a network: the fetch stage runs first


def validate_config(
    experiment: MutableMapping[str, Any],
    main_process: bool = False,
    jobs_share_files: bool = True,
    devices: bool = True,
) -> Experiment:
    """Validate ``experiment`` (a whole config, as Snakemake read it) in place; raises a
    ConfigError naming the first problem. ``jobs_share_files`` says whether the jobs see this
    machine's files (not so with the kubernetes executor): if not, the tracking store must be
    one they reach. With ``main_process`` (the process that runs the workflow, not a job of
    it) also check what the config asks of this machine: a tracking store that answers, and
    (unless ``devices`` is False: the workflow checks it when execution starts, once it knows
    whether jobs run here or on a cluster) a CUDA device where ``train.device`` names one."""
    config.check_schema(experiment)
    sweeps.expand(experiment["strategies"])
    tracking.check_store_for_jobs(experiment["mlflow"]["tracking_uri"], jobs_share_files)
    data = DataSettings.from_config(experiment["data"])
    model = ModelSettings.from_config(experiment["model"])
    ImportanceSettings.from_config(experiment["importance"])
    for name, spec in experiment["strategies"].items():
        train = TrainSettings.from_config(experiment["train"], spec.get("train"), name)
        strategies.check(name, spec, train)
    check_reference(experiment["report"]["reference"], experiment["strategies"])
    check_pairs(experiment["report"]["pairs"], experiment["strategies"])
    modality = modalities.choose(data, model, experiment["baselines"])
    modality.check(data, model)
    check_shifts(modality, experiment["evaluate"]["shifts"])
    if main_process:
        if devices:
            check_device(experiment["train"]["device"])
        tracking.check_store(experiment["mlflow"]["tracking_uri"])
        tracking.relocate_artifacts(
            experiment["mlflow"]["tracking_uri"],
            experiment["mlflow"]["experiment_name"] or experiment["experiment"],
            Path("results") / experiment["experiment"] / "mlartifacts",
        )
    return Experiment(
        modality,
        content_fingerprint(modality.source_files(data), modality.source_version(data)),
        content_fingerprint(modality.model_files(model), modality.model_version(model)),
        modality.downloads(data, model),
    )


def check_reference(reference: str, strategies: Mapping[str, Any]) -> None:
    """``report.reference``, where set, must be one of the strategies (a swept one by its
    name without the swept value)."""
    if reference:
        _check_strategy("report.reference", reference, strategies)


def check_pairs(pairs: Sequence[Sequence[str]], strategies: Mapping[str, Any]) -> None:
    """Each of ``report.pairs`` names two different strategies (as ``report.reference``)."""
    for index, pair in enumerate(pairs):
        for name in pair:
            _check_strategy(f"report.pairs[{index}]", name, strategies)
        if pair[0] == pair[1]:
            raise ConfigError(f"report.pairs[{index}] compares {pair[0]!r} with itself")


def _check_strategy(key: str, name: str, strategies: Mapping[str, Any]) -> None:
    names = sorted({sweeps.family(strategy) for strategy in strategies})
    if name not in names:
        raise ConfigError(
            f"{key} = {name!r} is not a strategy of this experiment; use one of: {', '.join(names)}"
        )


def check_shifts(modality: Modality, shifts: Mapping[str, Any]) -> None:
    """Every shift of ``evaluate.shifts`` must be one of the modality's."""
    for kind in shifts:
        if kind not in modality.shifts:
            raise ConfigError(
                f"evaluate.shifts.{kind}: not a shift of {modality.name} data; "
                f"use one of: {', '.join(modality.shifts)}"
            )
