from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from adaptune.errors import ConfigError
from adaptune.settings import (
    DataSettings,
    ImportanceSettings,
    ModelSettings,
    StrategySettings,
    TrainSettings,
    parse_shots,
)

REPO_CONFIG = Path(__file__).parents[1] / "config"
SCHEMA = yaml.safe_load((REPO_CONFIG / "schema.yaml").read_text())


@pytest.mark.parametrize(
    ("section", "cls"),
    [
        ("data", DataSettings),
        ("model", ModelSettings),
        ("importance", ImportanceSettings),
        ("train", TrainSettings),
    ],
)
def test_dataclass_defaults_match_the_schema(section, cls):
    properties = SCHEMA["properties"][section]["properties"]
    for f in fields(cls):
        if "default" not in properties[f.name]:
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default
        assert default == properties[f.name]["default"], f"{section}.{f.name}"
    assert set(properties) == {f.name for f in fields(cls)}


def test_strategy_kinds_match_the_schema():
    from adaptune.settings import STRATEGY_KINDS

    kinds = SCHEMA["properties"]["strategies"]["additionalProperties"]["properties"]["kind"]["enum"]
    assert tuple(kinds) == STRATEGY_KINDS


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) learning_rate"):
        TrainSettings.from_config({"learning_rate": 1e-3})


def test_bad_optimizer_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"train.optimizer = 'lion'.*adamw"):
        TrainSettings.from_config({"optimizer": "lion"})


def test_strategy_overrides_win_and_are_checked():
    settings = TrainSettings.from_config({"lr": 1e-5, "epochs": 3}, {"lr": 1e-3}, "head_only")
    assert settings.lr == 1e-3 and settings.epochs == 3
    with pytest.raises(ConfigError, match=r"strategies.head_only.train: seeds cannot differ"):
        TrainSettings.from_config({}, {"seeds": [1]}, "head_only")
    with pytest.raises(ConfigError, match=r"overrides of strategies.x"):
        TrainSettings.from_config({}, {"lr": -1.0}, "x")


def test_split_sizes_must_leave_training_data():
    with pytest.raises(ConfigError, match=r"leaves no training examples"):
        DataSettings(source="bundled:bbc-news", val_size=0.5, test_size=0.5)


def test_shots():
    assert parse_shots("16") == 16
    assert parse_shots("all") is None
    with pytest.raises(ConfigError, match=r"data.shots"):
        parse_shots("0")
    with pytest.raises(ConfigError, match=r"data.shots"):
        DataSettings(source="bundled:bbc-news", shots=["many"])


def test_unknown_strategy_kind():
    with pytest.raises(ConfigError, match=r"strategies.mine.*allowed: full, head_only"):
        StrategySettings.from_config("mine", {"kind": "everything"})


def test_strategy_train_overrides_match_the_schema():
    from adaptune.settings import OVERRIDABLE_TRAIN_KEYS

    strategy = SCHEMA["properties"]["strategies"]["additionalProperties"]["properties"]
    assert tuple(strategy["train"]["propertyNames"]["enum"]) == OVERRIDABLE_TRAIN_KEYS


def test_model_names_are_checked_and_image_models_recognised():
    assert ModelSettings.from_config("bundled:efficientnet-lite0").is_image
    assert ModelSettings.from_config({"name": "torchvision:resnet50", "weights": "X"}).is_image
    assert not ModelSettings.from_config({"name": "bundled:all-MiniLM-L6-v2"}).is_image
    with pytest.raises(ConfigError, match=r"model.name = 'resnet50': use bundled:"):
        ModelSettings.from_config("resnet50")


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (REPO_CONFIG).rglob("*.yaml") if p.name != "schema.yaml"),
    ids=lambda p: str(p.relative_to(REPO_CONFIG)),
)
def test_every_shipped_config_is_valid(path):
    """Each config (an experiment on its own, as ``--configfile`` gives it) passes the schema and
    parses into settings whose data, model and baselines agree."""
    from snakemake.utils import validate

    from adaptune.settings import check_modalities

    config = yaml.safe_load(path.read_text())
    validate(config, str(REPO_CONFIG / "schema.yaml"))
    DataSettings.from_config(config["data"])
    TrainSettings.from_config(config["train"])
    for name, spec in config["strategies"].items():
        StrategySettings.from_config(name, spec)
        TrainSettings.from_config(config["train"], spec.get("train", {}), name)
    ImportanceSettings.from_config(config["importance"])
    check_modalities(config)
