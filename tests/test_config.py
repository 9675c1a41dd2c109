"""The config is validated once, against the schema, with one-line messages naming the key; the
typed settings check only rules between keys."""

from pathlib import Path

import pytest
import yaml

from adaptune import config, strategies
from adaptune.errors import ConfigError
from adaptune.experiment import validate_config
from adaptune.modalities.files import content_fingerprint
from adaptune.settings import DataSettings, ImportanceSettings, ModelSettings, TrainSettings

REPO_CONFIG = Path(__file__).parents[1] / "config"


def minimal(**overrides) -> dict:
    base = {
        "experiment": "x",
        "data": {"source": "bundled:bbc-news"},
        "model": {"name": "bundled:all-MiniLM-L6-v2"},
    }
    return {**base, **overrides}


def test_the_schema_the_workflow_reads_is_the_packaged_one():
    shipped = yaml.safe_load((REPO_CONFIG / "schema.yaml").read_text())
    assert shipped == config.schema()


def test_defaults_are_filled_from_the_schema_alone():
    filled = validate_config_copy(minimal())
    assert filled["train"]["lr"] == 5e-5 and filled["train"]["seeds"] == [0]
    assert filled["data"]["shots"] == [16] and filled["importance"]["batches"] == 2
    assert filled["strategies"] == {"full": {"kind": "full"}, "head_only": {"kind": "head_only"}}
    kinds = validate_config_copy(
        minimal(strategies={"l": {"kind": "llrd"}, "r": {"kind": "lora", "train": {"lr": 1e-3}}})
    )["strategies"]
    # Each kind's own defaults, and none of train:'s defaults in an override block.
    assert kinds["l"] == {"kind": "llrd", "decay": 0.8}
    assert kinds["r"] == {
        "kind": "lora",
        "train": {"lr": 1e-3},
        "r": 8,
        "alpha": 16,
        "dropout": 0.1,
        "targets": [],
    }


def validate_config_copy(experiment: dict) -> dict:
    validate_config(experiment)
    return experiment


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["strategies"]["s"]["train"].update(lr=-1.0),
            r"^strategies\.s\.train\.lr = -1\.0: -1\.0 is less than or equal to the minimum of 0$",
        ),
        (
            lambda c: c["strategies"]["s"]["train"].update(seeds=[1]),
            r"^strategies\.s\.train: unknown key 'seeds'; allowed here: accumulate_steps, augment",
        ),
        (
            lambda c: c["strategies"]["s"].update(decay=0.5),
            r"^strategies\.s: unknown key 'decay'; allowed here: kind, p, sweep, train$",
        ),
        (
            lambda c: c["strategies"]["s"].update(kind="everything"),
            r"^strategies\.s\.kind = 'everything' is not allowed; use one of: full, head_only",
        ),
        (
            lambda c: c["train"].update(optimizer="lion"),
            r"^train\.optimizer = 'lion' is not allowed; use one of: sgd, adam, adamw",
        ),
        (
            lambda c: c.update(trian={}),
            r"^the config: unknown key .trian.; allowed here: baselines, data, evaluate, ",
        ),
        (
            lambda c: c["model"].update(image_size=8),
            r"^model\.image_size = 8 is not allowed: 0 was expected; or 8 is less than",
        ),
        (
            lambda c: c["importance"].update(combine={"fishr": 1}),
            r"^importance\.combine = .*'fishr' is not allowed; use one of: weight_l1",
        ),
    ],
)
def test_a_bad_value_stops_in_one_line_naming_its_key_path(edit, message):
    experiment = minimal(
        strategies={"s": {"kind": "childtuning_d", "train": {}}}, train={}, importance={}
    )
    edit(experiment)
    with pytest.raises(ConfigError, match=message) as error:
        validate_config(experiment)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ({"kind": "importance"}, r"strategies\.s: an importance strategy needs a freeze rule"),
        (
            {"kind": "importance", "freeze": {"fraction": 0.5, "budget": 0.1}},
            r"strategies\.s: freeze: give exactly one of fraction, threshold, budget",
        ),
        (
            {"kind": "importance", "lr": {"min": 2.0, "max": 1.0}},
            r"strategies\.s: lr: need min <= max",
        ),
        ({"kind": "lp_ft", "probe_epochs": 3}, r"strategies\.s: probe_epochs = 3 leaves no"),
        ({"kind": "fastai_fine_tune", "frozen_epochs": 3}, r"strategies\.s: frozen_epochs = 3"),
        ({"kind": "freeze_bottom"}, r"strategies\.s: 'layers' is a required property"),
    ],
)
def test_rules_between_keys_stop_at_parse_time_too(strategy, message):
    experiment = minimal(strategies={"s": strategy}, train={"epochs": 3})
    with pytest.raises(ConfigError, match=message):
        validate_config(experiment)


def test_data_model_and_baselines_must_share_a_modality(tiny_bert_dir):
    with pytest.raises(ConfigError, match=r"holds image examples, but model.name = .* text"):
        validate_config(minimal(data={"source": "bundled:digits"}))
    with pytest.raises(ConfigError, match=r"baselines: tfidf_logreg cannot run on image data"):
        validate_config(
            minimal(
                data={"source": "bundled:digits"},
                model={"name": "bundled:efficientnet-lite0"},
                baselines=["tfidf_logreg"],
            )
        )
    tiny = {"model": {"name": f"path:{tiny_bert_dir}"}}
    experiment = validate_config(
        minimal(data={"source": "bundled:bbc-news", "max_length": 64}, **tiny)
    )
    assert experiment.modality.name == "text"
    assert experiment.model_fingerprint == content_fingerprint(sorted(tiny_bert_dir.iterdir()))


def test_lists_of_kinds_and_metrics_live_in_the_schema():
    from adaptune.importance import METRICS

    assert set(strategies.kinds()) == set(config.strategy_kinds())
    assert [*METRICS, "combined"] == list(config.metric_names())
    defs = config.schema()["$defs"]
    for kind in config.strategy_kinds():
        assert f"kind_{kind}" in defs, kind


def test_settings_keep_only_rules_between_keys():
    with pytest.raises(ConfigError, match=r"leaves no training examples"):
        DataSettings.from_config({"source": "bundled:bbc-news", "val_size": 0.5, "test_size": 0.5})
    with pytest.raises(ConfigError, match=r"importance.combine weighs \['fisher'\]"):
        ImportanceSettings.from_config(
            {"metrics": ["grad_norm", "combined"], "combine": {"fisher": 1}}
        )
    settings = TrainSettings.from_config({"lr": 1e-5, "epochs": 3}, {"lr": 1e-3}, "head_only")
    assert settings.lr == 1e-3 and settings.epochs == 3 and settings.optimizer == "adamw"
    assert not hasattr(settings, "seeds")
    with pytest.raises(ConfigError, match=r"^strategies\.x\.train\.lr = -1\.0"):
        TrainSettings.from_config({}, {"lr": -1.0}, "x")
    assert ModelSettings.from_config("bundled:efficientnet-lite0").image_size == 0


@pytest.mark.parametrize(
    "path",
    sorted(p for p in REPO_CONFIG.rglob("*.yaml") if p.name != "schema.yaml"),
    ids=lambda p: str(p.relative_to(REPO_CONFIG)),
)
def test_every_shipped_config_is_valid(path):
    """Each config (an experiment on its own, as ``--configfile`` gives it) passes the schema,
    Snakemake's own validation of it, and the rules between keys."""
    from snakemake.utils import validate

    experiment = yaml.safe_load(path.read_text())
    validate(dict(experiment), str(REPO_CONFIG / "schema.yaml"))
    if path.parent.name == "examples" and "hf:" in experiment["model"]["name"]:
        config.check_schema(experiment)  # the Hub model is not here to tell its modality
    else:
        validate_config(experiment)


def test_a_renamed_key_stops_naming_its_new_key():
    experiment = minimal(importance={"hessian_batches": 2})
    with pytest.raises(ConfigError) as error:
        validate_config(experiment)
    assert str(error.value) == (
        "importance.hessian_batches was renamed: use importance.hessian_examples (it counts "
        "calibration examples, not batches (default 8); renamed on 2026-11-24)"
    )


def test_every_moved_key_is_gone_from_the_schema_and_its_new_key_is_there():
    def has(path: str) -> bool:
        node = config.schema()
        for part in path.split("."):
            if part == "NAME":
                node = node["$defs"]["strategy"]
                continue
            properties = node.get("properties", {})
            if part not in properties:
                return False
            node = properties[part]
            if "$ref" in node:
                node = config.schema()["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        return True

    assert config.MOVED
    for old, (new, _) in config.MOVED.items():
        assert not has(old) and has(new), (old, new)


def test_an_exponent_without_a_dot_is_named_as_yaml_text():
    """PyYAML reads ``lr: 1e-3`` as the string '1e-3' (YAML 1.1): the message says so."""
    experiment = minimal(train=yaml.safe_load("lr: 1e-3"))
    with pytest.raises(ConfigError) as error:
        validate_config(experiment)
    assert str(error.value) == (
        "train.lr = '1e-3' is text, not a number: YAML reads an exponent without a dot as "
        "text; write 1.0e-3"
    )


@pytest.mark.parametrize("key", ["text_column", "image_column"])
def test_an_input_column_that_is_the_label_column_is_refused(key):
    experiment = minimal(data={"source": "bundled:bbc-news", key: "topic", "label_column": "topic"})
    with pytest.raises(ConfigError, match=rf"data.{key} and data.label_column are both 'topic'"):
        validate_config(experiment)
