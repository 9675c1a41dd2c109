"""The ``finetune`` stage: load the pretrained model with a new head (from the run's seed), train
it under its plan (:mod:`adaptune.training`), save the best checkpoint as a folder its own
library loads, and record the run in MLflow: its parameters and resolved config, its datasets,
every step's and epoch's metrics, the model, the plan and the importance tables.

The run's MLflow record is made from what the stage writes, so that it can be made again from
the files alone (:mod:`adaptune.records`, when the store was lost or missed some logging):
``settings.json`` holds the job (:class:`FinetuneJob`) and the run's tags beside the resolved
settings; :func:`log_run_inputs` and :func:`log_run_outputs` log from those and from
``history.csv``, ``train_summary.json`` and the model folder. The run id lives in
``mlflow_run_id`` alone (it changes when the run is logged again). Tracking is best effort: a
store that stops answering costs the run its record until then, never its files.

Under ``torchrun`` (``train.devices`` > 1) every rank trains; only rank 0 tracks the run and
writes the outputs. A job killed before it finished resumes from its checkpoint (a hidden
``.checkpoint`` folder beside its outputs, :mod:`adaptune.checkpoints`) and logs into the
same MLflow run; the checkpoint is removed once the outputs are written. :class:`FinetuneJob`
is the stage's arguments as plain data, what :func:`adaptune.distributed.launch` hands to the
processes it starts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd

from adaptune import checkpoints, distributed, modalities, tracking
from adaptune.data import read_split
from adaptune.data_info import DataInfo
from adaptune.devices import rank_device
from adaptune.modalities import Modality, TaskModel
from adaptune.plans import Plan
from adaptune.settings import ModelSettings, TrainSettings, write_settings
from adaptune.timing import StageClock
from adaptune.training import TrainResult, train

log = logging.getLogger(__name__)


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

    @property
    def run_name(self) -> str:
        return f"{self.strategy}-k{self.shots}-seed{self.seed}"


@dataclass(frozen=True)
class FinetuneJob:
    """The stage's arguments: the run's key, the ``model`` and ``train`` config sections (the
    strategy's overrides applied), the rule's named ``inputs`` and ``outputs``, ``artifacts``
    (extra files logged with the run: the importance tables), ``resolved`` (the settings of
    the stages before it, ``data`` and ``importance``, logged with the run's own) and
    ``model_content`` (the pretrained model's content fingerprint, part of a checkpoint's)."""

    key: RunKey
    model: Mapping[str, Any]
    train: Mapping[str, Any]
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]
    artifacts: Mapping[str, str] = field(default_factory=dict)
    resolved: Mapping[str, Any] = field(default_factory=dict)
    model_content: str = ""

    @property
    def devices(self) -> int:
        return int(self.train.get("devices", 1))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        return cls(**{**values, "key": RunKey(**values["key"])})


def run_finetune_job(job: Mapping[str, Any]) -> None:
    """:func:`run_finetune` on a :meth:`FinetuneJob.to_dict` (the ``torchrun`` target)."""
    run_finetune(FinetuneJob.from_dict(job))


def run_finetune(job: FinetuneJob) -> TrainResult:
    """The ``finetune`` stage (see the module docstring)."""
    clock = StageClock()
    key, inputs = job.key, job.inputs
    info = DataInfo.read(inputs["info"])
    plan = Plan.load(inputs["plan"])
    model = ModelSettings.from_config(job.model)
    settings = TrainSettings.from_config(job.train)
    world = distributed.current()
    device = rank_device(settings.device, world.size, world.local_rank)
    task = modalities.for_data(info).load_pretrained(model, key.seed)
    train_frame, val_frame = read_split(inputs["train"]), read_split(inputs["val"])
    saved = job_checkpoints(job, info, model, settings)
    if not world.is_main:
        return train(
            task, plan, train_frame, val_frame, settings, key.seed, device, checkpoints=saved
        )
    resume = saved.load() if saved else None
    clock.lap("load")
    experiment = tracking.read_experiment(inputs["experiment"])
    tags = run_tags(job, info, plan)
    with (
        tracking.start_run(
            experiment,
            key.tracking_key,
            key.run_name,
            tags,
            run_id=resume["run_id"] if resume else None,
        ) as run,
        tracking.system_metrics(run),
    ):
        if resume and not run.reopened and run.failure is None:
            saved.set_aside(f"its MLflow run {resume['run_id']} cannot be reopened")
            resume = None
        # (A store that does not answer costs the run its record, not its training: it
        # resumes, and the next workflow run logs it from its files, adaptune.records.)
        Path(job.outputs["run_id"]).write_text(run.run_id + "\n")
        if resume:
            log_pending(run, resume["pending"])  # a kill may have come before they were logged
        else:
            frames = {"train": train_frame, "validation": val_frame}
            log_run_inputs(run, job, info, plan_section(plan), str(device), frames)
        if saved:
            saved.carry["run_id"] = run.run_id
        # A resumed job runs again the epochs after its checkpoint, which the killed attempt
        # may have logged (a checkpoint need not follow every epoch): each value once.
        log_steps = run.log_steps_once if resume else run.log_steps
        clock.lap("mlflow_inputs")
        result = train(
            task,
            plan,
            train_frame,
            val_frame,
            settings,
            key.seed,
            device,
            on_epoch=lambda row: log_steps([epoch_metrics(row)]),
            on_steps=log_steps,
            checkpoints=saved,
            resume=resume,
        )
        clock.lap("train")
        clock.split("train", "checkpoint", saved.seconds if saved else 0.0)
        for warning in result.warnings:
            log.warning("%s", warning)
        summary = save_run(job, task, plan, model, settings, result, str(device), tags)
        clock.lap("save")
        log_run_outputs(run, job, summary, task.modality, train_frame.head(2))
        clock.lap("mlflow_outputs")
        # Where the job's seconds went (benchmarks/job_time.py).
        summary["job_seconds"] = clock.report("finetune")
        Path(job.outputs["summary"]).write_text(json.dumps(summary, indent=2) + "\n")
        if saved:
            saved.remove()
    return result


def job_checkpoints(
    job: FinetuneJob, info: DataInfo, model: ModelSettings, settings: TrainSettings
) -> checkpoints.Checkpoints | None:
    """The job's checkpoint folder (``.checkpoint`` beside its outputs, which Snakemake does
    not delete when the job fails), with the fingerprint of what the job computes: its
    settings, plan, data, pretrained model and code (None when ``train.checkpoint`` is off)."""
    if not settings.checkpoint.enabled:
        return None
    inputs = job.inputs
    fingerprint = {
        "settings": checkpoints.value_digest(
            {
                "train": settings.results,
                "model": dict(job.model),
                "run": [job.key.strategy, job.key.shots, job.key.seed],
                "resolved": job.resolved,
            }
        ),
        "plan": checkpoints.file_digest(inputs["plan"]),
        "data": checkpoints.value_digest(
            [info.fingerprint, *(checkpoints.file_digest(inputs[s]) for s in ("train", "val"))]
        ),
        "model": job.model_content or checkpoints.value_digest(model.name),
        "code": checkpoints.code_digest(),
    }
    folder = Path(job.outputs["run_id"]).parent / ".checkpoint"
    every = settings.checkpoint
    return checkpoints.Checkpoints(folder, fingerprint, every.every_steps, every.every_seconds)


def epoch_metrics(row: Mapping[str, float]) -> dict[str, float]:
    """An epoch's row of the history as the run's per-epoch metrics, a row of
    :meth:`~adaptune.tracking.TrackedRun.log_steps` whose step is the epoch (``lr`` is a
    step's)."""
    metrics = {k: v for k, v in row.items() if k not in ("epoch", "lr")}
    return {**metrics, "step": int(row["epoch"])}


def log_pending(run: tracking.TrackedRun, pending: Mapping[str, Any]) -> None:
    """The rows a checkpoint covers whose logging a kill may have cut short: each metric of
    each step (and of the epoch) that the run does not hold yet."""
    rows = list(pending.get("steps", []))
    if pending.get("epoch"):
        rows.append(epoch_metrics(pending["epoch"]))
    logged = run.log_steps_once(rows)
    if logged:
        log.info("logged %d metric values the killed attempt had not", logged)


def run_tags(job: FinetuneJob, info: DataInfo, plan: Plan) -> dict[str, str]:
    key = job.key
    description = (
        f"{job.model['name']} fine-tuned with strategy {key.strategy!r} ({plan.kind}) on "
        f"{key.shots} examples per class of {info.source}, seed {key.seed}; "
        f"{plan.totals['trainable_tensors']} of {plan.totals['tensors']} tensors train."
    )
    return {
        "strategy": key.strategy,
        "shots": key.shots,
        "seed": str(key.seed),
        # the seeds of one strategy and shot count: group the runs table by this tag
        "adaptune.group": f"{key.strategy}/k{key.shots}",
        "data_fingerprint": info.fingerprint,
        "stage": "finetune",
        **tracking.source_tags("finetune", description),
    }


def plan_section(plan: Plan) -> dict[str, Any]:
    """The plan as ``settings.json`` holds it (``plan``): its kind and settings."""
    return {"kind": plan.kind, **plan.settings}


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


def log_run_inputs(
    run: tracking.TrackedRun,
    job: FinetuneJob,
    info: DataInfo,
    plan: Mapping[str, Any],
    device: str,
    frames: Mapping[str, pd.DataFrame],
) -> None:
    """What the run was given: parameters (the run's own and the resolved config of the
    stages before it, flattened), the config as a file, and ``frames`` (by context:
    ``train``, ``validation``) as dataset inputs. ``plan``: its :func:`plan_section`."""
    key, resolved = job.key, job.resolved
    config = {
        "model": dict(job.model),
        "data": {**resolved.get("data", {}), "shots": key.shots},
        "importance": resolved.get("importance", {}),
        "strategy": {"name": key.strategy, **plan},
        "train": {**job.train, "device": device, "seed": key.seed},
    }
    encoding = info.encoding
    run.log_params(
        {
            "model": job.model["name"],
            "strategy": key.strategy,
            "plan_kind": plan["kind"],
            "shots": key.shots,
            "seed": key.seed,
            "data_source": info.source,
            "modality": info.modality,
            **({"max_length": encoding["max_length"]} if "max_length" in encoding else {}),
            **({"model_weights": job.model["weights"]} if job.model.get("weights") else {}),
            **(
                {"input_size": encoding["transform"]["input_size"]}
                if "transform" in encoding
                else {}
            ),
            **vars(TrainSettings.from_config(job.train)),
            "device": device,  # what ran, not what was asked for ("auto")
            # (a run trained before its data and importance settings were recorded lacks them)
            **flatten({k: config[k] for k in ("data", "importance", "strategy") if config[k]}),
        }
    )
    run.log_dict(config, "config.json")
    for context, frame in frames.items():
        run.log_dataset(
            frame[scalar_columns(frame)],
            name=f"{info.source} {context} k{key.shots}",
            source=info.source,
            digest=info.fingerprint,
            context=context,
        )


def save_run(
    job: FinetuneJob,
    task: TaskModel,
    plan: Plan,
    model: ModelSettings,
    settings: TrainSettings,
    result: TrainResult,
    device: str,
    tags: Mapping[str, str],
) -> dict[str, Any]:
    """Write the run's files (the model folder, the history, the resolved settings with the
    job and the run's ``tags``: what its MLflow record is made of) and return its summary
    (``train_summary.json``)."""
    key, outputs = job.key, job.outputs
    task.modality.save(task, outputs["model"], model)
    result.history.to_csv(outputs["history"], index=False)
    write_settings(
        outputs["settings"],
        run={"strategy": key.strategy, "shots": key.shots, "seed": key.seed},
        train=settings,
        model=model,
        plan=plan_section(plan),
        job=job.to_dict(),
        tags=dict(tags),
    )
    return {
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
        "optimizer_state_bytes": result.optimizer_state_bytes,
        "peak_memory_bytes": result.peak_memory_bytes,
        "peak_memory_kind": result.peak_memory_kind,
        "epochs": settings.epochs,
        "stopped_epoch": result.stopped_epoch,
        "seconds_saved": result.seconds_saved,
        "device": device,
        "warnings": result.warnings,
        **({"strategy_record": result.strategy_record} if result.strategy_record else {}),
    }


# The summary's numbers that are MLflow metrics of the run (the rest are params or tags).
RUN_METRICS = (
    "train_seconds",
    "best_val_macro_f1",
    "optimizer_state_bytes",
    "peak_memory_bytes",
    "stopped_epoch",
    "seconds_saved",
)


def log_run_outputs(
    run: tracking.TrackedRun,
    job: FinetuneJob,
    summary: Mapping[str, Any],
    modality: Modality,
    example: pd.DataFrame,
) -> None:
    """What the run made, from its files: the model (``example``: a few prepared examples,
    its input example), what really trained (LoRA adapters, ChildTuning-D's share: known after
    training), its headline metrics (those a summary holds: a run trained before some were
    recorded lacks them), what its strategy decided, its files and the plan and importance
    tables it trained from (those the job names); then the ``finetune`` completion tag, last."""
    if summary.get("warnings"):
        run.set_tags({"adaptune.warnings": " | ".join(summary["warnings"])})
    run.call(modality.log_model, job.outputs["model"], run.run_id, run.tracking_uri, example)
    run.log_params(
        {
            "trainable_params": summary["trainable_params"],
            "trainable_fraction": round(summary["trainable_fraction"], 6),
        }
    )
    run.log_metrics({k: summary[k] for k in RUN_METRICS if summary.get(k) is not None})
    record = summary.get("strategy_record")
    if record:
        # What the strategy decided while training (a schedule's periods, a mask's density,
        # when each layer froze): the whole record as a file, its short entries as tags.
        run.log_dict(record, "strategy_record.json")
        short = {k: json.dumps(v) for k, v in record.items() if len(json.dumps(v)) <= 500}
        run.set_tags({f"adaptune.strategy.{k}": v for k, v in short.items()})
    for path in (job.inputs.get("plan"), job.outputs["history"], job.outputs["settings"]):
        if path:
            run.log_artifact(path)
    for path in job.artifacts.values():
        run.log_artifact(path, "importance")
    run.logged("finetune")
