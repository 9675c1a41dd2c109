"""Classical baselines on the same few-shot split, so a leaderboard shows what the pretrained
model buys: each modality names its own (TF-IDF + logistic regression for text, logistic
regression on pixels for images; see :class:`adaptune.modalities.Baseline`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from adaptune import modalities, tracking
from adaptune.data import read_split
from adaptune.data_info import DataInfo
from adaptune.errors import ConfigError
from adaptune.evaluation import (
    evaluate_predictions,
    log_evaluation,
    save_evaluation,
    shift_metrics,
)


def run_baseline(
    name: str,
    shots: str,
    train_path: str,
    test_path: str,
    data_info_path: str,
    experiment_path: str,
    outputs: dict[str, str],
    shifted: Mapping[str, str] | None = None,
) -> dict:
    """Fit baseline ``name`` on the few-shot split, evaluate it on the test split and on each
    shifted copy of it (``shifted``: name -> path) like the fine-tuned models, and record it as
    an MLflow run."""
    info = DataInfo.read(data_info_path)
    modality = modalities.get(info.modality)
    if name not in modality.baselines:
        raise ConfigError(
            f"baselines: {name} cannot run on {modality.name} data; use "
            f"{', '.join(modality.baselines) or 'none'}"
        )
    baseline = modality.baselines[name]
    train, test = read_split(train_path), read_split(test_path)
    start = time.perf_counter()
    model = baseline.make(0).fit(baseline.features(train), train["label_id"])
    train_seconds = time.perf_counter() - start

    def scores_of(split: pd.DataFrame) -> np.ndarray:
        """Log-probabilities over every class (one the few-shot split lacks: log 1e-12)."""
        probabilities = np.zeros((len(split), info.num_labels))
        probabilities[:, model.classes_] = model.predict_proba(baseline.features(split))
        return np.log(np.clip(probabilities, 1e-12, 1)).astype(np.float32)

    metrics, per_class, matrix = evaluate_predictions(
        test["label_id"].to_numpy(), scores_of(test), info.labels
    )
    metrics.update(
        shift_metrics(scores_of, shifted or {}, info.num_labels, metrics["test_macro_f1"])
    )
    classifier = model[-1]
    experiment = tracking.read_experiment(experiment_path)
    source = info.source or "the data"
    description = f"{name} on {shots} examples per class of {source}: no fine-tuning"
    tags = {
        "strategy": name,
        "shots": shots,
        "seed": "0",
        "stage": "baseline",
        **tracking.source_tags("fit_baseline", description),
    }
    key = f"{name}/k{shots}"
    params = {"strategy": name, "shots": shots, **baseline.describe(model)}
    with tracking.start_run(experiment, key, f"{name}-k{shots}", tags) as run:
        metrics = {
            "strategy": name,
            "shots": shots,
            "seed": 0,
            "trainable_params": int(classifier.coef_.size + classifier.intercept_.size),
            "trainable_fraction": None,  # not a fine-tuned pretrained model
            "train_seconds": train_seconds,
            "best_epoch": None,
            "best_val_macro_f1": None,
            **metrics,
            # what its MLflow run is made of, so that it can be logged again (adaptune.records)
            "mlflow": {"params": params, "tags": tags},
        }
        Path(outputs["run_id"]).write_text(run.run_id + "\n")
        run.log_params(params)
        title = f"{name}, {shots} shots: macro-F1 {metrics['test_macro_f1']:.3f}"
        save_evaluation(metrics, per_class, matrix, title, outputs)
        log_evaluation(run, metrics, outputs, "baseline")
    return metrics
