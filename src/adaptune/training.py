"""The training loop: a model fine-tuned under a freeze plan with cross-entropy, the configured
optimizer over the plan's parameter groups, the strategy's lr schedule (warm-up then linear decay
unless its kind says otherwise), validation after every epoch, and the best epoch's weights kept.

:func:`train` runs it; :class:`TrainingLoop` is its state, in three parts a reader can take one
at a time: setup (``__init__``: groups, optimizer, schedule, hooks, examples, the frozen-prefix
cache), one epoch of optimizer steps (:meth:`TrainingLoop.run_epoch`) and validation
(:meth:`TrainingLoop.validate`). The loop knows no strategy kind by name: what a kind does beyond
its plan comes from its training hooks (:mod:`adaptune.strategies`), and which tensors train in
which epoch is the plan. The ``finetune`` stage around it is :mod:`adaptune.finetune`.

All the state of a run lives on its :class:`TrainingLoop`; :meth:`TrainingLoop.state_dict` and
:meth:`TrainingLoop.load_state_dict` are what a checkpoint saves and a resumed run takes back
(:mod:`adaptune.checkpoints`), at an epoch's end or within an epoch, so that the continuation
draws the same batches and random numbers as a run never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from adaptune import distributed, memory, strategies
from adaptune.checkpoints import Checkpoints, StopRequest
from adaptune.devices import autocast
from adaptune.errors import ConfigError
from adaptune.evaluation import classification_metrics, predict
from adaptune.memory import checkpointed_blocks, out_of_memory
from adaptune.modalities import Batch, TaskModel, loader
from adaptune.optim import MasterWeights, apply_plan, build_optimizer, param_groups, state_bytes
from adaptune.plans import Plan
from adaptune.prefix import PrefixCache, PrefixState
from adaptune.settings import TrainSettings
from adaptune.strategies import TrainingContext

log = logging.getLogger(__name__)

FEW_STEPS = 20  # fewer optimizer steps than this in a run: its result says little


@dataclass
class TrainResult:
    """What a run did: its history (a row per epoch), what trained, its best epoch, its
    training seconds, where it stopped (``stopped_epoch``: the last epoch it ran, fewer than
    planned when early stopping stopped it; ``seconds_saved``: the epochs it skipped, at its
    mean epoch time), the most its optimizer state held, its peak memory, and what its
    strategy decided while it ran."""

    history: pd.DataFrame
    trainable_params: int
    best_epoch: int
    best_val_macro_f1: float
    train_seconds: float
    optimizer_groups: int
    warnings: list[str] = field(default_factory=list)
    stopped_epoch: int = 0
    seconds_saved: float = 0.0
    optimizer_state_bytes: int = 0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    # What the strategy's hooks decided during the run (:meth:`TrainingHooks.record`).
    strategy_record: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The state of every random number generator a training step may draw from: Python's,
    NumPy's and torch's (the device's too, on CUDA), as tensors and plain values."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`."""
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def set_frozen_batchnorm_eval(model: nn.Module) -> None:
    """Put every BatchNorm layer whose parameters are all frozen into eval mode: it keeps its
    pretrained running statistics instead of re-estimating them from small few-shot batches."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


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


def to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy on the CPU, whole (a DTensor's shards gathered)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", copy=True)


def optimizer_state_on_cpu(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with its state tensors whole and on the CPU."""
    saved = optimizer.state_dict()
    saved["state"] = {
        index: {k: to_cpu(v) if torch.is_tensor(v) else v for k, v in values.items()}
        for index, values in saved["state"].items()
    }
    return saved


def like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A whole tensor ``value`` (from a checkpoint) as ``target`` holds it: on its device, in
    its dtype, and under FSDP as its shard of this rank (a DTensor placed like ``target``)."""
    value = value.to(target.device, target.dtype)
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        # Each rank read the whole tensor: it keeps its shard, with no communication.
        return distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
    return value


def optimizer_state_like(saved: dict[str, Any], stepped: list[torch.Tensor]) -> dict[str, Any]:
    """:func:`optimizer_state_on_cpu`'s state as the optimizer over ``stepped`` (in its order,
    which the state's indices follow) holds it: shards under FSDP, as they are otherwise."""
    if not any(hasattr(t, "device_mesh") for t in stepped):
        return saved
    state = {
        index: {
            k: like(v, stepped[int(index)]) if torch.is_tensor(v) and v.dim() else v
            for k, v in values.items()
        }
        for index, values in saved["state"].items()
    }
    return {**saved, "state": state}


# What a strategy's hooks may do that FSDP's shards do not allow: add tensors, read or change
# gradients, weights or optimizer state.
ACTING_HOOKS = ("extra_groups", "start", "on_step_start", "before_step", "after_step", "finish")


def check_shardable(hooks: strategies.TrainingHooks, settings: TrainSettings) -> None:
    """Refuse ``train.sharding: fsdp`` for what it cannot serve, naming the fix: hooks that act
    on tensors (each rank holds a shard of each), and bf16 weights with fp32 masters."""
    base = strategies.TrainingHooks
    acting = [n for n in ACTING_HOOKS if getattr(type(hooks), n) is not getattr(base, n)]
    if acting:
        raise ConfigError(
            f"train.sharding = 'fsdp': this strategy's training hooks act on tensors "
            f"({', '.join(acting)}), which FSDP splits over the processes; use train.sharding: "
            "ddp for this strategy (its train: block)"
        )
    if settings.weight_precision == "bf16":
        raise ConfigError(
            "train.sharding = 'fsdp' with train.weight_precision = 'bf16' is not supported; "
            "use weight_precision fp32 (precision bf16 still computes in bfloat16)"
        )


class TrainingLoop:
    """The state of one fine-tuning run of ``task.model`` under ``plan``.

    Setup (here) applies the plan, builds the parameter groups (:mod:`adaptune.optim`), the
    optimizer and the strategy's schedule, starts its hooks, and makes the examples: the
    training split's (augmented from ``seed``) and the validation split's (the same object when
    a run validates on its own training split, as the head probe does, so it is cached once).
    In a process group (:mod:`adaptune.distributed`) each process trains on its slice of every
    global batch of ``settings.batch_size``, DDP averages the gradients, and rank 0 validates.
    """

    def __init__(
        self,
        task: TaskModel,
        plan: Plan,
        train: pd.DataFrame,
        val: pd.DataFrame,
        settings: TrainSettings,
        seed: int,
        device: torch.device,
        workers: int = 0,
        checkpoints: Checkpoints | None = None,
    ) -> None:
        seed_everything(seed)
        self.task, self.plan, self.settings, self.device = task, plan, settings, device
        self.world = distributed.current()
        self.workers = workers
        self.hooks = strategies.hooks_for(plan, settings)
        sharding = settings.sharding if self.world.size > 1 else "ddp"
        if sharding == "fsdp":
            check_shardable(self.hooks, settings)
            settings = dataclasses.replace(settings, feature_cache="off")
        else:
            # bf16 weights: the whole model in bfloat16; trainable tensors keep fp32 masters.
            task.model.to(device, torch.bfloat16 if settings.weight_precision == "bf16" else None)
        # FSDP shards the model (onto the device) before the optimizer is built over its
        # parameters; DDP wraps it at the first step.
        self.replicas = distributed.Replicas(task.model, self.world, device, sharding, task.head)
        self.context = TrainingContext(task, plan, train, settings, device)
        self.train_count = len(train)
        self.steps_per_epoch = -(-len(train) // settings.batch_size)
        self._build_optimizer(settings)
        self.hooks.start(self.context)
        self.checkpointing = checkpointed_blocks(
            task.model, task.head, settings.gradient_checkpointing
        )
        self.checkpointing.__enter__()
        self._make_examples(train, val, settings, seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[dict[str, float]] = []
        self.best: tuple[float, int, list[torch.Tensor]] | None = None
        self.train_seconds = 0.0
        self.num_labels = 0
        self.global_step = 0
        self.state_bytes = 0
        self.throughput: dict[str, float] = {}
        self.checkpoints = checkpoints
        self.stop = StopRequest()
        # Patience counts from the epoch the plan's last tensor starts to train: earlier
        # epochs are phases (a probe, frozen epochs, thaws), not a plateau.
        self.last_phase = max((t.unfreeze_epoch for t in plan.tensors if not t.frozen), default=1)
        memory.reset_peak(device)
        log.info(
            "%d optimizer group(s), %d trainable tensors, %d steps per epoch on %s%s",
            len(self.groups),
            len(self.trainable),
            self.steps_per_epoch,
            device,
            f" x {self.world.size} processes" if self.world.size > 1 else "",
        )

    def _build_optimizer(self, settings: TrainSettings) -> None:
        """The parameter groups (the plan's, and any the strategy adds), the fp32 masters of
        bf16 weights, the optimizer over them and the strategy's learning-rate schedule."""
        groups = param_groups(
            self.task.model,
            self.plan,
            settings.weight_decay,
            settings.decay_norm_and_bias,
            per_tensor=self.hooks.per_tensor_groups,
        )
        self.groups = groups + self.hooks.extra_groups(self.context)
        self.trainable = [p for g in self.groups for p in g["params"]]
        self.masters = MasterWeights(self.groups) if settings.weight_precision == "bf16" else None
        stepped = self.masters.groups if self.masters else self.groups
        # The tensors the optimizer steps: the trainable ones, or their fp32 masters.
        self.stepped = [p for g in stepped for p in g["params"]]
        self.optimizer = build_optimizer(stepped, settings)
        schedule = self.hooks.schedule(self.steps_per_epoch * settings.epochs, self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.context.optimizer, self.context.scheduler = self.optimizer, self.scheduler
        self.context.groups = self.groups

    def _make_examples(
        self, train: pd.DataFrame, val: pd.DataFrame, settings: TrainSettings, seed: int
    ) -> None:
        """The training split's examples (augmented from ``seed``), the validation split's
        (the same object when a run validates on its own training split), and the frozen-prefix
        cache over them, off for a strategy that changes what trains within an epoch."""
        modality = self.task.modality
        self.train_examples = modality.examples(train, settings.augment, seed)
        same = val is train and not settings.augment
        self.val_examples = self.train_examples if same else modality.examples(val)
        self.val_labels = val["label_id"].to_numpy()
        self.prefix = PrefixState(
            self.task, settings, self.train_examples, self.val_examples, self.device
        )
        if self.hooks.switches_within_epoch and self.prefix.enabled:
            log.info("feature cache off: %s changes what trains within an epoch", self.plan.kind)
            self.prefix.enabled = False

    # --- one epoch ------------------------------------------------------------------------

    def run_epoch(
        self, epoch: int, partial: dict[str, Any] | None = None
    ) -> list[dict[str, float]]:
        """One pass over the training split; returns its optimizer steps (``step`` counted
        over the run, ``train_loss_step``, and ``lr``: the base rate that step used). The time
        it takes, the frozen-prefix cache's building included, counts as training time.
        ``partial`` is the part of the epoch a checkpoint within it saved: its steps are not
        run again, and the random state continues from the checkpoint's."""
        if self.plan.totals["scheduled_tensors"]:
            apply_plan(self.task.model, self.plan, epoch)
            trains = sum(p.requires_grad for p in self.trainable)
            log.info("epoch %d: %d tensors train", epoch, trains)
        start = time.perf_counter() - (partial["seconds"] if partial else 0.0)
        if partial:
            # The epoch's order is drawn from the shuffle's state at the epoch's start.
            self.generator.set_state(partial["generator"])
        self.epoch_generator = self.generator.get_state()
        cache = self.prefix.refresh()
        model = self.task.model
        model.train()
        if self.settings.frozen_batchnorm == "eval":
            set_frozen_batchnorm_eval(model)
        self.train_examples.set_epoch(epoch)
        world = self.world
        first = partial["steps_done"] if partial else 0
        batches = iter(
            loader(
                self.train_examples,
                self.settings.batch_size,
                shuffle=True,
                generator=self.generator,
                workers=self.workers,
                pin_memory=self.device.type == "cuda",
                shard=(lambda rows: distributed.shard(rows, world)) if world.size > 1 else None,
                start=first,
            )
        )
        # One more draw from torch's global generator, as the loop of adaptune's earlier
        # versions made: its progress bar took a second iterator of the loader, and each draws
        # a base seed. Without it the dropout masks differ from the first step, and so would
        # every result measured before (traced and checked byte for byte on 2026-12-01).
        torch.empty((), dtype=torch.int64).random_()
        steps = list(partial["rows"]) if partial else []
        if partial:
            set_rng_state(partial["rng"], self.device)  # after the loader drew its seed
        progress = tqdm(
            batches,
            total=self.steps_per_epoch,
            initial=first,
            desc=f"epoch {epoch}",
            mininterval=10,
        )
        with cache.replaying() if cache else contextlib.nullcontext():
            for step, batch in enumerate(progress, start=first):
                steps.append(self.step(batch, cache, step))
                if self.checkpoint_due(last=step + 1 == self.steps_per_epoch):
                    seconds = time.perf_counter() - start
                    self.save_checkpoint(epoch, step + 1, steps, seconds)
                    self.stop_if_asked()
        # Under DDP each rank's loss is its share of the global batch's mean times the ranks;
        # its tokens are its own.
        losses = distributed.all_sum([s["train_loss_step"] for s in steps], world, self.device)
        tokens = distributed.all_sum([s.pop("tokens") for s in steps], world, self.device)
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        self.throughput = {"train_examples_per_second": self.train_count / seconds}
        if sum(tokens):
            self.throughput["train_tokens_per_second"] = sum(tokens) / seconds
        for row, loss in zip(steps, losses, strict=True):
            row["train_loss_step"] = loss / world.size
        return steps

    def step(self, batch: Batch, cache: PrefixCache | None, step: int) -> dict[str, float]:
        """One optimizer step on a batch (``step``: its place in the epoch); returns its row:
        ``step`` (counted over the run), ``train_loss_step``, ``lr`` (the base rate it used),
        ``grad_norm`` (of the gradient it applied, before clipping) and ``tokens`` (the real
        tokens of its texts, 0 for images)."""
        settings = self.settings
        self.hooks.on_step_start(self.global_step)
        replica = self.replicas.sync()  # DDP wrapped again if the trainable set changed
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not None:
            for param in self.trainable:
                param.grad = None
        global_count = min(settings.batch_size, self.train_count - step * settings.batch_size)
        loss = self.accumulate(replica, batch, cache, global_count)
        if self.masters is not None:
            self.masters.take_gradients()
        self.hooks.before_step(first_step_of_epoch=step == 0)
        stepped = [p.grad for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.get_total_norm([g for g in stepped if g is not None])
        if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm of the whole gradient
            grad_norm = grad_norm.full_tensor()
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]],
                settings.max_grad_norm,
                grad_norm,
            )
        self.optimizer.step()
        if self.masters is not None:
            self.masters.give_weights()
        self.state_bytes = max(self.state_bytes, state_bytes(self.optimizer))
        self.hooks.after_step(self.global_step)
        row = {
            "step": self.global_step + 1,  # optimizer steps taken, this one included
            "train_loss_step": loss,
            "lr": settings.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch),
            "grad_norm": float(grad_norm),
            "tokens": float(batch["attention_mask"].sum()) if "attention_mask" in batch else 0.0,
        }
        self.scheduler.step()
        self.global_step += 1
        return row

    def accumulate(
        self, replica: nn.Module, batch: Batch, cache: PrefixCache | None, global_count: int
    ) -> float:
        """Forward and backward passes over ``batch`` in ``train.accumulate_steps``
        micro-batches, their gradients summed; each micro-batch's loss is weighed by its
        examples (:func:`step_loss`), so the sum is the gradient of the whole batch's mean
        loss however it was split. Under DDP only the last backward pass communicates.
        Returns the batch's loss (its share on this rank, under DDP)."""
        device, modality = self.device, self.task.modality
        count = len(batch["labels"])
        size = -(-count // self.settings.accumulate_steps)
        starts = list(range(0, count, size))
        total = 0.0
        for start in starts:
            micro = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if len(starts) > 1:
                micro = modality.sub_batch(micro, start, start + size)
            if cache is not None:
                cache.current = cache.features("train", micro, device)
            last = start == starts[-1]
            # A fresh context for each use: DDP's and FSDP's are generators, good for one block.
            syncing = contextlib.nullcontext if last else self.replicas.no_sync
            with syncing(), autocast(device, self.settings.compute_precision):
                logits = modality.forward(replica, micro)
            loss = step_loss(logits, micro["labels"], global_count, self.world)
            if self.world.size == 1 and len(starts) > 1:
                # One process: the micro-batch's mean loss, weighed by its share of the batch.
                loss = loss * (len(micro["labels"]) / global_count)
            with syncing():
                loss.backward()
            total += float(loss.detach())
        return total

    # --- validation -----------------------------------------------------------------------

    def validate(self, epoch: int, steps: list[dict[str, float]]) -> dict[str, float]:
        """The epoch's row of the history: its mean training loss and, computed on rank 0 and
        shared with every rank, the validation loss, accuracy and macro-F1."""
        row = None
        # Under FSDP every rank runs the forward passes (each gathers the shards of all).
        if self.world.is_main or self.replicas.sharded:
            settings = self.settings
            cache = self.prefix.cache
            logits = predict(
                self.task,
                self.val_examples,
                settings.eval_batch_size,
                self.device,
                settings.compute_precision,
                cache,
                "val",
            )
            self.num_labels = int(logits.shape[1])
            labels = self.val_labels
            scores = classification_metrics(labels, logits.argmax(1), self.num_labels)
            val_loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.tensor(labels))
        if self.world.is_main:
            row = {
                "epoch": epoch,
                "train_loss": float(np.mean([s["train_loss_step"] for s in steps])),
                "val_loss": float(val_loss),
                "val_accuracy": scores["accuracy"],
                "val_macro_f1": scores["macro_f1"],
                # The base rate of the epoch's last step; each group trains at this x its
                # multiplier.
                "lr": steps[-1]["lr"],
                **self.throughput,
            }
        row, self.num_labels = distributed.from_main((row, self.num_labels), self.world)
        log.info(
            "epoch %d: train_loss %.4f val_loss %.4f val_acc %.4f val_macro_f1 %.4f",
            epoch,
            row["train_loss"],
            row["val_loss"],
            row["val_accuracy"],
            row["val_macro_f1"],
        )
        return row

    def keep_if_best(self, row: dict[str, float]) -> None:
        """Record the epoch's row; keep a copy of the trainable tensors if its validation
        macro-F1 is the best so far (ties: the earlier epoch). Frozen tensors never change, so
        only trainable ones are copied."""
        self.history.append(row)
        self.hooks.on_epoch_end(int(row["epoch"]), row)
        if self.best is None or row["val_macro_f1"] > self.best[0]:
            copies = [p.detach().clone() for p in self.stepped]
            self.best = (row["val_macro_f1"], int(row["epoch"]), copies)

    def should_stop(self, epoch: int) -> bool:
        """Early stopping (``train.early_stopping``): no epoch since the plan's last phase
        began (:attr:`last_phase`) beat the best before it by more than ``min_delta`` for
        ``patience`` epochs."""
        rule = self.settings.early_stopping
        if not rule.enabled or epoch - self.last_phase + 1 <= rule.patience:
            return False
        scores = [r["val_macro_f1"] for r in self.history]
        before = max(scores[: epoch - rule.patience])
        recent = max(scores[epoch - rule.patience :])
        return recent <= before + rule.min_delta

    # --- checkpoints ----------------------------------------------------------------------

    def checkpoint_due(self, last: bool = False) -> bool:
        """After an optimizer step: whether to save a checkpoint now, because SIGTERM came
        (on any rank) or the step interval is up (not at an epoch's ``last`` step: the
        epoch's end saves one anyway)."""
        if self.checkpoints is None:
            return False
        asked = distributed.any_rank(self.stop.requested, self.world, self.device)
        self.stop.requested = asked
        return asked or (not last and self.checkpoints.due(self.global_step))

    def epoch_checkpoint_due(self, last: bool = False) -> bool:
        """At an epoch's end: whether to save a checkpoint now, because SIGTERM came (on any
        rank), the epoch is the run's ``last`` or it ends an interval
        (:meth:`Checkpoints.due_at_epoch_end`, by rank 0's clock: the ranks save together)."""
        if self.checkpoints is None:
            return False
        timely = last or self.checkpoints.due_at_epoch_end(self.global_step)
        return self.checkpoint_due(last=True) or distributed.from_main(timely, self.world)

    def stop_if_asked(self) -> None:
        """After a checkpoint: end the job if SIGTERM asked for it."""
        if self.stop.requested:
            self.prefix.close()
            self.stop.deliver()

    def save_checkpoint(
        self,
        epoch: int,
        steps_done: int,
        rows: list[dict[str, float]],
        seconds: float,
        pending: dict[str, Any] | None = None,
    ) -> None:
        """Save the run's state (every rank takes part; rank 0 writes): within ``epoch``
        after ``steps_done`` of its steps (``rows``, ``seconds`` of it so far), or after it
        (``steps_done`` = 0) with the rows it still has to log (``pending``)."""
        began = time.perf_counter()
        done = steps_done == 0
        ranks = distributed.gather_on_main(
            {"rng": rng_state(self.device), "rows": [] if done else rows}, self.world
        )
        # Under FSDP every rank takes part in gathering the shards; under DDP rank 0's suffice.
        state = self.state_dict() if self.world.is_main or self.replicas.sharded else {}
        if not self.world.is_main or self.checkpoints is None:
            return
        state.update(
            epoch=epoch,
            epoch_done=done,
            steps_done=steps_done,
            seconds=seconds,
            generator=self.generator.get_state() if done else self.epoch_generator,
            ranks=ranks,
            pending=pending or {},
        )
        written = self.checkpoints.save(state)
        # what gathering and copying the state took, besides writing it
        self.checkpoints.seconds += time.perf_counter() - began - written

    def state_dict(self) -> dict[str, Any]:
        """What the run holds that changes as it trains, on the CPU: the trainable tensors
        (by name) and the model's buffers (BatchNorm statistics), the fp32 masters, the
        optimizer, the schedule, the strategy's hooks, the history, the best epoch's copies,
        the step count and the time and memory counted so far."""
        names = [n for g in self.groups for n in g["names"]]
        best = None
        if self.best is not None:
            best = [self.best[0], self.best[1], [to_cpu(t) for t in self.best[2]]]
        return {
            "trainable": {n: to_cpu(p) for n, p in zip(names, self.trainable, strict=True)},
            "buffers": {n: to_cpu(b) for n, b in self.task.model.named_buffers()},
            "masters": [to_cpu(m) for m in self.stepped] if self.masters else None,
            "optimizer": optimizer_state_on_cpu(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "hooks": self.hooks.state_dict(),
            "history": self.history,
            "best": best,
            "global_step": self.global_step,
            "train_seconds": self.train_seconds,
            "state_bytes": self.state_bytes,
            "num_labels": self.num_labels,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        """Take back a checkpoint's state; returns the epoch to run next and, for a
        checkpoint within an epoch, that epoch's saved part (for :meth:`run_epoch`)."""
        names = [n for g in self.groups for n in g["names"]]
        for name, param in zip(names, self.trainable, strict=True):
            param.copy_(like(state["trainable"][name], param))
        buffers = dict(self.task.model.named_buffers())
        for name, value in state["buffers"].items():
            buffers[name].copy_(value)
        if self.masters is not None:
            for master, value in zip(self.stepped, state["masters"], strict=True):
                master.copy_(value)
        self.optimizer.load_state_dict(optimizer_state_like(state["optimizer"], self.stepped))
        self.scheduler.load_state_dict(state["scheduler"])
        self.hooks.load_state_dict(state["hooks"])
        self.history = list(state["history"])
        if state["best"] is not None:
            f1, best_epoch, copies = state["best"]
            copies = [like(c, t) for c, t in zip(copies, self.stepped, strict=True)]
            self.best = (f1, best_epoch, copies)
        self.global_step = state["global_step"]
        self.train_seconds = state["train_seconds"]
        self.state_bytes = state["state_bytes"]
        self.num_labels = state["num_labels"]
        mine = state["ranks"][self.world.rank]
        epoch = state["epoch"]
        if not state["epoch_done"]:
            partial = {
                "steps_done": state["steps_done"],
                "rows": mine["rows"],
                "seconds": state["seconds"],
                "generator": state["generator"],
                "rng": mine["rng"],
            }
            log.info(
                "resumed from epoch %d, step %d of %d",
                epoch,
                state["steps_done"],
                self.steps_per_epoch,
            )
            return epoch, partial
        self.generator.set_state(state["generator"])
        set_rng_state(mine["rng"], self.device)
        log.info("resumed from epoch %d (the next is epoch %d)", epoch, epoch + 1)
        return epoch + 1, None

    # --- the end --------------------------------------------------------------------------

    def finish(self, restore_best: bool) -> TrainResult:
        """Free the cache and DDP, restore the best epoch's weights (unless ``restore_best`` is
        False: a probe trained for a set number of epochs keeps its last), let the hooks leave
        the model saveable, and sum up."""
        self.prefix.close()
        self.replicas.close()
        assert self.best is not None, "finish() before any epoch"
        best_f1, best_epoch, saved = self.best
        if self.masters is not None:
            self.task.model.float()  # saved and evaluated in fp32, like any run
        if restore_best:
            self.load_trainable(saved)
            log.info(
                "best epoch %d (val macro-F1 %.4f); %d tensors restored",
                best_epoch,
                best_f1,
                len(self.trainable),
            )
        elif self.masters is not None:
            self.load_trainable(self.stepped)  # the last epoch's, at the masters' precision
        if self.replicas.sharded:
            # Rank 0 goes on with the whole model, unsharded, on the CPU (it saves it).
            whole = self.replicas.gather()
            if whole is not None:
                self.task.model = whole
        self.hooks.finish(self.context)
        ran = len(self.history)
        epoch_seconds = float(np.mean([r["epoch_seconds"] for r in self.history]))
        peak, kind = memory.peak_bytes(self.device)
        return TrainResult(
            history=pd.DataFrame(self.history),
            trainable_params=self.hooks.trained_params(sum(p.numel() for p in self.trainable)),
            best_epoch=best_epoch,
            best_val_macro_f1=best_f1,
            train_seconds=self.train_seconds,
            optimizer_groups=len(self.groups),
            warnings=training_warnings(
                self.global_step, self.history[-1]["train_loss"], self.num_labels
            ),
            stopped_epoch=ran,
            seconds_saved=(self.settings.epochs - ran) * epoch_seconds,
            optimizer_state_bytes=self.state_bytes,
            peak_memory_bytes=peak,
            peak_memory_kind=kind,
            strategy_record=self.hooks.record(),
        )

    @torch.no_grad()
    def load_trainable(self, tensors: list[torch.Tensor]) -> None:
        for param, value in zip(self.trainable, tensors, strict=True):
            param.copy_(value)

    def close(self) -> None:
        """Free what the loop holds outside the model (the cache's files, the checkpointing
        wrappers), also on an error."""
        self.prefix.close()
        self.replicas.close()
        self.checkpointing.__exit__(None, None, None)


def train(
    task: TaskModel,
    plan: Plan,
    train: pd.DataFrame,
    val: pd.DataFrame,
    settings: TrainSettings,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_steps: Callable[[list[dict[str, float]]], None] | None = None,
    workers: int = 0,
    restore_best: bool = True,
    checkpoints: Checkpoints | None = None,
    resume: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``task.model`` in place under ``plan`` for ``settings.epochs`` (see
    :class:`TrainingLoop`); on return it holds the weights of the epoch with the best
    validation macro-F1, or with ``restore_best=False`` those of the last epoch.

    ``on_steps`` receives each epoch's optimizer steps, ``on_epoch`` its row of the history
    (on every rank: tracking is rank 0's caller's business). ``workers`` processes prepare the
    training batches.

    With ``checkpoints`` (:mod:`adaptune.checkpoints`), the run saves its state after an
    epoch that ends its interval (every epoch, or the first ``every_seconds`` after the last
    save; before the epoch's rows go to the callbacks: the checkpoint holds them as
    ``pending`` until they are logged), at the step interval, and on SIGTERM (after the step
    it is in; then the signal takes its course). Rows logged after the last save are logged
    again by a resumed run: its callbacks must log each (metric, step) once. ``resume`` is
    such a state (rank 0's, as :meth:`Checkpoints.load` found it; the other ranks read the
    same file): the run continues where it was saved."""
    loop = TrainingLoop(task, plan, train, val, settings, seed, device, workers, checkpoints)
    try:
        first, partial = 1, None
        if distributed.from_main(resume is not None, loop.world):
            if resume is None and checkpoints is not None:
                resume = checkpoints.read()
            first, partial = loop.load_state_dict(resume)
            if partial is None and loop.should_stop(first - 1):
                first = settings.epochs + 1  # it had stopped early: nothing left to run
        with loop.stop if checkpoints is not None else contextlib.nullcontext():
            for epoch in range(first, settings.epochs + 1):
                started = time.perf_counter() - (partial["seconds"] if partial else 0.0)
                steps = loop.run_epoch(epoch, partial)
                partial = None
                row = loop.validate(epoch, steps)
                row["epoch_seconds"] = time.perf_counter() - started
                loop.keep_if_best(row)
                pending = {"steps": steps, "epoch": row}
                stopping = loop.should_stop(epoch)
                # (The last epoch saves one anyway: a kill while the job saves its outputs and
                # logs its model then costs no training.)
                saved = loop.epoch_checkpoint_due(last=epoch == settings.epochs or stopping)
                if saved:
                    loop.save_checkpoint(epoch, 0, steps, 0.0, pending)
                if on_steps is not None:
                    on_steps(steps)
                if on_epoch is not None:
                    on_epoch(row)
                if checkpoints is not None and loop.checkpoint_due(last=True):
                    if not saved:  # SIGTERM came while the epoch's rows were logged
                        loop.save_checkpoint(epoch, 0, steps, 0.0, pending)
                    loop.stop_if_asked()
                if stopping:
                    log.info(
                        "early stopping after epoch %d: no gain above %g in %d epochs",
                        epoch,
                        settings.early_stopping.min_delta,
                        settings.early_stopping.patience,
                    )
                    break
        return loop.finish(restore_best)
    except (torch.OutOfMemoryError, MemoryError) as err:
        raise out_of_memory(device, settings.batch_size, str(err).splitlines()[0]) from err
    except RuntimeError as err:
        if "can't allocate memory" not in str(err):  # the CPU allocator's words
            raise
        raise out_of_memory(device, settings.batch_size, str(err).splitlines()[0]) from err
    finally:
        loop.close()
