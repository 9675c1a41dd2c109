"""The two methods comparisons (config/methods.yaml, config/methods-vision.yaml) end to end, each
with its own strategies, sweeps, shifts and report exactly as configured, on a tiny model and one
shot count and seed: every method trains, is evaluated in distribution and under shift with its
drift from the pretrained model, and lands in the leaderboard with its costs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from .conftest import PARALLEL, REPO, Workflow

# A second end-to-end run of what the default suite covers: opt-in (pytest -m slow).
pytestmark = [pytest.mark.workflow, pytest.mark.slow]

METHODS = {
    "full",
    "lora",
    "importance_budget",
    "lisa",
    "lisa_importance",
    "badam",
    "sparse_mask",
    "hft",
    "progressive_freeze",
}


def shrunk(config_file: str, model: str, experiment: str, **data: object) -> dict:
    """The config as shipped, on a tiny model, 4 shots, one seed and 2 epochs."""
    config = yaml.safe_load((REPO / "config" / config_file).read_text())
    config["experiment"] = experiment
    config["model"] = {**config["model"], "name": model}
    config["data"].update(shots=[4], **data)
    config["importance"].update(batches=1, batch_size=8)
    config["train"].update(epochs=2, batch_size=8, seeds=[0])
    config["mlflow"] = {"tracking_uri": "sqlite:///results/mlflow.db"}
    assert set(config["strategies"]) == METHODS
    return config


def check_board(results: Path, baseline: str) -> pd.DataFrame:
    board = pd.read_csv(results / "report/leaderboard.csv")
    assert set(board["strategy"]) == METHODS | {baseline}
    tuned = board[board["strategy"] != baseline].set_index("strategy")
    assert tuned["weight_change"].gt(0).all() and tuned["weight_change"].lt(1).all()
    assert tuned["cka_drift"].between(0, 1).all()
    assert tuned["shift_macro_f1"].between(0, 1).all()
    assert tuned["optimizer_state_bytes"].gt(0).all() and tuned["peak_memory_bytes"].gt(0).all()
    assert board.loc[board["strategy"] == baseline, "weight_change"].isna().all()
    # the switching kinds hold less optimizer state at once than full fine-tuning
    full = tuned.loc["full", "optimizer_state_bytes"]
    assert tuned.loc["badam", "optimizer_state_bytes"] < 0.5 * full
    assert tuned.loc["sparse_mask", "optimizer_state_bytes"] == full  # dense, masked
    assert tuned.loc["sparse_mask", "trainable_fraction"] < 0.1
    assert "| 1 - CKA |" in (results / "report/leaderboard.md").read_text()
    for name in ("lisa", "lisa_importance", "badam"):
        plan = json.loads((results / f"plans/k4/{name}.json").read_text())
        assert plan["schedule"]["periods"]
        summary = json.loads((results / f"runs/{name}/k4/seed0/train_summary.json").read_text())
        used = summary["strategy_record"]["periods"]
        assert [p["blocks"] for p in used] == plan["schedule"]["periods"][: len(used)]
    summary = json.loads(
        (results / "runs/progressive_freeze/k4/seed0/train_summary.json").read_text()
    )
    assert "frozen_after_epoch" in summary["strategy_record"]
    return board


def test_the_text_methods_comparison_runs_end_to_end(tmp_path_factory, tiny_bert_dir):
    config = shrunk("methods.yaml", f"path:{tiny_bert_dir}", "methods-text", max_length=32)
    # the tiny BERT has 2 blocks: LISA draws 1 of them (6 in MiniLM)
    for name in ("lisa", "lisa_importance"):
        config["strategies"][name]["layers"] = 1
    flow = Workflow(tmp_path_factory.mktemp("methods-text"), config)
    flow.run(*PARALLEL)
    board = check_board(flow.results("methods-text"), "tfidf_logreg")
    assert set(board.loc[board["strategy"] == "full", "setting"]) <= {"lr=5e-05", "lr=0.0001"}


@pytest.fixture(scope="module")
def tiny_efficientnet_dir(tmp_path_factory) -> Path:
    """timm's ``test_efficientnet`` (5 blocks of depthwise-separable and inverted-residual
    convolutions, BatchNorm; ``conv_pw``/``conv_pwl`` modules, LoRA's targets in the config),
    randomly initialised and saved as adaptune saves an image model, at 32 px."""
    import timm

    from adaptune.modalities.image.models import save_classifier
    from adaptune.modalities.image.transforms import ImageTransform

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False)
    transform = ImageTransform((32, 32), 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    directory = tmp_path_factory.mktemp("tiny-efficientnet")
    labels = [str(i) for i in range(model.num_classes)]
    save_classifier(model, directory, "timm:test_efficientnet", labels, transform.to_dict())
    return directory


def test_the_image_methods_comparison_runs_end_to_end(tmp_path_factory, tiny_efficientnet_dir):
    config = shrunk("methods-vision.yaml", f"path:{tiny_efficientnet_dir}", "methods-images")
    config["model"]["image_size"] = 32
    flow = Workflow(tmp_path_factory.mktemp("methods-images"), config)
    flow.run(*PARALLEL)
    results = flow.results("methods-images")
    check_board(results, "pixel_logreg")
    metrics = json.loads((results / "runs/lora/k4/seed0/metrics.json").read_text())
    assert sorted(metrics["shifts"]) == [
        "brightness-s3",
        "contrast-s3",
        "gaussian_blur-s3",
        "gaussian_noise-s3",
    ]
    assert not math.isnan(metrics["cka_drift"])
