"""The ``score_importance`` stage: the pretrained model with its new head, the head fitted
first where asked (``importance.head: probe``), scored by :mod:`adaptune.importance`.

Kept apart from the metrics because the probe is a fine-tuning run (:mod:`adaptune.training`,
under the ``head_only`` kind's plan): the metrics themselves need neither.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from adaptune import modalities, strategies
from adaptune.data import read_split
from adaptune.data_info import DataInfo
from adaptune.devices import select_device
from adaptune.errors import ConfigError
from adaptune.figures import plot_heatmap
from adaptune.importance import (
    calibration_batches,
    layer_table,
    metric_agreement,
    metric_columns,
    score_model,
    tensor_table,
)
from adaptune.memory import profile_activations
from adaptune.modalities import TaskModel
from adaptune.plans import ScoreTables
from adaptune.settings import ImportanceSettings, ModelSettings, TrainSettings
from adaptune.training import train as train_loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`probe_head` did: its settings, its seconds (the frozen-feature cache
    included), and the loss and accuracy of the probed model on the whole training split, in
    eval mode, after the last epoch."""

    probe_epochs: int
    probe_lr: float
    probe_seconds: float
    train_loss: float
    train_accuracy: float


def probe_head(
    task: TaskModel,
    train: pd.DataFrame,
    settings: ImportanceSettings,
    device: torch.device,
) -> ProbeResult:
    """Fit the new head alone before scoring: LP-FT's linear probe (Kumar et al. 2022), its
    first phase, on the few-shot training split ``train``.

    The probe is a fine-tuning run of ``settings.probe_epochs`` epochs under the ``head_only``
    kind's plan, through :func:`adaptune.training.train`: the body is frozen, so its
    features are computed once per example and only the head runs each step
    (:mod:`adaptune.prefix`). AdamW at ``settings.probe_lr`` decaying linearly to 0, no warm-up,
    the schema's ``train`` defaults otherwise (batches of 16), seeded from ``settings.seed``.
    The run validates on the training split itself and keeps the last epoch's head. Only the
    head's weights change; ``requires_grad`` flags and train/eval mode are restored. Cost: one
    forward pass of the body per training example, then the head's epochs (MiniLM, 80
    examples, two CPU threads: 2.3 s, a quarter of scoring with every metric).
    """
    if not task.head:
        raise ConfigError(
            "importance.head = 'probe', but the model has no new head to probe; use "
            "importance.head: random"
        )
    model = task.model
    skeleton = tensor_table(task)
    plan = strategies.build_plan(
        ScoreTables(skeleton, skeleton.iloc[:0]), "head_probe", {"kind": "head_only"}
    )
    probe = TrainSettings.from_config(
        {"lr": settings.probe_lr, "epochs": settings.probe_epochs, "warmup_ratio": 0.0}
    )
    log.info(
        "head probe: the new head alone for %d epochs at lr %g on %d training examples "
        "(its 'val' rows are the training split)",
        settings.probe_epochs,
        settings.probe_lr,
        len(train),
    )
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    start = time.perf_counter()
    try:
        result = train_loop(
            task, plan, train, train, probe, settings.seed, device, restore_best=False
        )
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)
    last = result.history.iloc[-1]
    outcome = ProbeResult(
        probe_epochs=settings.probe_epochs,
        probe_lr=settings.probe_lr,
        probe_seconds=time.perf_counter() - start,
        train_loss=float(last["val_loss"]),
        train_accuracy=float(last["val_accuracy"]),
    )
    log.info(
        "head probe: %.2f s; on the training split: loss %.4f, accuracy %.4f",
        outcome.probe_seconds,
        outcome.train_loss,
        outcome.train_accuracy,
    )
    return outcome


def run_score_importance(
    train_path: str,
    data_info_path: str,
    model: ModelSettings,
    settings: ImportanceSettings,
    scores_path: str,
    layers_path: str,
    heatmap_path: str,
    agreement_path: str,
    head_path: str | None = None,
) -> pd.DataFrame:
    """The ``score_importance`` stage: score the pretrained model (with its new head, initialised
    from ``settings.seed``, and with ``settings.head == "probe"`` fitted by :func:`probe_head`
    first) on calibration batches of the few-shot training split. ``head_path`` receives which
    head was scored (and the probe's outcome) as JSON."""
    modality = modalities.for_data(DataInfo.read(data_info_path))
    train = read_split(train_path)
    task = modality.load_pretrained(model, settings.seed)
    # On the GPU where there is one: per-example gradients then go through torch.func's vmap.
    device = select_device("auto")
    task.model.to(device)
    scored: dict[str, Any] = {"head": settings.head}
    title = f"{model.name}: per-element importance by layer"
    if settings.head == "probe":
        scored.update(asdict(probe_head(task, train, settings, device)))
        title += f", head probed {settings.probe_epochs} epochs"
    batches = [
        {key: value.to(device) for key, value in batch.items()}
        for batch in calibration_batches(
            modality, train, settings.batches, settings.batch_size, settings.seed
        )
    ]
    log.info("scoring on %s", device)
    table, seconds = score_model(
        task,
        batches,
        settings.metrics,
        **settings.scoring_options(),
    )
    table.to_parquet(scores_path, index=False)
    layers = layer_table(table, settings.combine)
    # What each layer costs in activations per example, for the plans' memory estimates.
    layers = layers.merge(profile_activations(task, batches[0]), on="layer_index", how="left")
    layers.to_parquet(layers_path, index=False)
    plot_heatmap(layers, metric_columns(layers), heatmap_path, title)
    metric_agreement(table).to_csv(agreement_path, float_format="%.4f")
    log.info("seconds per metric: %s", {k: round(v, 2) for k, v in seconds.items()})
    if head_path is not None:
        Path(head_path).write_text(json.dumps(scored, indent=2) + "\n")
    return table
