"""Data-parallel fine-tuning (adaptune.distributed) and GPU assignment (adaptune.devices) on the
CPU: two Gloo processes started by the real torchrun launcher train the tiny BERT and must take
the same steps as one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import adaptune
from adaptune import devices, distributed, training
from adaptune.checkpoints import Checkpoints
from adaptune.distributed import World
from adaptune.errors import ConfigError
from adaptune.plans import Plan, TensorPlan
from adaptune.settings import TrainSettings

from .conftest import REPO, tiny_task
from .test_training import frame

# 15 examples in global batches of 7: 7, 7, 1. Two ranks take 4 + 3, 4 + 3, then 1 + none (the
# second rank runs the first example again, weighed 0): uneven splits and an empty share.
EXAMPLES, BATCH, EPOCHS = 15, 7, 2


def train_settings(sharding: str = "ddp") -> TrainSettings:
    return TrainSettings.from_config(
        {
            "optimizer": "adamw",
            "lr": 1e-2,
            "epochs": EPOCHS,
            "batch_size": BATCH,
            "device": "cpu",
            "sharding": sharding,
        }
    )


def thawing_plan(model: nn.Module) -> Plan:
    """Embeddings and block 0 frozen for the run (a frozen prefix the feature cache serves),
    block 1 thawing in epoch 2 (the trainable set changes: DDP must wrap again), the pooler and
    head training from epoch 1."""

    def tensor(name: str, size: int) -> TensorPlan:
        frozen = name.startswith(("bert.embeddings", "bert.encoder.layer.0."))
        thaw = 2 if name.startswith("bert.encoder.layer.1.") else 1
        return TensorPlan(name, "l", 0, size, frozen, 1.0, "", thaw)

    return Plan("thaw", "full", [tensor(n, p.numel()) for n, p in model.named_parameters()])


def without_dropout(model: nn.Module) -> None:
    """Dropout draws different masks in one process and in two (each rank its own), so the
    comparison is made without it."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a tensor, whole (a DTensor's shards gathered, every rank taking part)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def train_once(
    model_dir: str, sharding: str = "ddp", **checkpointing: Any
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
    """The weights before, the weights after the last epoch (before the best epoch's are
    restored, which could hide what the last epoch did) and the history; ``checkpointing``:
    train's ``checkpoints`` and ``resume``."""
    task = tiny_task(Path(model_dir), ["a", "b", "c"])
    without_dropout(task.model)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    after: dict[str, torch.Tensor] = {}

    def keep(row: dict[str, float]) -> None:
        after.update({n: whole(p) for n, p in task.model.named_parameters()})

    result = training.train(
        task,
        thawing_plan(task.model),
        frame(EXAMPLES, 0),
        frame(9, 1),
        train_settings(sharding),
        0,
        torch.device("cpu"),
        on_epoch=keep,
        **checkpointing,
    )
    return before, after, result.history


def naive_mean_loss(logits, labels, global_count, world):
    """What a plain DDP port does: each rank's own batch mean, whatever its share."""
    return nn.functional.cross_entropy(logits.float(), labels)


def train_in_group(job: dict[str, Any]) -> None:
    """Run by each torchrun worker: the correct run, then two deliberately wrong ones (each
    rank's plain batch mean as its loss; DDP never wrapped again when block 1 thaws)."""
    world = distributed.current()
    assert world.size == 2 and dist_backend() == "gloo"
    results: dict[str, Any] = {"correct": train_once(job["model_dir"])[1:]}
    right_loss = training.step_loss
    training.step_loss = naive_mean_loss
    try:
        results["naive_mean"] = train_once(job["model_dir"])[1:]
    finally:
        training.step_loss = right_loss
    right_sync = distributed.Replicas.sync

    def wrap_once(self: distributed.Replicas) -> nn.Module:
        return self.wrapped or right_sync(self)

    distributed.Replicas.sync = wrap_once
    try:
        results["no_rewrap"] = train_once(job["model_dir"])[1:]
    finally:
        distributed.Replicas.sync = right_sync
    torch.save(results, Path(job["out"]) / f"rank{world.rank}.pt")


def dist_backend() -> str:
    return torch.distributed.get_backend()


@pytest.fixture
def workers(monkeypatch):
    """torchrun workers import this module (their targets) and the adaptune under test."""
    source = str(Path(adaptune.__file__).parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), source]))
    monkeypatch.chdir(REPO)


def test_shards_split_every_global_batch_exactly():
    for count in range(1, 12):
        for size in (1, 2, 3):
            worlds = [World(rank, size) for rank in range(size)]
            rows = list(range(100, 100 + count))
            shares = [distributed.share(count, w) for w in worlds]
            assert [r for start, stop in shares for r in rows[start:stop]] == rows
            assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1
            # per-example weight: each example of the global batch counts 1/count in the mean
            weights = [distributed.loss_weight(count, w) / size for w in worlds]
            assert sum((b - a) * wt for (a, b), wt in zip(shares, weights, strict=True)) == (
                pytest.approx(1.0)
            )
            assert all(distributed.shard(rows, w) for w in worlds)  # nobody skips a backward


def test_two_gloo_processes_take_the_steps_of_one(tiny_bert_dir, tmp_path, workers):
    start = time.perf_counter()
    distributed.launch(
        2,
        "tests.test_distributed:train_in_group",
        {"model_dir": str(tiny_bert_dir), "out": str(tmp_path), "device": "cpu"},
    )
    print(f"2 processes: {time.perf_counter() - start:.1f} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    before, single, single_history = train_once(str(tiny_bert_dir))
    ddp, ddp_history = ranks[0]["correct"]
    frozen = [n for n in single if n.startswith(("bert.embeddings", "bert.encoder.layer.0."))]
    thawed = [n for n in single if n.startswith("bert.encoder.layer.1.")]
    assert frozen and thawed
    for name, value in single.items():
        if name in frozen:
            assert torch.equal(ddp[name], before[name]), name  # bit-identical
        else:
            assert not torch.equal(value, before[name]), name  # it trained
            torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-5, msg=name)
        # both replicas hold the same weights
        assert torch.equal(ranks[1]["correct"][0][name], ddp[name]), name
    for column in ("train_loss", "val_loss", "val_macro_f1"):
        assert ddp_history[column].to_numpy() == pytest.approx(
            single_history[column].to_numpy(), rel=1e-5, abs=1e-6
        ), column

    # The test can fail: each rank's plain mean loss, or DDP left as it was built while block 1
    # thaws, trains other weights.
    def gap(weights: dict[str, torch.Tensor], names: list[str]) -> float:
        return max(float((weights[n] - single[n]).abs().max()) for n in names)

    naive, stale = ranks[0]["naive_mean"][0], ranks[0]["no_rewrap"][0]
    print(
        f"largest weight gap to one process: DDP {gap(ddp, list(single)):.2e}, plain mean "
        f"loss {gap(naive, list(single)):.2e}, never re-wrapped {gap(stale, thawed):.2e}"
    )
    assert gap(naive, list(single)) > 1e-3
    assert gap(stale, thawed) > 1e-3


class Killed(Exception):
    """A run stopped as a kill would stop it."""


def train_sharded_in_group(job: dict[str, Any]) -> None:
    """Run by each torchrun worker: FSDP without a stop; then FSDP killed in epoch 2 after the
    checkpoint of epoch 1, and resumed from it; each rank saves what it saw."""
    world = distributed.current()
    assert world.size == 2 and dist_backend() == "gloo"
    results: dict[str, Any] = {"whole": train_once(job["model_dir"], "fsdp")[1:]}
    saved = Checkpoints(Path(job["out"]) / "checkpoint", {"job": "fsdp"})
    step = training.TrainingLoop.step

    def killable(loop: training.TrainingLoop, *args: Any, **kwargs: Any) -> dict:
        if loop.global_step == job["kill_at"]:
            raise Killed
        return step(loop, *args, **kwargs)

    training.TrainingLoop.step = killable
    try:
        train_once(job["model_dir"], "fsdp", checkpoints=saved)
    except Killed:
        results["killed"] = True
    finally:
        training.TrainingLoop.step = step
    resume = saved.load() if world.is_main else None
    results["resumed"] = train_once(job["model_dir"], "fsdp", checkpoints=saved, resume=resume)[1:]
    torch.save(results, Path(job["out"]) / f"rank{world.rank}.pt")


def test_fsdp_on_two_gloo_processes_takes_the_steps_of_one_and_resumes(
    tiny_bert_dir, tmp_path, workers
):
    """FSDP2 (fully_shard) on a Gloo CPU mesh: frozen tensors stay bit-identical, the others
    end as one process leaves them (block 1 thawing in epoch 2), a run killed after a
    checkpoint resumes bit-identical to the one never stopped, and its checkpoint holds whole
    tensors, which one process loads."""
    start = time.perf_counter()
    steps_per_epoch = -(-EXAMPLES // BATCH)
    job = {"model_dir": str(tiny_bert_dir), "out": str(tmp_path), "device": "cpu"}
    distributed.launch(
        2, "tests.test_distributed:train_sharded_in_group", {**job, "kill_at": steps_per_epoch + 1}
    )
    print(f"2 FSDP processes, 3 runs: {time.perf_counter() - start:.1f} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    before, single, single_history = train_once(str(tiny_bert_dir))
    sharded, sharded_history = ranks[0]["whole"]
    frozen = [n for n in single if n.startswith(("bert.embeddings", "bert.encoder.layer.0."))]
    thawed = [n for n in single if n.startswith("bert.encoder.layer.1.")]
    for name, value in single.items():
        assert sharded[name].shape == value.shape, name
        if name in frozen:
            assert torch.equal(sharded[name], before[name]), name
        else:
            assert not torch.equal(value, before[name]), name
            torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(ranks[1]["whole"][0][name], sharded[name]), name
    assert thawed
    for column in ("train_loss", "val_loss", "val_macro_f1"):
        assert sharded_history[column].to_numpy() == pytest.approx(
            single_history[column].to_numpy(), rel=1e-5, abs=1e-6
        ), column
    # killed in epoch 2, resumed from epoch 1's checkpoint: the same bits as never stopped
    assert ranks[0]["killed"] and ranks[1]["killed"]
    resumed, resumed_history = ranks[0]["resumed"]
    for name, value in sharded.items():
        assert torch.equal(resumed[name], value), name
    columns = ["epoch", "train_loss", "val_loss", "val_macro_f1", "lr"]
    assert resumed_history[columns].equals(sharded_history[columns])
    # the last checkpoint, as one process loads it: whole tensors, the last epoch's
    state = Checkpoints(tmp_path / "checkpoint", {}).read()
    assert state["epoch"] == EPOCHS and state["epoch_done"]
    for name, value in state["trainable"].items():
        assert torch.equal(value, sharded[name]), name
    exp_avg = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert {tuple(t.shape) for t in exp_avg} >= {tuple(single[n].shape) for n in thawed}


def test_fsdp_refuses_what_it_cannot_shard():
    from adaptune.strategies.auto_rgn import AutoRGNHooks

    settings = train_settings("fsdp")
    training.check_shardable(training.strategies.TrainingHooks(None, settings), settings)
    with pytest.raises(ConfigError, match=r"train\.sharding = 'fsdp'.*before_step.*ddp"):
        training.check_shardable(AutoRGNHooks(None, settings), settings)
    bf16 = TrainSettings.from_config({"sharding": "fsdp", "weight_precision": "bf16"})
    with pytest.raises(ConfigError, match="weight_precision"):
        training.check_shardable(training.strategies.TrainingHooks(None, bf16), bf16)


def test_several_devices_need_a_device_kind_not_one_device():
    TrainSettings.from_config({"devices": 2, "device": "cpu"})
    with pytest.raises(ConfigError, match=r"train\.device"):
        TrainSettings.from_config({"devices": 2, "device": "cuda:1"})
    with pytest.raises(ConfigError, match="devices"):
        TrainSettings.from_config({"devices": 0})


def test_torchrun_command_stays_on_this_machine():
    command = distributed.torchrun_command(4, "m:f", "/tmp/job.json")
    assert command[command.index("--nproc-per-node") + 1] == "4"
    assert command[command.index("--rdzv-endpoint") + 1].startswith("127.0.0.1:")
    assert command[command.index("--nnodes") + 1] == "1"
    assert command[-3:] == ["adaptune.distributed", "m:f", "/tmp/job.json"]


@pytest.fixture
def no_gpu_assigned(monkeypatch):
    monkeypatch.delenv(devices.VISIBLE, raising=False)


def test_concurrent_jobs_get_distinct_gpus(tmp_path, no_gpu_assigned):
    # Each claim is what one job takes (its own open lock files).
    first = devices.try_claim(1, 3, tmp_path)
    second = devices.try_claim(2, 3, tmp_path)
    assert sorted(first) == [0] and sorted(second) == [1, 2]
    assert devices.try_claim(1, 3, tmp_path) is None
    devices.release(second)
    third = devices.try_claim(1, 3, tmp_path)
    assert sorted(third) == [1]
    with pytest.raises(TimeoutError), devices.claimed(2, tmp_path, total=3, wait_seconds=0):
        pass
    devices.release(first)
    with devices.claimed(2, tmp_path, total=3) as mine:
        assert mine == [0, 2] and os.environ[devices.VISIBLE] == "0,2"
    assert devices.VISIBLE not in os.environ
    devices.release(third)
    with devices.claimed(3, tmp_path, total=3) as everything:
        assert everything == [0, 1, 2]


def test_another_process_holds_its_gpu_until_it_ends(tmp_path, no_gpu_assigned, workers):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from adaptune import devices\n"
            f"with devices.claimed(1, Path({str(tmp_path)!r}), total=2) as got:\n"
            "    print(got, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "[0]"
        with devices.claimed(1, tmp_path, total=2) as mine:
            assert mine == [1]
    finally:
        holder.kill()
        holder.wait()
    with devices.claimed(2, tmp_path, total=2) as both:  # the lock died with its process
        assert both == [0, 1]


def test_a_scheduler_assignment_stands_and_no_gpu_means_none(tmp_path, monkeypatch):
    monkeypatch.setenv(devices.VISIBLE, "3")
    with devices.claimed(1, tmp_path, total=8) as got:
        assert got == [] and os.environ[devices.VISIBLE] == "3"
    monkeypatch.delenv(devices.VISIBLE)
    with devices.claimed(2, tmp_path, total=0) as got:
        assert got == [] and devices.VISIBLE not in os.environ
    with pytest.raises(ConfigError, match=r"train\.devices"), devices.claimed(4, tmp_path, total=2):
        pass


def fail_on_rank_one(job: dict[str, Any]) -> None:
    if distributed.current().rank == 1:
        raise ValueError("rank 1 fails on purpose")
    torch.distributed.barrier()  # rank 0 waits for a rank that is gone


def test_a_failing_rank_fails_the_launch_and_stops_the_others(workers):
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="torchrun with 2 processes failed"):
        distributed.launch(2, "tests.test_distributed:fail_on_rank_one", {"device": "cpu"})
    assert time.perf_counter() - start < 60  # rank 0 did not wait out the barrier's timeout


def train_decoder_once(model_dir: str) -> tuple[dict[str, torch.Tensor], ...]:
    """A tiny decoder LM on real articles, 15 of them in global batches of 7, under the thawing
    plan's pattern found from its layers: input and block 1 frozen (the feature cache serves
    them), block 2 thawing in epoch 2, the final norm and the head training throughout. The
    weights before and after the last epoch, the history and the plan."""
    from adaptune.layers import assign_layers

    from .decoders import decoder_task, news_splits

    parts, info = news_splits(Path(model_dir), {"train": 3, "val": 2})
    assert len(parts["train"]) == EXAMPLES
    task = decoder_task(Path(model_dir), info)
    without_dropout(task.model)
    layers = assign_layers(task.model, task.head)
    thaw = {n: 2 if layer.index == 2 else 1 for n, layer in layers.items()}
    plan = Plan(
        "thaw",
        "full",
        [
            TensorPlan(n, "l", 0, p.numel(), layers[n].index <= 1, 1.0, "", thaw[n])
            for n, p in task.model.named_parameters()
        ],
    )
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    after: dict[str, torch.Tensor] = {}

    def keep(row: dict[str, float]) -> None:
        after.update({n: p.detach().clone() for n, p in task.model.named_parameters()})

    result = training.train(
        task,
        plan,
        parts["train"],
        parts["val"],
        train_settings(),
        0,
        torch.device("cpu"),
        on_epoch=keep,
    )
    return before, after, result.history, plan


def train_decoder_in_group(job: dict[str, Any]) -> None:
    torch.set_num_threads(1)  # two processes on a shared machine: one thread each
    world = distributed.current()
    assert world.size == 2 and dist_backend() == "gloo"
    result = train_decoder_once(job["model_dir"])[1:3]
    torch.save(result, Path(job["out"]) / f"rank{world.rank}.pt")


@pytest.mark.slow
def test_two_gloo_processes_train_a_decoder_as_one(
    decoder_tokenizer, tmp_path, workers, one_thread
):
    """The Llama family (grouped-query attention, rotary positions, a pad token added): two
    ranks take the steps one process takes, frozen tensors stay bit-identical, and block 2
    thaws in epoch 2 on both. Slow (about 40 s of CPU): DDP's steps are checked on the tiny
    BERT above, the decoder's padding, layers and cache in tests/test_decoders.py."""
    from .decoders import save_tiny_decoder

    model_dir = save_tiny_decoder(tmp_path / "llama", "llama", decoder_tokenizer)
    distributed.launch(
        2,
        "tests.test_distributed:train_decoder_in_group",
        {"model_dir": str(model_dir), "out": str(tmp_path), "device": "cpu"},
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    before, single, single_history, plan = train_decoder_once(str(model_dir))
    ddp, ddp_history = ranks[0]
    frozen = {t.name for t in plan.tensors if t.frozen}
    assert frozen and any(t.unfreeze_epoch == 2 for t in plan.tensors)
    for name, value in single.items():
        if name in frozen:
            assert torch.equal(ddp[name], before[name]), name  # bit-identical
        else:
            assert not torch.equal(value, before[name]), name  # it trained
            torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(ranks[1][0][name], ddp[name]), name  # both replicas agree
    for column in ("train_loss", "val_loss", "val_macro_f1"):
        assert ddp_history[column].to_numpy() == pytest.approx(
            single_history[column].to_numpy(), rel=1e-5, abs=1e-6
        ), column
