"""Fine-tuning under a freeze plan: cross-entropy, the configured optimizer over the plan's
parameter groups, the strategy's lr schedule (warm-up then linear decay unless its kind says
otherwise), validation after every epoch, best checkpoint kept; the ``finetune`` stage.

The loop knows no strategy kind by name: what a kind does beyond its plan comes from its
training hooks (:mod:`adaptune.strategies`), and which tensors train in which epoch is the plan.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from adaptune import distributed, modalities, strategies, tracking
from adaptune.data import loader, read_data_info, read_split
from adaptune.evaluation import classification_metrics, predict
from adaptune.modalities import Examples, TaskModel
from adaptune.optim import apply_plan, build_optimizer, param_groups
from adaptune.plans import Plan
from adaptune.prefix import Boundary, PrefixCache, find_boundary
from adaptune.runtime import autocast, seed_everything
from adaptune.settings import ModelSettings, TrainSettings, write_settings
from adaptune.strategies import Run

log = logging.getLogger(__name__)


def set_frozen_batchnorm_eval(model: nn.Module) -> None:
    """Put every BatchNorm layer whose parameters are all frozen into eval mode: it keeps its
    pretrained running statistics instead of re-estimating them from small few-shot batches."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


@dataclass
class TrainResult:
    history: pd.DataFrame
    trainable_params: int
    best_epoch: int
    best_val_macro_f1: float
    train_seconds: float
    optimizer_groups: int
    warnings: list[str]


def cache_limit_bytes() -> int:
    """Memory the frozen-prefix cache may hold (the rest goes to disk): a quarter of what is
    available, at most 2 GB."""
    return int(min(2e9, 0.25 * psutil.virtual_memory().available))


class PrefixState:
    """The frozen-prefix cache of a run, kept while the boundary stays where it is and rebuilt
    when a layer thaws (gradual unfreezing, the end of a probe)."""

    def __init__(
        self,
        task: TaskModel,
        settings: TrainSettings,
        train: Examples,
        val: Examples,
        device: torch.device,
    ) -> None:
        self.task, self.settings, self.device = task, settings, device
        self.train, self.val = train, val
        self.cache: PrefixCache | None = None
        self.enabled = settings.feature_cache == "auto"
        if self.enabled and settings.augment:
            log.info("feature cache off: augmented training examples differ every epoch")
            self.enabled = False

    def refresh(self) -> PrefixCache | None:
        """The cache for the model's frozen prefix as it is now (None: run everything)."""
        if not self.enabled:
            return None
        boundary = find_boundary(self.task.model, self.task.head)
        if self.cache is not None and boundary == self.cache.boundary:
            return self.cache
        self.close()
        if boundary is None:
            return None
        if self.settings.frozen_batchnorm == "train" and self._has_batchnorm(boundary):
            log.info("feature cache off: frozen BatchNorm layers train (frozen_batchnorm: train)")
            return None
        start = time.perf_counter()
        cache = PrefixCache(self.task, boundary, cache_limit_bytes())
        try:
            batch_size = self.settings.eval_batch_size
            for split, examples in (("train", self.train), ("val", self.val)):
                if split == "val" and self.val is self.train:
                    cache.stores["val"] = cache.stores["train"]  # captured once
                    continue
                batches = loader(examples, batch_size, by_length=True)
                cache.capture(split, batches, len(examples), self.device)
            problem = self._check(cache)
        except (RuntimeError, ValueError, MemoryError, OSError) as err:
            problem = f"{type(err).__name__}: {err}"
        if problem:
            log.warning("feature cache off: %s; every step runs the whole network", problem)
            cache.close()
            self.enabled = False
            return None
        stores = {id(store): store for store in cache.stores.values()}.values()
        log.info(
            "feature cache: every layer below %s frozen; the inputs of %s cached for %s "
            "examples in %.1f s (%.0f MB in memory)",
            boundary.layer,
            boundary.inject,
            len(self.train) if len(stores) == 1 else f"{len(self.train)} + {len(self.val)}",
            time.perf_counter() - start,
            sum(store.used for store in stores) / 1e6,
        )
        self.cache = cache
        return cache

    def _has_batchnorm(self, boundary: Boundary) -> bool:
        model = self.task.model
        return any(
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            for path in (*boundary.removed, *boundary.passed)
            for m in model.get_submodule(path).modules()
        )

    @torch.no_grad()
    def _check(self, cache: PrefixCache) -> str | None:
        """Compare the cached forward with the full one on a batch of validation examples."""
        batch = next(iter(loader(self.val, min(len(self.val), 8))))
        batch = {k: v.to(self.device) for k, v in batch.items()}
        model = self.task.model
        was_training = model.training
        model.eval()
        try:
            full = self.task.logits(batch).float()
            with cache.replaying():
                cache.current = cache.features("val", batch, self.device)
                cached = self.task.logits(batch).float()
        finally:
            model.train(was_training)
        if full.shape != cached.shape or not torch.allclose(full, cached, rtol=1e-4, atol=1e-5):
            gap = (full - cached).abs().max() if full.shape == cached.shape else "shape"
            return f"the cached and the full forward disagree ({gap})"
        return None

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None


def step_loss(
    logits: torch.Tensor, labels: torch.Tensor, global_count: int, world: distributed.World
) -> torch.Tensor:
    """The cross-entropy this process backpropagates: the batch mean in one process; under
    DDP its examples' summed loss weighed so that DDP's average over ranks is the gradient of
    the global batch's mean loss, however the batch was split (:func:`distributed.loss_weight`)."""
    if world.size == 1:
        return nn.functional.cross_entropy(logits.float(), labels)
    summed = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
    return summed * distributed.loss_weight(global_count, world)


FEW_STEPS = 20  # fewer optimizer steps than this in a run: its result says little


def training_warnings(steps: int, final_train_loss: float, num_labels: int) -> list[str]:
    """What a user should know before trusting a run: it took very few optimizer steps, or its
    training loss ended near chance (the cross-entropy of a uniform guess, ln(classes))."""
    warnings = []
    if steps < FEW_STEPS:
        warnings.append(
            f"only {steps} optimizer steps in the whole run (fewer than {FEW_STEPS}): raise "
            "train.epochs or lower train.batch_size"
        )
    chance = float(np.log(num_labels))
    if num_labels > 1 and final_train_loss >= 0.9 * chance:
        warnings.append(
            f"the training loss ended at {final_train_loss:.3f}, near chance "
            f"(ln {num_labels} = {chance:.3f}): the model learned little; check train.lr and "
            "train.epochs"
        )
    return warnings


def finetune(
    task: TaskModel,
    plan: Plan,
    train: pd.DataFrame,
    val: pd.DataFrame,
    settings: TrainSettings,
    seed: int,
    info: Mapping[str, Any],
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    workers: int = 0,
    on_steps: Callable[[list[dict[str, float]]], None] | None = None,
    restore_best: bool = True,
) -> TrainResult:
    """Train ``task.model`` in place under ``plan``; on return it holds the weights of the epoch
    with the best validation macro-F1 (ties: the earlier epoch), or with ``restore_best=False``
    those of the last epoch (a probe trained for a set number of epochs).

    Only trainable tensors are copied for the best checkpoint: frozen ones never change. With
    ``settings.frozen_batchnorm == "eval"``, BatchNorm layers whose parameters are all frozen
    stay in eval mode, so their running statistics stay the pretrained ones too. Where the
    bottom of the network is frozen, it is computed once (:mod:`adaptune.prefix`). ``workers``
    processes prepare the training batches. In a process group (:mod:`adaptune.distributed`),
    each process trains on its slice of every global batch of ``settings.batch_size``, DDP
    averages the gradients, and rank 0 validates; every rank returns the same result.
    ``on_epoch`` receives each epoch's row of the history; ``on_steps``, after each epoch, its
    optimizer steps (``step`` counted over the run, ``train_loss_step``, and ``lr``: the base
    rate that step used).
    """
    seed_everything(seed)
    world = distributed.current()
    model = task.model
    model.to(device)
    hooks = strategies.hooks_for(plan, settings)
    run = Run(task, plan, train, info, settings, device)
    groups = param_groups(
        model,
        plan,
        settings.weight_decay,
        settings.decay_norm_and_bias,
        per_tensor=hooks.per_tensor_groups,
    )
    groups += hooks.extra_groups(run)
    optimizer = build_optimizer(groups, settings)
    steps_per_epoch = -(-len(train) // settings.batch_size)
    schedule = hooks.schedule(steps_per_epoch * settings.epochs, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    run.optimizer, run.scheduler, run.groups = optimizer, scheduler, groups
    hooks.start(run)
    replicas = distributed.Replicas(model, world, device)
    trainable = [p for g in groups for p in g["params"]]
    log.info(
        "%d optimizer group(s), %d trainable tensors, %d steps per epoch on %s%s",
        len(groups),
        len(trainable),
        steps_per_epoch,
        device,
        f" x {world.size} processes" if world.size > 1 else "",
    )
    train_examples = task.modality.examples(train, info, settings.augment, seed)
    # Validating on the training split itself (a probe): one set of examples, cached once.
    same = val is train and not settings.augment
    val_examples = train_examples if same else task.modality.examples(val, info)
    prefix = PrefixState(task, settings, train_examples, val_examples, device)
    generator = torch.Generator().manual_seed(seed)
    labels = val["label_id"].to_numpy()
    history: list[dict[str, float]] = []
    best: tuple[float, int, list[torch.Tensor]] | None = None
    train_seconds = 0.0
    for epoch in range(1, settings.epochs + 1):
        if plan.totals["scheduled_tensors"]:
            apply_plan(model, plan, epoch)
            log.info("epoch %d: %d tensors train", epoch, sum(p.requires_grad for p in trainable))
        start = time.perf_counter()  # training time includes building the frozen-prefix cache
        cache = prefix.refresh()
        model.train()
        if settings.frozen_batchnorm == "eval":
            set_frozen_batchnorm_eval(model)
        replica = replicas.sync()
        losses, rates = [], []
        train_examples.set_epoch(epoch)
        epoch_batches = loader(
            train_examples,
            settings.batch_size,
            shuffle=True,
            generator=generator,
            workers=workers,
            pin_memory=device.type == "cuda",
            shard=(lambda rows: distributed.shard(rows, world)) if world.size > 1 else None,
        )
        with cache.replaying() if cache else contextlib.nullcontext():
            for step, batch in enumerate(
                tqdm(epoch_batches, total=steps_per_epoch, desc=f"epoch {epoch}", mininterval=10)
            ):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                if cache is not None:
                    cache.current = cache.features("train", batch, device)
                with autocast(device, settings.precision):
                    logits = task.modality.forward(replica, batch)
                global_count = min(settings.batch_size, len(train) - step * settings.batch_size)
                loss = step_loss(logits, batch["labels"], global_count, world)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                hooks.before_step(first_step_of_epoch=step == 0)
                if settings.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
                optimizer.step()
                rate = settings.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
                scheduler.step()
                losses.append(float(loss.detach()))
                rates.append(rate)
        # Under DDP each rank's loss is its share of the global batch's mean times the ranks.
        losses = [v / world.size for v in distributed.all_sum(losses, world, device)]
        first_step = scheduler.last_epoch - len(losses) + 1
        steps = [
            {"step": first_step + i, "train_loss_step": loss_value, "lr": rate}
            for i, (loss_value, rate) in enumerate(zip(losses, rates, strict=True))
        ]
        train_seconds += time.perf_counter() - start
        row, classes = None, 0
        if world.is_main:
            val_logits = predict(
                task,
                val_examples,
                settings.eval_batch_size,
                info,
                device,
                settings.precision,
                cache,
                "val",
            )
            classes = int(val_logits.shape[1])
            scores = classification_metrics(labels, val_logits.argmax(1), num_labels=classes)
            row = {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "val_loss": float(
                    nn.functional.cross_entropy(torch.from_numpy(val_logits), torch.tensor(labels))
                ),
                "val_accuracy": scores["accuracy"],
                "val_macro_f1": scores["macro_f1"],
                # The base rate of the epoch's last step; each group trains at this x its
                # multiplier.
                "lr": steps[-1]["lr"],
                "epoch_seconds": time.perf_counter() - start,
            }
        row, classes = distributed.from_main((row, classes), world)
        history.append(row)
        log.info(
            "epoch %d: train_loss %.4f val_loss %.4f val_acc %.4f val_macro_f1 %.4f",
            epoch,
            row["train_loss"],
            row["val_loss"],
            row["val_accuracy"],
            row["val_macro_f1"],
        )
        if on_steps is not None:
            on_steps(steps)
        if on_epoch is not None:
            on_epoch(row)
        if best is None or row["val_macro_f1"] > best[0]:
            best = (row["val_macro_f1"], epoch, [p.detach().clone() for p in trainable])
    prefix.close()
    replicas.close()
    assert best is not None
    if restore_best:
        with torch.no_grad():
            for param, saved in zip(trainable, best[2], strict=True):
                param.copy_(saved)
        log.info(
            "best epoch %d (val macro-F1 %.4f); %d tensors restored",
            best[1],
            best[0],
            len(trainable),
        )
    hooks.finish(run)
    warnings = training_warnings(
        steps_per_epoch * settings.epochs, history[-1]["train_loss"], classes
    )
    return TrainResult(
        history=pd.DataFrame(history),
        trainable_params=hooks.trained_params(sum(p.numel() for p in trainable)),
        best_epoch=best[1],
        best_val_macro_f1=best[0],
        train_seconds=train_seconds,
        optimizer_groups=len(groups),
        warnings=warnings,
    )


def scalar_columns(frame: pd.DataFrame) -> list[str]:
    """The columns of a prepared split that hold one number or string per example (not token
    arrays or image bytes): what its MLflow dataset input describes."""
    first = frame.iloc[0] if len(frame) else {}
    return [c for c in frame.columns if not isinstance(first[c], bytes | np.ndarray | list)]


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as MLflow params: ``{"a": {"b": 1}}`` is ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass(frozen=True)
class RunKey:
    """Which run this is: the workflow's wildcards."""

    strategy: str
    shots: str
    seed: int

    @property
    def tracking_key(self) -> str:
        """The run's key in MLflow (``adaptune.key``): one live run per key."""
        return f"{self.strategy}/k{self.shots}/seed{self.seed}"


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
    resolved: Mapping[str, Any] | None = None,
) -> TrainResult:
    """The ``finetune`` stage: load the pretrained model with a new head (from the run's seed),
    apply the plan, train, and save the best checkpoint (a folder its own library loads), the
    history, a summary and the MLflow run id. ``artifacts`` are extra files logged to the run
    (the importance table); ``resolved`` the settings of the stages before it (``data``,
    ``importance``), logged with the run's own as its resolved config.

    Started by :func:`run_finetune_job` under ``torchrun``, every rank trains and only rank 0
    tracks the run and writes the outputs."""
    resolved = resolved or {}
    info = read_data_info(data_info_path)
    plan = Plan.load(plan_path)
    world = distributed.current()
    device = distributed.device_for(settings.device, world)
    modality = modalities.get(info)
    task = modality.load_pretrained(model, info["labels"], key.seed, info)
    if not world.is_main:
        train_frame, val_frame = read_split(train_path), read_split(val_path)
        return finetune(task, plan, train_frame, val_frame, settings, key.seed, info, device)
    experiment = tracking.read_experiment(experiment_path)
    run_name = f"{key.strategy}-k{key.shots}-seed{key.seed}"
    description = (
        f"{model.name} fine-tuned with strategy {key.strategy!r} ({plan.kind}) on "
        f"{key.shots} examples per class of {info['source']}, seed {key.seed}; "
        f"{plan.totals['trainable_tensors']} of {plan.totals['tensors']} tensors train."
    )
    tags = {
        "strategy": key.strategy,
        "shots": key.shots,
        "seed": str(key.seed),
        # the seeds of one strategy and shot count: group the runs table by this tag
        "adaptune.group": f"{key.strategy}/k{key.shots}",
        "data_fingerprint": info["fingerprint"],
        "stage": "finetune",
        **tracking.source_tags("finetune", description),
    }
    config = {
        "model": vars(model),
        "data": {**resolved.get("data", {}), "shots": key.shots},
        "importance": resolved.get("importance", {}),
        "strategy": {"name": key.strategy, "kind": plan.kind, **plan.settings},
        "train": {**vars(settings), "device": str(device), "seed": key.seed},
    }
    with (
        tracking.start_run(experiment, key.tracking_key, run_name, tags) as run,
        tracking.system_metrics(run.run_id, experiment["tracking_uri"]),
    ):
        Path(outputs["run_id"]).write_text(run.run_id + "\n")
        run.log_params(
            {
                "model": model.name,
                "strategy": key.strategy,
                "plan_kind": plan.kind,
                "shots": key.shots,
                "seed": key.seed,
                "data_source": info["source"],
                "modality": info["modality"],
                **({"max_length": info["max_length"]} if "max_length" in info else {}),
                **({"model_weights": model.weights} if model.weights else {}),
                **({"input_size": info["transform"]["input_size"]} if "transform" in info else {}),
                **vars(settings),
                "device": str(device),  # what ran, not what was asked for ("auto")
                **flatten({k: config[k] for k in ("data", "importance", "strategy")}),
            }
        )
        run.log_dict(config, "config.json")
        train_frame, val_frame = read_split(train_path), read_split(val_path)
        for frame, context in ((train_frame, "train"), (val_frame, "validation")):
            run.log_dataset(
                frame[scalar_columns(frame)],
                name=f"{info['source']} {context} k{key.shots}",
                source=info["source"],
                digest=info["fingerprint"],
                context=context,
            )
        result = finetune(
            task,
            plan,
            train_frame,
            val_frame,
            settings,
            key.seed,
            info,
            device,
            on_epoch=lambda row: run.log_metrics(
                {k: v for k, v in row.items() if k not in ("epoch", "lr")}, step=int(row["epoch"])
            ),
            on_steps=run.log_steps,
        )
        for warning in result.warnings:
            log.warning("%s", warning)
        if result.warnings:
            run.set_tags({"adaptune.warnings": " | ".join(result.warnings)})
        modality.save(task, outputs["model"], model, info)
        model_uri = modality.log_model(
            outputs["model"], run.run_id, experiment["tracking_uri"], train_frame.head(2)
        )
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
            "mlflow_run_id": run.run_id,
            "mlflow_model_uri": model_uri,
            "warnings": result.warnings,
        }
        Path(outputs["summary"]).write_text(json.dumps(summary, indent=2) + "\n")
        # What actually trained (LoRA adapters, ChildTuning-D's share), known after training.
        run.log_params(
            {
                "trainable_params": summary["trainable_params"],
                "trainable_fraction": round(summary["trainable_fraction"], 6),
            }
        )
        write_settings(
            outputs["settings"],
            run={"strategy": key.strategy, "shots": key.shots, "seed": key.seed},
            train=settings,
            model=model,
            plan={"kind": plan.kind, **plan.settings},
        )
        run.log_metrics(
            {"train_seconds": result.train_seconds, "best_val_macro_f1": result.best_val_macro_f1}
        )
        for path in (plan_path, outputs["history"], outputs["settings"]):
            run.log_artifact(path)
        for path in artifacts.values():
            run.log_artifact(path, "importance")
    return result


def finetune_job(
    key: RunKey,
    model: Mapping[str, Any],
    train: Mapping[str, Any],
    inputs: Mapping[str, str],
    outputs: Mapping[str, str],
    artifacts: Mapping[str, str],
    resolved: Mapping[str, Any],
) -> dict[str, Any]:
    """:func:`run_finetune`'s arguments as plain data (what :func:`distributed.launch` passes to
    the processes it starts); ``inputs`` are the rule's named inputs."""
    return {
        "key": vars(key),
        "model": dict(model),
        "train": dict(train),
        "device": train.get("device", "auto"),
        "inputs": dict(inputs),
        "outputs": dict(outputs),
        "artifacts": dict(artifacts),
        "resolved": dict(resolved),
    }


def run_finetune_job(job: Mapping[str, Any]) -> None:
    """:func:`run_finetune` on a :func:`finetune_job`."""
    inputs = job["inputs"]
    run_finetune(
        RunKey(**job["key"]),
        ModelSettings.from_config(job["model"]),
        TrainSettings.from_config(job["train"]),
        plan_path=inputs["plan"],
        train_path=inputs["train"],
        val_path=inputs["val"],
        data_info_path=inputs["info"],
        experiment_path=inputs["experiment"],
        artifacts=dict(job["artifacts"]),
        outputs=dict(job["outputs"]),
        resolved=job["resolved"],
    )
