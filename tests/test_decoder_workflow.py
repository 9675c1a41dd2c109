"""The Snakefile end to end on a tiny decoder LM (GPT-2's family: no pad token shipped, learned
absolute positions, so a text's logits depend on the side it is padded on) and real BBC News
articles: full, head_only and an importance budget, a shifted test split; then the saved run
folders as a user takes them: ``transformers.pipeline``, ``adaptune predict`` and the MLflow
model, each reproducing the run's own test accuracy. One workflow for the module: every family's
padding rule, layers, cache and strategies are checked in process (tests/test_decoders.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from adaptune.data_info import DataInfo

from .conftest import PARALLEL, Workflow, tiny_config
from .decoders import save_tiny_decoder

pytestmark = [pytest.mark.workflow, pytest.mark.usefixtures("one_thread")]

FAMILY = "gpt2"
STRATEGIES = {
    "full": {"kind": "full"},
    "head_only": {"kind": "head_only", "train": {"lr": 1e-3}},
    "budget": {"kind": "importance", "freeze": {"budget": 0.3}},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, decoder_tokenizer) -> Path:
    return save_tiny_decoder(tmp_path_factory.mktemp(f"tiny-{FAMILY}"), FAMILY, decoder_tokenizer)


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, model_dir) -> Workflow:
    config = tiny_config(model_dir, experiment="decoder")
    config.update(strategies=STRATEGIES, baselines=[], evaluate={"shifts": {"typos": [3]}})
    flow = Workflow(tmp_path_factory.mktemp("decoder-workflow"), config)
    flow.run(*PARALLEL)
    return flow


def reported(run) -> float:
    return json.loads((run / "metrics.json").read_text())["test_accuracy"]


def test_every_stage_runs_and_the_budget_holds(workflow, model_dir):
    results = workflow.results("decoder")
    board = pd.read_csv(results / "report/leaderboard.csv").set_index("strategy")
    assert sorted(board.index) == sorted(STRATEGIES)
    assert board["test_accuracy"].between(0, 1).all() and (board["test_examples"] == 426).all()
    assert board.loc["full", "trainable_fraction"] == 1.0
    assert 0 < board.loc["budget", "trainable_fraction"] <= 0.3
    info = DataInfo.read(results / "data/data.json")
    width = json.loads((model_dir / "config.json").read_text())["n_embd"]
    assert board.loc["head_only", "trainable_params"] == width * info.num_labels  # no bias
    for strategy in STRATEGIES:
        model = results / f"runs/{strategy}/k4/seed0/model"
        config = json.loads((model / "config.json").read_text())
        tokenizer = json.loads((model / "tokenizer_config.json").read_text())
        assert config["pad_token_id"] == info.encoding["pad_token_id"]
        assert tokenizer["padding_side"] == "right" and tokenizer["model_max_length"] == 32


def test_drift_is_none_for_a_frozen_body_and_some_for_full_fine_tuning(workflow):
    """``evaluate`` reloads the pretrained decoder (the same pad row) and compares the bodies:
    head_only leaves the body's weights and its features as they were."""
    results = workflow.results("decoder")
    metrics = {
        strategy: json.loads((results / f"runs/{strategy}/k4/seed0/metrics.json").read_text())
        for strategy in STRATEGIES
    }
    assert metrics["head_only"]["weight_change"] == 0.0
    assert metrics["head_only"]["cka_drift"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["full"]["weight_change"] > 0 and metrics["full"]["cka_drift"] > 1e-6


def test_the_saved_model_predicts_with_transformers_pipeline_as_evaluate_scored_it(workflow):
    """Each run folder loads in ``pipeline("text-classification")`` with its own tokenizer and
    pad token, and gives the run's test accuracy: one text at a time there, in padded batches
    in ``evaluate``."""
    from transformers import pipeline

    results = workflow.results("decoder")
    test = pd.read_parquet(results / "data/test.parquet")
    for strategy in STRATEGIES:
        run = results / f"runs/{strategy}/k4/seed0"
        classify = pipeline("text-classification", model=str(run / "model"), device="cpu")
        predicted = [p["label"] for p in classify(test["text"].tolist(), truncation=True)]
        accuracy = (pd.Series(predicted) == test["label"].to_numpy()).mean()
        assert accuracy == pytest.approx(reported(run), abs=1e-9), strategy


def test_adaptune_predict_and_the_mlflow_model_reproduce_the_test_accuracy(workflow, tmp_path):
    import mlflow

    from adaptune.cli import main

    results = workflow.results("decoder")
    test = pd.read_parquet(results / "data/test.parquet")
    run = results / "runs/budget/k4/seed0"
    new = tmp_path / "new.csv"
    test[["text"]].assign(id=test["example_id"]).to_csv(new, index=False)
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(run / "model"), str(new), "-o", str(out)]) == 0
    predictions = pd.read_csv(out)
    accuracy = (predictions["predicted"] == test["label"].to_numpy()).mean()
    assert accuracy == pytest.approx(reported(run), abs=1e-9)

    from adaptune.tracking import logged_model_uri

    uri = f"sqlite:///{workflow.root / 'results/mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        run_id = (run / "mlflow_run_id").read_text().strip()
        logged = mlflow.pyfunc.load_model(logged_model_uri(uri, run_id))
        predicted = logged.predict(test["text"].tolist())
    finally:
        mlflow.set_tracking_uri(previous)
    accuracy = (predicted["label"].to_numpy() == test["label"].to_numpy()).mean()
    assert accuracy == pytest.approx(reported(run), abs=1e-9)


def test_the_shifted_test_split_is_tokenised_as_the_test_split(workflow, model_dir):
    from adaptune.modalities.text import models, tokenize

    results = workflow.results("decoder")
    shifted = pd.read_parquet(results / "data/shifts/typos-s3.parquet")
    test = pd.read_parquet(results / "data/test.parquet")
    assert (shifted["text"] != test["text"]).mean() > 0.9
    tokenizer = models.load_tokenizer(f"path:{model_dir}")
    again = tokenize(shifted[["text"]], tokenizer, 32)["input_ids"]
    assert all(a.tolist() == b.tolist() for a, b in zip(again, shifted["input_ids"], strict=True))
    metrics = json.loads((results / "runs/full/k4/seed0/metrics.json").read_text())
    assert 0 <= metrics["shifts"]["typos-s3"]["accuracy"] <= 1
