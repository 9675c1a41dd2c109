"""The experiment as a whole: the config validated once, when the workflow is parsed.

:func:`validate_config` checks the config against the schema (filling in its defaults), builds
every typed setting (which checks the rules between keys), checks each strategy with the
training settings of its runs, and that the data, the model and the baselines are of one
modality, so that any mistake stops before a job starts, in one line naming the key.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from adaptune import config, modalities, strategies
from adaptune.modalities import Modality
from adaptune.settings import DataSettings, ImportanceSettings, ModelSettings, TrainSettings


def validate_config(experiment: MutableMapping[str, Any]) -> Modality:
    """Validate ``experiment`` (a whole config, as Snakemake read it) in place and return the
    modality it will run; raises a ConfigError naming the first problem."""
    config.check_schema(experiment)
    data = DataSettings.from_config(experiment["data"])
    model = ModelSettings.from_config(experiment["model"])
    ImportanceSettings.from_config(experiment["importance"])
    for name, spec in experiment["strategies"].items():
        train = TrainSettings.from_config(experiment["train"], spec.get("train"), name)
        strategies.check(name, spec, train)
    return modalities.choose(data, model, experiment["baselines"])
