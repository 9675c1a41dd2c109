"""Predictions and test metrics: accuracy, macro-F1, per-class precision/recall/F1 and the
confusion matrix, in distribution and on shifted copies of the test split; how far fine-tuning
moved the model from its pretrained weights (relative weight change and 1 - linear CKA of the
body's features); the ``shift_test_split``, ``pretrained_features`` and ``evaluate`` stages."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from adaptune import modalities, tracking
from adaptune.data import read_split
from adaptune.data_info import DataInfo
from adaptune.devices import autocast, select_device
from adaptune.errors import ModelError
from adaptune.figures import plot_confusion
from adaptune.modalities import Examples, TaskModel, loader
from adaptune.modalities.shifts import parse_shift_name
from adaptune.prefix import PrefixCache
from adaptune.settings import DataSettings, ModelSettings
from adaptune.timing import StageClock

log = logging.getLogger(__name__)


def head_module(task: TaskModel) -> str:
    """The path of the module that holds the task's new head: the deepest module holding every
    head parameter (``classifier``; timm's ``head.fc``)."""
    owners = [name.split(".")[:-1] for name in task.head]
    common: list[str] = []
    for parts in zip(*owners, strict=False):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    if not owners or not common:
        raise ModelError(
            f"the head's parameters ({', '.join(task.head) or 'none'}) share no module: "
            "cannot find the body's features the head reads"
        )
    return ".".join(common)


class HeadInputs:
    """The body's features for every example of a split: the input of the head's module
    (:func:`head_module`), captured by a forward pre-hook while :func:`predict` runs, in the
    split's row order (float64). A head that reads every position pools them first: the mean
    over tokens of a (batch, tokens, features) input (over the text's own tokens where the batch
    has an ``attention_mask``: a decoder's head reads the padding positions too, and with them
    a text's features would depend on the longest text of its batch), over the spatial
    positions of a (batch, channels, height, width) one."""

    def __init__(self, task: TaskModel, count: int) -> None:
        self.module = task.model.get_submodule(head_module(task))
        self.count = count
        self.features: torch.Tensor | None = None
        self.index: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def keep(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        value = next(a for a in (*args, *kwargs.values()) if torch.is_tensor(a))
        value = value.detach().double()
        if value.ndim == 3 and self.mask is not None and self.mask.shape == value.shape[:2]:
            weights = self.mask.to(value)[..., None]
            value = (value * weights).sum(1) / weights.sum(1)
        elif value.ndim == 3:
            value = value.mean(1)
        elif value.ndim == 4:
            value = value.mean((2, 3))
        value = value.flatten(1).cpu()
        if self.features is None:
            self.features = torch.zeros((self.count, value.shape[1]), dtype=torch.float64)
        self.features[self.index] = value

    @contextlib.contextmanager
    def recording(self) -> Iterator[HeadInputs]:
        handle = self.module.register_forward_pre_hook(self.keep, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


@torch.no_grad()
def predict(
    task: TaskModel,
    frame: pd.DataFrame | Examples,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    cache: PrefixCache | None = None,
    split: str = "",
    head_inputs: HeadInputs | None = None,
) -> np.ndarray:
    """Logits (float32, examples x classes) for a prepared split, in its row order. Batches
    are made longest first (little padding); with ``cache``, the frozen prefix is not run and
    the cached inputs of ``split`` are used; ``head_inputs`` keeps the body's features of
    the same pass."""
    model = task.model
    was_training = model.training
    model.eval()
    examples = frame if isinstance(frame, Examples) else task.modality.examples(frame)
    logits = torch.empty(0)
    replay = cache.replaying() if cache is not None else contextlib.nullcontext()
    recording = head_inputs.recording() if head_inputs is not None else contextlib.nullcontext()
    with replay, recording:
        for batch in loader(examples, batch_size, by_length=True, pin_memory=device.type == "cuda"):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if cache is not None:
                cache.current = cache.features(split, batch, device)
            if head_inputs is not None:
                head_inputs.index = batch["index"].cpu()
                head_inputs.mask = batch.get("attention_mask")
            with autocast(device, precision):
                out = task.logits(batch).float().cpu()
            if not len(logits):
                logits = torch.empty((len(examples), out.shape[1]))
            logits[batch["index"].cpu()] = out
    model.train(was_training)
    return logits.numpy()


def linear_cka(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al., ICML 2019) between two
    representations of the same examples (rows): ``||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F)`` of
    the column-centred matrices, in float64. 1 when one is the other up to a rotation and a
    scale, near 0 for unrelated ones; the feature counts may differ."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    scale = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / scale) if scale > 0 else float("nan")


def weight_change(
    pretrained: torch.nn.Module, finetuned: torch.nn.Module, head: Sequence[str]
) -> float:
    """How far the body's weights moved: ``||w - w0|| / ||w0||`` over every parameter but the
    head's (buffers, such as BatchNorm's running statistics, are not weights)."""
    before = dict(pretrained.named_parameters())
    after = dict(finetuned.named_parameters())
    names = [n for n in before if n not in set(head)]
    unmatched = [n for n in names if n not in after or after[n].shape != before[n].shape]
    if unmatched:
        raise ModelError(
            f"the fine-tuned model's parameters do not match the pretrained model's "
            f"({unmatched[:3]}): was it fine-tuned from model.name?"
        )
    moved = sum(
        float((after[n].detach().double().cpu() - before[n].detach().double().cpu()).pow(2).sum())
        for n in names
    )
    base = sum(float(before[n].detach().double().pow(2).sum()) for n in names)
    return (moved / base) ** 0.5 if base > 0 else float("nan")


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


def log_evaluation(
    run: tracking.TrackedRun, metrics: Mapping[str, Any], outputs: Mapping[str, str], stage: str
) -> None:
    """Log test metrics, per-class F1 and the files of :func:`save_evaluation` to ``run``, then
    mark its logging by ``stage`` complete."""
    run.log_metrics({k: metrics[k] for k in ("test_accuracy", "test_macro_f1", "test_loss")})
    run.log_metrics({k: metrics[k] for k in ("weight_change", "cka_drift") if k in metrics})
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
    run.logged(stage)


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
    modality = modalities.for_data(DataInfo.read(data_info_path))
    test = read_split(test_path)
    kind, severity = parse_shift_name(name)
    shifted = modality.shift(test, kind, severity, seed, data, model)
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


def body_features(
    task: TaskModel,
    test: pd.DataFrame,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
) -> torch.Tensor:
    """The body's features of ``task`` for every example of ``test`` (:class:`HeadInputs`)."""
    features = HeadInputs(task, len(test))
    predict(task, test, batch_size, device, precision, head_inputs=features)
    assert features.features is not None  # (a split has examples: prepare_data sees to it)
    return features.features


def drift(
    pretrained: TaskModel,
    finetuned: TaskModel,
    test: pd.DataFrame,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    finetuned_features: HeadInputs | None = None,
    pretrained_features: np.ndarray | torch.Tensor | None = None,
) -> dict[str, float]:
    """How far fine-tuning moved the model from its pretrained weights: ``weight_change``, the
    body's relative weight change (:func:`weight_change`), and ``cka_drift``, 1 - linear CKA
    (:func:`linear_cka`) between the two bodies' features on the test split (the inputs of
    the head, :class:`HeadInputs`): 0 for features unchanged up to rotation and scale. One
    pass of each model over the split; the fine-tuned one's features may come from the pass
    that scored it, the pretrained one's from :func:`run_pretrained_features` (the same for
    every run of an experiment)."""
    if finetuned_features is None:
        after = body_features(finetuned, test, batch_size, device, precision)
    else:
        after = finetuned_features.features
    if pretrained_features is None:
        pretrained_features = body_features(pretrained, test, batch_size, device, precision)
    change = weight_change(pretrained.model, finetuned.model, pretrained.head)
    cka = linear_cka(pretrained_features, after)
    log.info("drift from the pretrained model: weight change %.4f, 1 - CKA %.4f", change, 1 - cka)
    return {"weight_change": change, "cka_drift": 1.0 - cka}


def run_pretrained_features(
    test_path: str,
    data_info_path: str,
    model: ModelSettings,
    device: str,
    batch_size: int,
    precision: str,
    output: str,
) -> np.ndarray:
    """The ``pretrained_features`` stage: the pretrained model's body features on the test
    split (float64, examples x features, in the split's row order), computed once for the
    drift (:func:`drift`) of every run of the experiment instead of once per run. The new head
    is not read: its seed does not matter."""
    info = DataInfo.read(data_info_path)
    test = read_split(test_path)
    torch_device = select_device(device)
    pretrained = modalities.for_data(info).load_pretrained(model, 0)
    pretrained.model.to(torch_device)
    features = body_features(pretrained, test, batch_size, torch_device, precision).numpy()
    np.save(output, features)
    log.info(
        "pretrained body features of %d test examples (%d each) -> %s",
        len(test),
        features.shape[1],
        output,
    )
    return features


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
    model: ModelSettings | None = None,
    pretrained_features: str | None = None,
) -> dict:
    """The ``evaluate`` stage: test metrics of the fine-tuned model, under each shift of
    ``shifted`` (name -> the shifted test split) and, given the pretrained ``model``, how far
    fine-tuning moved it (:func:`drift`; ``pretrained_features``: the ``.npy`` of
    :func:`run_pretrained_features`, else they are computed here), logged into the same MLflow
    run as its training."""
    clock = StageClock()
    info = DataInfo.read(data_info_path)
    summary = json.loads(Path(summary_path).read_text())
    test = read_split(test_path)
    torch_device = select_device(device)
    task = modalities.for_data(info).load_finetuned(model_dir)
    task.model.to(torch_device)
    features = HeadInputs(task, len(test)) if model is not None else None
    clock.lap("load")
    logits = predict(task, test, batch_size, torch_device, precision, head_inputs=features)
    metrics, per_class, matrix = evaluate_predictions(
        test["label_id"].to_numpy(), logits, info.labels
    )
    clock.lap("inference")
    if model is not None:
        pretrained = modalities.for_data(info).load_pretrained(model, int(summary["seed"]))
        pretrained.model.to(torch_device)
        clock.lap("load")
        before = np.load(pretrained_features) if pretrained_features else None
        metrics.update(
            drift(pretrained, task, test, batch_size, torch_device, precision, features, before)
        )
        clock.lap("drift")
    metrics.update(
        shift_metrics(
            lambda split: predict(task, split, batch_size, torch_device, precision),
            shifted or {},
            info.num_labels,
            metrics["test_macro_f1"],
        )
    )
    # (train_summary.json of a run trained before MLflow ids lived in mlflow_run_id alone
    # holds them too: they are not copied, as a store rebuilt from the files changes them.)
    clock.lap("inference")  # the shifted test splits
    metrics = {**{k: v for k, v in summary.items() if not k.startswith("mlflow_")}, **metrics}
    title = (
        f"{summary['strategy']}, {summary['shots']} shots, seed {summary['seed']}: "
        f"macro-F1 {metrics['test_macro_f1']:.3f}"
    )
    # Where the job's seconds went before saving and logging (benchmarks/job_time.py): the file
    # is what MLflow logs, so it is written once.
    metrics["evaluate_seconds"] = clock.report("evaluate")
    save_evaluation(metrics, per_class, matrix, title, outputs)
    experiment = tracking.read_experiment(experiment_path)
    run_id = Path(run_id_path).read_text().strip()
    log_evaluation(tracking.existing_run(experiment, run_id), metrics, outputs, "evaluate")
    return metrics
