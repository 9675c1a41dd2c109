"""Predictions and test metrics: accuracy, macro-F1, per-class precision/recall/F1 and the
confusion matrix; the ``evaluate`` stage."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from adaptune import modalities, tracking
from adaptune.data import batches, read_data_info, read_split
from adaptune.figures import plot_confusion
from adaptune.modalities import TaskModel
from adaptune.runtime import autocast, select_device


@torch.no_grad()
def predict(
    task: TaskModel,
    frame: pd.DataFrame,
    batch_size: int,
    info: Mapping[str, Any],
    device: torch.device,
    precision: str = "auto",
) -> np.ndarray:
    """Logits (float32, examples x classes) for a prepared split, in its row order."""
    model = task.model
    was_training = model.training
    model.eval()
    outputs = []
    for batch in batches(frame, batch_size, info, modality=task.modality):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, precision):
            outputs.append(task.logits(batch).float().cpu())
    model.train(was_training)
    return torch.cat(outputs).numpy()


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, num_labels: int
) -> dict[str, float]:
    """Accuracy and macro-F1 over all ``num_labels`` classes (a class never predicted counts
    with F1 0, not as missing)."""
    labels = list(range(num_labels))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
    }


def per_class_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, label_names: Sequence[str]
) -> pd.DataFrame:
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(label_names))), zero_division=0
    )
    return pd.DataFrame(
        {
            "label": label_names,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
        }
    )


def confusion(y_true: np.ndarray, y_pred: np.ndarray, label_names: Sequence[str]) -> pd.DataFrame:
    """Confusion counts: rows are true classes, columns predicted classes."""
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(label_names))))
    return pd.DataFrame(
        matrix,
        index=pd.Index(label_names, name="true"),
        columns=pd.Index(label_names, name="predicted"),
    )


def evaluate_predictions(
    y_true: np.ndarray, logits: np.ndarray, label_names: Sequence[str]
) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Test metrics (``test_accuracy``, ``test_macro_f1``, ``test_loss`` and per class), the
    per-class table and the confusion matrix."""
    y_pred = logits.argmax(axis=1)
    overall = classification_metrics(y_true, y_pred, len(label_names))
    per_class = per_class_metrics(y_true, y_pred, label_names)
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.tensor(y_true))
    metrics = {
        "test_accuracy": overall["accuracy"],
        "test_macro_f1": overall["macro_f1"],
        "test_loss": float(loss),
        "test_examples": len(y_true),
        "per_class": per_class.set_index("label").to_dict(orient="index"),
    }
    return metrics, per_class, confusion(y_true, y_pred, label_names)


def save_evaluation(
    metrics: dict,
    per_class: pd.DataFrame,
    matrix: pd.DataFrame,
    title: str,
    outputs: dict[str, str],
) -> None:
    """Write a run's test results: ``metrics`` (JSON), ``per_class`` and ``confusion`` (CSV)
    and ``confusion_png``."""
    Path(outputs["metrics"]).write_text(json.dumps(metrics, indent=2) + "\n")
    per_class.to_csv(outputs["per_class"], index=False)
    matrix.to_csv(outputs["confusion"])
    plot_confusion(matrix, outputs["confusion_png"], title)


def log_evaluation(run: tracking.Run, metrics: dict, outputs: dict[str, str]) -> None:
    """Log test metrics, per-class F1 and the files of :func:`save_evaluation` to the active
    MLflow run."""
    run.log_metrics({k: metrics[k] for k in ("test_accuracy", "test_macro_f1", "test_loss")})
    run.log_metrics(
        {
            f"test_f1_{tracking.metric_name(label)}": row["f1"]
            for label, row in metrics["per_class"].items()
        }
    )
    for key in ("metrics", "per_class", "confusion", "confusion_png"):
        run.log_artifact(outputs[key], "evaluation")


def run_evaluate(
    model_dir: str,
    test_path: str,
    data_info_path: str,
    summary_path: str,
    run_id_path: str,
    experiment_path: str,
    device: str,
    batch_size: int,
    precision: str,
    outputs: dict[str, str],
) -> dict:
    """The ``evaluate`` stage: test metrics of the fine-tuned model, logged into the same MLflow
    run as its training."""
    info = read_data_info(data_info_path)
    summary = json.loads(Path(summary_path).read_text())
    test = read_split(test_path)
    torch_device = select_device(device)
    task = modalities.get(info).load_finetuned(model_dir)
    task.model.to(torch_device)
    logits = predict(task, test, batch_size, info, torch_device, precision)
    metrics, per_class, matrix = evaluate_predictions(
        test["label_id"].to_numpy(), logits, info["labels"]
    )
    metrics = {**summary, **metrics}
    title = (
        f"{summary['strategy']}, {summary['shots']} shots, seed {summary['seed']}: "
        f"macro-F1 {metrics['test_macro_f1']:.3f}"
    )
    save_evaluation(metrics, per_class, matrix, title, outputs)
    experiment = tracking.read_experiment(experiment_path)
    run_id = Path(run_id_path).read_text().strip()
    log_evaluation(tracking.existing_run(experiment, run_id), metrics, outputs)
    return metrics
