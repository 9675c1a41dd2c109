"""Once, the real bundled all-MiniLM-L6-v2 through the whole workflow, on 4 real BBC News
articles per class (short inputs, one epoch: seconds, not minutes)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from adaptune.modalities.text.models import resolve_model

from .conftest import Workflow

# The real 22.7M-parameter MiniLM through every stage (the default suite runs the workflow on a
# tiny BERT; the README's quick start runs this model): opt-in (pytest -m slow).
pytestmark = [pytest.mark.workflow, pytest.mark.slow]


def test_bundled_minilm_end_to_end(tmp_path):
    config = {
        "experiment": "minilm",
        "data": {"source": "bundled:bbc-news", "shots": [4], "max_length": 48},
        "model": {"name": "bundled:all-MiniLM-L6-v2"},
        "importance": {"batches": 1, "batch_size": 10},
        "strategies": {
            "full": {"kind": "full"},
            "head_only": {"kind": "head_only", "train": {"lr": 1e-2}},
        },
        "train": {"epochs": 2, "batch_size": 10, "lr": 1e-4, "eval_batch_size": 128},
    }
    flow = Workflow(tmp_path, config)
    flow.run("--cores", "2")
    results = flow.results("minilm")

    scores = pd.read_parquet(results / "importance/k4/random/scores.parquet")
    # 103 pretrained tensors (22,713,216 weights) and the new 5-class head on 384 features
    assert len(scores) == 105 and scores["numel"].sum() == 22_713_216 + 384 * 5 + 5
    layers = scores.drop_duplicates("layer_index").sort_values("layer_index")["layer"]
    assert list(layers) == ["input", *(f"block0{i}" for i in range(1, 7)), "output", "head"]

    board = pd.read_csv(results / "report/leaderboard.csv").set_index("strategy")
    assert board.loc["head_only", "trainable_params"] == 384 * 5 + 5
    assert (board["test_examples"] == 426).all()  # 20% of the 2,127 distinct articles

    # The saved fine-tuned body differs from the pretrained one only where the plan trains.
    pretrained = load_file(f"{resolve_model('bundled:all-MiniLM-L6-v2')}/model.safetensors")
    for strategy, body_changes in (("full", True), ("head_only", False)):
        tuned = load_file(results / f"runs/{strategy}/k4/seed0/model/model.safetensors")
        weight = "bert.encoder.layer.3.attention.self.query.weight"
        key = weight if weight in pretrained else weight.removeprefix("bert.")
        assert torch.equal(tuned[weight], pretrained[key]) != body_changes, strategy
    metrics = json.loads((results / "runs/full/k4/seed0/metrics.json").read_text())
    assert set(metrics["per_class"]) == {"business", "entertainment", "politics", "sports", "tech"}
