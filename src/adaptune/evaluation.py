"""Predictions and test metrics: accuracy, macro-F1, per-class precision/recall/F1 and the
confusion matrix, in distribution and on shifted copies of the test split; the
``shift_test_split`` and ``evaluate`` stages."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from adaptune import modalities, tracking
from adaptune.data import loader, read_data_info, read_split
from adaptune.figures import plot_confusion
from adaptune.modalities import Examples, TaskModel
from adaptune.modalities.shifts import parse_shift_name
from adaptune.prefix import PrefixCache
from adaptune.runtime import autocast, select_device
from adaptune.settings import DataSettings, ModelSettings

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(
    task: TaskModel,
    frame: pd.DataFrame | Examples,
    batch_size: int,
    info: Mapping[str, Any],
    device: torch.device,
    precision: str = "auto",
    cache: PrefixCache | None = None,
    split: str = "",
) -> np.ndarray:
    """Logits (float32, examples x classes) for a prepared split, in its row order. Batches
    are made longest first (little padding); with ``cache``, the frozen prefix is not run and
    the cached inputs of ``split`` are used."""
    model = task.model
    was_training = model.training
    model.eval()
    examples = frame if isinstance(frame, Examples) else task.modality.examples(frame, info)
    logits = torch.empty(0)
    replay = cache.replaying() if cache is not None else contextlib.nullcontext()
    with replay:
        for batch in loader(examples, batch_size, by_length=True, pin_memory=device.type == "cuda"):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if cache is not None:
                cache.current = cache.features(split, batch, device)
            with autocast(device, precision):
                out = task.logits(batch).float().cpu()
            if not len(logits):
                logits = torch.empty((len(examples), out.shape[1]))
            logits[batch["index"].cpu()] = out
    model.train(was_training)
    return logits.numpy()


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """Counts of (true, predicted) class pairs: rows are true classes, columns predictions."""
    pairs = np.asarray(y_true, dtype=np.int64) * num_labels + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(pairs, minlength=num_labels**2).reshape(num_labels, num_labels)


def _per_class(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support of each class from confusion counts; a ratio with a
    zero denominator is 0 (scikit-learn's ``zero_division=0``)."""
    hits = np.diag(counts).astype(np.float64)
    predicted, support = counts.sum(axis=0), counts.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(hits), where=total > 0)
    return precision, recall, f1, support


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, num_labels: int
) -> dict[str, float]:
    """Accuracy and macro-F1 over all ``num_labels`` classes (a class never predicted counts
    with F1 0, not as missing). Computed here rather than by scikit-learn, whose metrics take
    0.8 s to import in every training and evaluation job."""
    counts = confusion_counts(y_true, y_pred, num_labels)
    _, _, f1, _ = _per_class(counts)
    return {
        "accuracy": float(np.trace(counts) / max(counts.sum(), 1)),
        "macro_f1": float(f1.mean()),
    }


def per_class_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, label_names: Sequence[str]
) -> pd.DataFrame:
    precision, recall, f1, support = _per_class(confusion_counts(y_true, y_pred, len(label_names)))
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
    return pd.DataFrame(
        confusion_counts(y_true, y_pred, len(label_names)),
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
    log.info(
        "%s: test accuracy %.4f, macro-F1 %.4f, loss %.4f on %d examples; weakest class %s "
        "(F1 %.4f); written to %s",
        title,
        metrics["test_accuracy"],
        metrics["test_macro_f1"],
        metrics["test_loss"],
        metrics["test_examples"],
        per_class.loc[per_class["f1"].idxmin(), "label"],
        per_class["f1"].min(),
        outputs["metrics"],
    )
    per_class.to_csv(outputs["per_class"], index=False)
    matrix.to_csv(outputs["confusion"])
    plot_confusion(matrix, outputs["confusion_png"], title)


def log_evaluation(run: tracking.Run, metrics: dict, outputs: dict[str, str]) -> None:
    """Log test metrics, per-class F1 and the files of :func:`save_evaluation` to the active
    MLflow run."""
    run.log_metrics({k: metrics[k] for k in ("test_accuracy", "test_macro_f1", "test_loss")})
    if metrics.get("shifts"):
        run.log_metrics({k: metrics[k] for k in ("shift_macro_f1", "shift_accuracy", "shift_drop")})
        run.log_metrics(
            {
                f"shift_{tracking.metric_name(name)}_{key}": value
                for name, scores in metrics["shifts"].items()
                for key, value in scores.items()
            }
        )
    run.log_metrics(
        {
            f"test_f1_{tracking.metric_name(label)}": row["f1"]
            for label, row in metrics["per_class"].items()
        }
    )
    for key in ("metrics", "per_class", "confusion", "confusion_png"):
        run.log_artifact(outputs[key], "evaluation")


def run_shift_split(
    test_path: str,
    data_info_path: str,
    name: str,
    seed: int,
    data: DataSettings,
    model: ModelSettings,
    output: str,
) -> pd.DataFrame:
    """The ``shift_test_split`` stage: the test split under shift ``name`` (``typos-s3``),
    prepared as the test split was (:meth:`Modality.shift`)."""
    info = read_data_info(data_info_path)
    test = read_split(test_path)
    kind, severity = parse_shift_name(name)
    modality = modalities.get(info)
    shifted = modality.shift(test, kind, severity, seed, info, data, model)
    shifted.to_parquet(output, index=False)
    log.info(
        "%s (%s, severity %d, seed %d): %d test examples -> %s",
        name,
        modality.shifts[kind].description,
        severity,
        seed,
        len(shifted),
        output,
    )
    if "text" in shifted.columns and len(shifted):
        log.info("first example, shifted: %r", str(shifted["text"].iloc[0])[:300])
    return shifted


def shift_metrics(
    scores_of: Callable[[pd.DataFrame], np.ndarray],
    shifted: Mapping[str, str],
    num_labels: int,
    in_distribution: float,
) -> dict[str, Any]:
    """Macro-F1 and accuracy on each shifted test split (``shifted``: name -> path) of the
    model whose class scores for a split ``scores_of`` returns, their means
    (``shift_macro_f1``, ``shift_accuracy``) and the drop from the in-distribution macro-F1
    (``shift_drop``); nothing when no shift is configured."""
    if not shifted:
        return {}
    scores = {}
    for name, path in shifted.items():
        split = read_split(path)
        scores[name] = classification_metrics(
            split["label_id"].to_numpy(), scores_of(split).argmax(axis=1), num_labels
        )
        log.info(
            "shift %s: macro-F1 %.4f, accuracy %.4f",
            name,
            scores[name]["macro_f1"],
            scores[name]["accuracy"],
        )
    mean_f1 = float(np.mean([s["macro_f1"] for s in scores.values()]))
    return {
        "shift_macro_f1": mean_f1,
        "shift_accuracy": float(np.mean([s["accuracy"] for s in scores.values()])),
        "shift_drop": in_distribution - mean_f1,
        "shifts": scores,
    }


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
    shifted: Mapping[str, str] | None = None,
) -> dict:
    """The ``evaluate`` stage: test metrics of the fine-tuned model, and under each shift of
    ``shifted`` (name -> the shifted test split), logged into the same MLflow run as its
    training."""
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
    metrics.update(
        shift_metrics(
            lambda split: predict(task, split, batch_size, info, torch_device, precision),
            shifted or {},
            len(info["labels"]),
            metrics["test_macro_f1"],
        )
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
