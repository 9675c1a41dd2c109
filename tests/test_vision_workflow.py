"""The same Snakefile and config keys on images: a tiny CNN (timm's test_resnet, saved as a
``path:`` model) on 4 real digits per class, every stage and a freeze plan, the pixel baseline,
the leaderboard and MLflow."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from .conftest import PARALLEL, Workflow

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, tiny_vision_dir) -> Workflow:
    config = {
        "experiment": "tiny-digits",
        "data": {"source": "bundled:digits", "shots": [4]},
        "model": {"name": f"path:{tiny_vision_dir}", "image_size": 24},
        "importance": {"batches": 1, "batch_size": 8, "hutchinson_probes": 2},
        "strategies": {
            "full": {"kind": "full"},
            "head_only": {"kind": "head_only", "train": {"lr": 1e-2}},
            "importance_budget": {
                "kind": "importance",
                "metric": "combined",
                "freeze": {"budget": 0.3},
            },
            "importance_lr": {
                "kind": "importance",
                "metric": "fisher",
                "granularity": "tensor",
                "lr": {"mapping": "rank", "min": 0.1, "max": 2.0},
            },
        },
        "baselines": ["pixel_logreg"],
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "lr": 3e-3,
            "augment": ["random_resized_crop", "horizontal_flip"],
            "seeds": [0],
        },
        "mlflow": {"tracking_uri": "sqlite:///results/mlflow.db"},
    }
    flow = Workflow(tmp_path_factory.mktemp("vision-workflow"), config)
    flow.run(*PARALLEL)
    return flow


def test_every_image_stage_ran_and_the_leaderboard_compares_them(workflow):
    results = workflow.results("tiny-digits")
    info = json.loads((results / "data/data.json").read_text())
    assert info["modality"] == "image" and info["num_labels"] == 10
    assert info["transform"]["input_size"] == [24, 24]
    board = pd.read_csv(results / "report/leaderboard.csv")
    assert sorted(board["strategy"]) == [
        "full",
        "head_only",
        "importance_budget",
        "importance_lr",
        "pixel_logreg",
    ]
    assert (board["test_examples"] == 360).all()  # 20% of the 1,797 digits
    assert board["test_macro_f1"].between(0, 1).all()
    assert board.set_index("strategy").loc["pixel_logreg", "test_macro_f1"] > 0.5
    fractions = board.set_index("strategy")["trainable_fraction"]
    assert fractions["full"] == 1.0 and fractions["head_only"] < 0.01
    assert 0 < fractions["importance_budget"] <= 0.3
    plan = json.loads((results / "plans/k4/importance_budget.json").read_text())
    frozen = {t["name"]: t["frozen"] for t in plan["tensors"]}
    assert not frozen["fc.weight"] and any(frozen.values())
    layers = pd.read_parquet(results / "importance/k4/random/layers.parquet")
    assert {"layer1", "layer4", "head"} <= set(layers["layer"])
    saved = json.loads((results / "runs/full/k4/seed0/model/adaptune_model.json").read_text())
    assert saved["name"] == "timm:test_resnet" and saved["transform"] == info["transform"]


def test_image_runs_are_tracked_like_text_runs(workflow):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workflow.root / 'results/mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-digits")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'finetune'")
    assert len(runs) == 4
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["modality"] == "image"
        assert run.data.params["input_size"] == "[24, 24]"
        assert {"test_macro_f1", "val_macro_f1", "train_loss"} <= set(run.data.metrics)
    assert workflow.dry_run_jobs() == {}  # and a second run has nothing to do
