"""The comparison features end to end on the tiny BERT and real BBC News articles: a swept
learning rate chosen per seed on validation, and every model scored on shifted test splits."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from .conftest import PARALLEL, Workflow, tiny_config

# A second end-to-end run of what the default suite covers: opt-in (pytest -m slow).
pytestmark = [pytest.mark.workflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, tiny_bert_dir) -> Workflow:
    config = tiny_config(tiny_bert_dir, experiment="cmp")
    config["strategies"] = {
        "full": {"kind": "full"},
        "head_only": {"kind": "head_only", "sweep": {"train.lr": [1e-3, 3e-2]}},
    }
    config["train"].update(epochs=2, seeds=[0, 1])
    config["evaluate"] = {"shifts": {"word_dropout": [2, 5], "typos": [3]}}
    flow = Workflow(tmp_path_factory.mktemp("comparison"), config)
    flow.run(*PARALLEL)
    return flow


def test_each_swept_value_ran_and_the_leaderboard_keeps_the_one_best_on_validation(workflow):
    report = workflow.results("cmp") / "report"
    every = pd.read_csv(report / "sweep.csv")
    swept = every[every["strategy"].str.startswith("head_only@")]
    assert sorted(set(swept["strategy"])) == ["head_only@lr=0.001", "head_only@lr=0.03"]
    assert len(swept) == 4  # two values x two seeds, each its own run
    board = pd.read_csv(report / "leaderboard.csv").fillna({"setting": ""})
    head = board[board["strategy"] == "head_only"].set_index("seed")
    assert sorted(head.index) == [0, 1]
    for seed, row in head.iterrows():
        runs = swept[swept["seed"] == seed].sort_values(
            ["best_val_macro_f1", "strategy"], ascending=[False, True]
        )
        assert row["setting"] == runs.iloc[0]["setting"]
        assert row["test_macro_f1"] == runs.iloc[0]["test_macro_f1"]
    assert "chosen" in (report / "leaderboard.md").read_text()


def test_every_model_is_scored_on_each_shifted_test_split(workflow):
    results = workflow.results("cmp")
    names = ["typos-s3", "word_dropout-s2", "word_dropout-s5"]
    for name in names:
        shifted = pd.read_parquet(results / "data/shifts" / f"{name}.parquet")
        test = pd.read_parquet(results / "data/test.parquet")
        assert shifted["example_id"].tolist() == test["example_id"].tolist()
        assert (shifted["text"] != test["text"]).mean() > 0.5
    metrics = json.loads((results / "runs/full/k4/seed0/metrics.json").read_text())
    assert sorted(metrics["shifts"]) == names
    mean = sum(s["macro_f1"] for s in metrics["shifts"].values()) / 3
    assert metrics["shift_macro_f1"] == pytest.approx(mean)
    assert metrics["shift_drop"] == pytest.approx(metrics["test_macro_f1"] - mean)
    # The baseline is scored on the same shifted splits.
    board = pd.read_csv(results / "report/leaderboard.csv")
    assert board["shift_macro_f1"].between(0, 1).all()
    baseline = json.loads((results / "baselines/tfidf_logreg/k4/metrics.json").read_text())
    assert sorted(baseline["shifts"]) == names
    assert (results / "report/generalisation.png").stat().st_size > 10_000


def test_the_shifts_are_made_once_and_a_new_severity_adds_only_its_jobs(workflow):
    config = workflow.config
    config["evaluate"]["shifts"]["typos"] = [3, 5]
    workflow.write_config(config)
    try:
        jobs = workflow.dry_run_jobs()
    finally:
        workflow.write_config({**config, "evaluate": {"shifts": {
            "word_dropout": [2, 5], "typos": [3]}}})  # fmt: skip
    assert jobs["shift_test_split"] == 1
    assert "finetune" not in jobs and "prepare_data" not in jobs
    assert jobs["evaluate"] == 6  # every model is scored on the new split too
    assert jobs["fit_baseline"] == 1  # and the baseline
    assert workflow.dry_run_jobs() == {}
