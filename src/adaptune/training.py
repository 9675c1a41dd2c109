"""Fine-tuning under a freeze plan: cross-entropy, the configured optimizer over the plan's
parameter groups, warm-up then linear decay, validation after every epoch, best checkpoint kept.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from adaptune.data import iterate_batches
from adaptune.evaluation import classification_metrics
from adaptune.models import forward
from adaptune.optim import (
    AutoRGN,
    ChildTuningD,
    Dynamics,
    apply_plan,
    build_optimizer,
    param_groups,
    warmup_linear_schedule,
)
from adaptune.plans import Plan
from adaptune.settings import ModelSettings, TrainSettings
from adaptune.vision import set_frozen_batchnorm_eval

log = logging.getLogger(__name__)


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` takes cuda, then mps, then cpu; anything else is passed to torch."""
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (``auto`` or ``bf16``); full precision elsewhere."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict(
    model: nn.Module,
    frame: pd.DataFrame,
    batch_size: int,
    data_info: Mapping[str, Any],
    device: torch.device,
    precision: str = "auto",
) -> np.ndarray:
    """Logits (float32, examples x classes) for a prepared split, in its row order."""
    was_training = model.training
    model.eval()
    outputs = []
    for batch in iterate_batches(frame, batch_size, data_info):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, precision):
            outputs.append(forward(model, batch).float().cpu())
    model.train(was_training)
    return torch.cat(outputs).numpy()


def task_fisher(
    model: nn.Module,
    train: pd.DataFrame,
    batch_size: int,
    data_info: Mapping[str, Any],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Elementwise empirical Fisher information of the task loss on the training split, for
    ChildTuning-D's mask (eval mode, like the importance stage)."""
    from adaptune.importance import gradient_moments, scoring_mode

    batches = [
        {k: v.to(device) for k, v in b.items()}
        for b in iterate_batches(train, batch_size, data_info)
    ]
    with scoring_mode(model):
        return gradient_moments(model, batches)[1]


def make_dynamics(
    plan: Plan,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    settings: TrainSettings,
    fisher: dict[str, torch.Tensor] | None,
) -> Dynamics:
    """The plan's training-time behaviour: Auto-RGN, ChildTuning-D, or none."""
    if plan.kind == "auto_rgn":
        head = [t.name for t in plan.tensors if t.is_head]
        return AutoRGN(optimizer, scheduler, settings.lr, exempt=head)
    if plan.kind == "childtuning_d":
        assert fisher is not None
        names = [n for g in optimizer.param_groups for n in g["names"]]
        params = dict(model.named_parameters())
        dynamics = ChildTuningD(
            [params[n] for n in names], [fisher[n] for n in names], plan.settings["p"]
        )
        log.info(
            "ChildTuning-D: %d of %d trainable weights keep their gradient",
            dynamics.kept,
            sum(params[n].numel() for n in names),
        )
        return dynamics
    return Dynamics()


@dataclass
class TrainResult:
    history: pd.DataFrame
    trainable_params: int
    best_epoch: int
    best_val_macro_f1: float
    train_seconds: float
    optimizer_groups: int


def finetune(
    model: nn.Module,
    plan: Plan,
    train: pd.DataFrame,
    val: pd.DataFrame,
    settings: TrainSettings,
    seed: int,
    data_info: Mapping[str, Any],
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place under ``plan``; on return it holds the weights of the epoch with
    the best validation macro-F1 (ties: the earlier epoch).

    Only trainable tensors are copied for the best checkpoint: frozen ones never change. With
    ``settings.frozen_batchnorm == "eval"``, BatchNorm layers whose parameters are all frozen
    stay in eval mode, so their running statistics stay the pretrained ones too.
    """
    seed_everything(seed)
    model.to(device)
    fisher = (
        task_fisher(model, train, settings.batch_size, data_info, device)
        if plan.kind == "childtuning_d"
        else None
    )
    groups = param_groups(
        model,
        plan,
        settings.weight_decay,
        settings.decay_norm_and_bias,
        per_tensor=plan.kind == "auto_rgn",
    )
    lora = plan.kind == "lora"
    if lora:
        from adaptune.adapters import lora_group

        groups.append(lora_group(model, plan, settings.weight_decay))
        model.to(device)
    optimizer = build_optimizer(groups, settings)
    steps_per_epoch = -(-len(train) // settings.batch_size)
    scheduler = warmup_linear_schedule(
        optimizer, steps_per_epoch * settings.epochs, settings.warmup_ratio
    )
    dynamics = make_dynamics(plan, model, optimizer, scheduler, settings, fisher)
    trainable = [p for g in groups for p in g["params"]]
    log.info(
        "%d optimizer group(s), %d trainable tensors, %d steps per epoch on %s",
        len(groups),
        len(trainable),
        steps_per_epoch,
        device,
    )
    generator = torch.Generator().manual_seed(seed)
    labels = val["label_id"].to_numpy()
    history: list[dict[str, float]] = []
    best: tuple[float, int, list[torch.Tensor]] | None = None
    train_seconds = 0.0
    for epoch in range(1, settings.epochs + 1):
        if plan.totals["scheduled_tensors"]:
            apply_plan(model, plan, epoch)
            log.info("epoch %d: %d tensors train", epoch, sum(p.requires_grad for p in trainable))
        model.train()
        if settings.frozen_batchnorm == "eval":
            set_frozen_batchnorm_eval(model)
        start = time.perf_counter()
        losses = []
        batches = iterate_batches(
            train, settings.batch_size, data_info, True, generator, settings.augment
        )
        for step, batch in enumerate(
            tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}", mininterval=10)
        ):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, settings.precision):
                logits = forward(model, batch)
            loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dynamics.before_step(first_step_of_epoch=step == 0)
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        train_seconds += time.perf_counter() - start
        val_logits = predict(
            model, val, settings.eval_batch_size, data_info, device, settings.precision
        )
        scores = classification_metrics(
            labels, val_logits.argmax(1), num_labels=val_logits.shape[1]
        )
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_loss": float(
                nn.functional.cross_entropy(torch.from_numpy(val_logits), torch.tensor(labels))
            ),
            "val_accuracy": scores["accuracy"],
            "val_macro_f1": scores["macro_f1"],
            # The base rate after the schedule; each group trains at this x its multiplier.
            "lr": settings.lr * scheduler.lr_lambdas[0](scheduler.last_epoch),
            "epoch_seconds": time.perf_counter() - start,
        }
        history.append(row)
        log.info(
            "epoch %d: train_loss %.4f val_loss %.4f val_acc %.4f val_macro_f1 %.4f",
            epoch,
            row["train_loss"],
            row["val_loss"],
            row["val_accuracy"],
            row["val_macro_f1"],
        )
        if on_epoch is not None:
            on_epoch(row)
        if best is None or row["val_macro_f1"] > best[0]:
            best = (row["val_macro_f1"], epoch, [p.detach().clone() for p in trainable])
    assert best is not None
    with torch.no_grad():
        for param, saved in zip(trainable, best[2], strict=True):
            param.copy_(saved)
    log.info(
        "best epoch %d (val macro-F1 %.4f); %d tensors restored", best[1], best[0], len(trainable)
    )
    if lora:
        from adaptune.adapters import merge_lora

        log.info("LoRA merged into %d modules", merge_lora(model))
    trained = (
        dynamics.kept if isinstance(dynamics, ChildTuningD) else sum(p.numel() for p in trainable)
    )
    return TrainResult(
        history=pd.DataFrame(history),
        trainable_params=trained,
        best_epoch=best[1],
        best_val_macro_f1=best[0],
        train_seconds=train_seconds,
        optimizer_groups=len(groups),
    )


@dataclass(frozen=True)
class RunKey:
    """Which run this is: the workflow's wildcards."""

    strategy: str
    shots: str
    seed: int


def run_finetune(
    key: RunKey,
    model: ModelSettings,
    settings: TrainSettings,
    plan_path: str,
    train_path: str,
    val_path: str,
    data_info_path: str,
    experiment_path: str,
    artifacts: dict[str, str],
    outputs: dict[str, str],
) -> TrainResult:
    """The ``finetune`` stage: load the pretrained model with a new head (from the run's seed),
    apply the plan, train, and save the best checkpoint, the history, a summary and the MLflow
    run id. ``artifacts`` are extra files logged to the run (the importance table)."""
    import json
    from pathlib import Path

    from adaptune import tracking
    from adaptune.data import read_data_info, read_split
    from adaptune.models import load_model, save_finetuned
    from adaptune.settings import write_settings

    info = read_data_info(data_info_path)
    plan = Plan.load(plan_path)
    device = select_device(settings.device)
    task = load_model(model, info["labels"], key.seed)
    experiment = tracking.read_experiment(experiment_path)
    run_name = f"{key.strategy}-k{key.shots}-seed{key.seed}"
    tags = {
        "strategy": key.strategy,
        "shots": key.shots,
        "seed": str(key.seed),
        "data_fingerprint": info["fingerprint"],
        "stage": "finetune",
    }
    with tracking.mlflow_run(experiment, run_name=run_name, tags=tags) as run:
        Path(outputs["run_id"]).write_text(run.info.run_id + "\n")
        tracking.log_params(
            {
                "model": model.name,
                "strategy": key.strategy,
                "plan_kind": plan.kind,
                "shots": key.shots,
                "seed": key.seed,
                "device": str(device),
                "data_source": info["source"],
                "modality": info.get("modality", "text"),
                **({"max_length": info["max_length"]} if "max_length" in info else {}),
                **({"model_weights": model.weights} if model.weights else {}),
                **({"input_size": info["transform"]["input_size"]} if "transform" in info else {}),
                **{k: v for k, v in vars(settings).items() if k not in ("seeds",)},
            }
        )
        result = finetune(
            task.model,
            plan,
            read_split(train_path),
            read_split(val_path),
            settings,
            key.seed,
            info,
            device,
            on_epoch=lambda row: tracking.log_metrics(
                {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
            ),
        )
        save_finetuned(task, outputs["model"], model.name, info["labels"])
        result.history.to_csv(outputs["history"], index=False)
        summary = {
            "strategy": key.strategy,
            "shots": key.shots,
            "seed": key.seed,
            "model": model.name,
            "trainable_params": result.trainable_params,
            "trainable_fraction": result.trainable_params / plan.totals["params"],
            "train_seconds": result.train_seconds,
            "best_epoch": result.best_epoch,
            "best_val_macro_f1": result.best_val_macro_f1,
            "optimizer_groups": result.optimizer_groups,
            "device": str(device),
            "mlflow_run_id": run.info.run_id,
        }
        Path(outputs["summary"]).write_text(json.dumps(summary, indent=2) + "\n")
        # What actually trained (LoRA adapters, ChildTuning-D's share), known after training.
        tracking.log_params(
            {
                "trainable_params": summary["trainable_params"],
                "trainable_fraction": round(summary["trainable_fraction"], 6),
            }
        )
        write_settings(outputs["settings"], train=settings, model=model.name, run=vars(key))
        tracking.log_metrics(
            {"train_seconds": result.train_seconds, "best_val_macro_f1": result.best_val_macro_f1}
        )
        for path in (plan_path, outputs["history"], outputs["settings"]):
            tracking.log_artifact(path)
        for path in artifacts.values():
            tracking.log_artifact(path, "importance")
    return result
