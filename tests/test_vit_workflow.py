"""A vision transformer through the whole workflow from a config: timm's ``test_vit`` given as a
user gives weights (``model.name: timm:test_vit``, ``model.weights: FILE``) at 32 pixels, on 4
real digits per class, with the default config's strategies (full, head_only and the Fisher
importance plan), to the leaderboard."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from .conftest import PARALLEL, REPO, Workflow

# A second image workflow: the image stages run end to end in test_vision_workflow (a CNN), and
# every ViT part (layers, head, cache, each strategy kind) in process in test_vit.
pytestmark = [pytest.mark.workflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, tiny_vit_weights) -> Workflow:
    defaults = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config = {
        "experiment": "tiny-vit-digits",
        "data": {"source": "bundled:digits", "shots": [4]},
        "model": {"name": "timm:test_vit", "weights": str(tiny_vit_weights), "image_size": 32},
        "importance": {"batches": 1, "batch_size": 8, "hutchinson_probes": 2},
        "strategies": defaults["strategies"],
        "baselines": ["pixel_logreg"],
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "seeds": [0]},
        "mlflow": {"tracking_uri": "sqlite:///results/mlflow.db"},
    }
    flow = Workflow(tmp_path_factory.mktemp("vit-workflow"), config)
    flow.run(*PARALLEL)
    return flow


def test_a_vit_runs_the_default_strategies_to_the_leaderboard(workflow):
    results = workflow.results("tiny-vit-digits")
    info = json.loads((results / "data/data.json").read_text())
    assert info["transform"]["input_size"] == [32, 32] and info["num_labels"] == 10
    board = pd.read_csv(results / "report/leaderboard.csv").set_index("strategy")
    assert sorted(board.index) == ["full", "head_only", "importance_lr", "pixel_logreg"]
    assert (board["test_examples"] == 360).all()
    assert board["test_macro_f1"].between(0, 1).all()
    assert board.loc["full", "trainable_fraction"] == 1.0
    # test_vit's 371,240 parameters, less its 1000-class head (990 x 65 fewer) and the position
    # embeddings of 100 - 4 patches (96 x 64 fewer); the new head: 10 x 64 + 10.
    total = 371_240 - 990 * 65 - 96 * 64
    assert board.loc["full", "trainable_params"] == total
    assert board.loc["head_only", "trainable_fraction"] == pytest.approx(650 / total)
    layers = pd.read_parquet(results / "importance/k4/random/layers.parquet")
    assert list(layers["layer"]) == [
        "input",
        *[f"block{i:02d}" for i in range(1, 7)],
        "output",
        "head",
    ]
    plan = json.loads((results / "plans/k4/importance_lr.json").read_text())
    multipliers = {t["name"]: t["lr_multiplier"] for t in plan["tensors"]}
    assert min(multipliers.values()) == pytest.approx(0.1)
    assert max(multipliers.values()) == pytest.approx(2.0)
    assert not any(t["frozen"] for t in plan["tensors"])


def test_the_cache_served_head_only_and_the_saved_vit_keeps_its_32_pixel_embeddings(workflow):
    from safetensors import safe_open

    results = workflow.results("tiny-vit-digits")
    log = (results / "logs/finetune/head_only/k4/seed0.log").read_text()
    assert "the inputs of head cached" in log
    model = results / "runs/full/k4/seed0/model"
    saved = json.loads((model / "adaptune_model.json").read_text())
    assert saved["name"] == "timm:test_vit" and saved["transform"]["input_size"] == [32, 32]
    with safe_open(str(model / "model.safetensors"), "pt") as tensors:
        assert tensors.get_slice("pos_embed").get_shape() == [1, 1 + 2 * 2, 64]
        assert tensors.get_slice("head.weight").get_shape() == [10, 64]
    metrics = json.loads((results / "runs/full/k4/seed0/metrics.json").read_text())
    assert metrics["test_examples"] == 360
