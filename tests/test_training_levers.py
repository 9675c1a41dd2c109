"""The training loop's levers, each on the real optimizer after real steps of the tiny BERT:
gradient accumulation, early stopping, bf16 weights with fp32 masters, gradient checkpointing,
what a run records of its memory and throughput, and an out-of-memory error's message."""

import pytest
import torch
from torch import nn

from adaptune import training
from adaptune.memory import OutOfMemory, checkpointed_blocks
from adaptune.plans import Plan, TensorPlan
from adaptune.settings import TrainSettings

from .conftest import tiny_task
from .test_distributed import without_dropout
from .test_training import frame


def settings(**values) -> TrainSettings:
    return TrainSettings.from_config({"optimizer": "adamw", "warmup_ratio": 0.0, **values})


def plan_of(model: nn.Module, frozen=lambda name: False, thaw=lambda name: 1) -> Plan:
    return Plan(
        "p",
        "full",
        [
            TensorPlan(n, "l", 0, p.numel(), frozen(n), 1.0, "", thaw(n))
            for n, p in model.named_parameters()
        ],
    )


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def last_epoch_weights(tiny_bert_dir, **values) -> dict[str, torch.Tensor]:
    """The tiny BERT without dropout after two epochs of full fine-tuning on 20 examples in
    batches of 8 (8, 8, 4), as the last epoch left it."""
    task = tiny_task(tiny_bert_dir, ["a", "b", "c"])
    without_dropout(task.model)
    train = settings(lr=1e-2, epochs=2, batch_size=8, max_grad_norm=1.0, **values)
    training.train(
        task,
        plan_of(task.model),
        frame(20, 0),
        frame(9, 1),
        train,
        0,
        torch.device("cpu"),
        restore_best=False,
    )
    return weights(task.model)


def test_accumulation_takes_the_steps_of_the_whole_batch(tiny_bert_dir):
    """Three micro-batches of 3, 3 and 2 examples (and 2 and 2 for the last batch of 4) give
    the updates of one batch of 8: losses are weighed by examples, not by micro-batch."""
    whole = last_epoch_weights(tiny_bert_dir)
    split = last_epoch_weights(tiny_bert_dir, accumulate_steps=3)
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, rtol=0, atol=1e-5, msg=name)
    # The micro-batches' mean losses unweighted would not: a check that the test can fail.
    naive = training.TrainingLoop.accumulate

    def unweighted(self, replica, batch, cache, global_count):
        return naive(self, replica, batch, cache, global_count * 10**6)  # every weight wrong

    training.TrainingLoop.accumulate = unweighted
    try:
        wrong = last_epoch_weights(tiny_bert_dir, accumulate_steps=3)
    finally:
        training.TrainingLoop.accumulate = naive
    assert any((wrong[n] - whole[n]).abs().max() > 1e-3 for n in whole)


def test_early_stopping_waits_for_the_last_phase_and_keeps_the_best(tiny_bert_dir):
    """At a learning rate too small to change a prediction, validation macro-F1 stays flat:
    with patience 2, a plan whose tensors all train from epoch 1 stops after epoch 3; one whose
    body thaws in epoch 4 (the last phase) only after epoch 6. The best epoch is the first."""
    for thaw_epoch, stop in ((1, 3), (4, 6)):
        task = tiny_task(tiny_bert_dir, ["a", "b", "c"])
        plan = plan_of(task.model, thaw=lambda n, e=thaw_epoch: 1 if "classifier" in n else e)
        train = settings(lr=1e-9, epochs=10, batch_size=8, early_stopping={"patience": 2})
        result = training.train(
            task, plan, frame(16, 0), frame(9, 1), train, 0, torch.device("cpu")
        )
        assert result.stopped_epoch == stop and len(result.history) == stop
        assert result.best_epoch == 1 and result.seconds_saved > 0
    never = settings(lr=1e-9, epochs=4, batch_size=8)  # patience 0: off
    task = tiny_task(tiny_bert_dir, ["a", "b", "c"])
    result = training.train(
        task, plan_of(task.model), frame(16, 0), frame(9, 1), never, 0, torch.device("cpu")
    )
    assert result.stopped_epoch == 4 and result.seconds_saved == 0


def test_bf16_weights_train_through_fp32_masters(tiny_bert_dir):
    """bf16 weights: the model is bfloat16 while it trains, the optimizer's tensors and state
    fp32; frozen tensors keep their (rounded) values; the trained model comes back in fp32."""
    task = tiny_task(tiny_bert_dir, ["a", "b", "c"])
    model = task.model
    plan = plan_of(model, frozen=lambda n: not n.startswith(("classifier", "bert.pooler")))
    before = weights(model)
    seen = {}

    def look(row):
        seen["dtypes"] = {p.dtype for p in model.parameters()}

    train = settings(lr=1e-2, epochs=2, batch_size=8, weight_precision="bf16", precision="bf16")
    result = training.train(
        task, plan, frame(16, 0), frame(9, 1), train, 0, torch.device("cpu"), on_epoch=look
    )
    assert seen["dtypes"] == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    trainable = [
        (n, p) for n, p in model.named_parameters() if n.startswith(("classifier", "bert.pooler"))
    ]
    for name, param in model.named_parameters():
        if any(name == n for n, _ in trainable):
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name].bfloat16().float()), name
    numel = sum(p.numel() for _, p in trainable)
    # AdamW in fp32: two moments per trained weight and a step counter per tensor.
    assert result.optimizer_state_bytes == 8 * numel + 4 * len(trainable)


def test_gradient_checkpointing_recomputes_blocks_and_changes_no_update(tiny_bert_dir):
    """Every block runs twice per step (forward, then again in the backward pass), the
    embeddings below (frozen) still let gradients reach the blocks, and the weights are those
    of a run without it."""

    pretrained = weights(tiny_task(tiny_bert_dir, ["a", "b", "c"]).model)

    def run(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        task = tiny_task(tiny_bert_dir, ["a", "b", "c"])
        without_dropout(task.model)
        calls = []
        block = task.model.bert.encoder.layer[0]
        # A module inside the block: recomputation calls the block's forward, not the block.
        block.output.dense.register_forward_hook(lambda *_: calls.append(1))
        plan = plan_of(task.model, frozen=lambda n: n.startswith("bert.embeddings"))
        train = settings(lr=1e-2, epochs=1, batch_size=8, gradient_checkpointing=checkpointing)
        training.train(
            task,
            plan,
            frame(16, 0),
            frame(9, 1),
            train,
            0,
            torch.device("cpu"),
            restore_best=False,
        )
        assert "forward" not in vars(block)  # the wrapper is gone
        return weights(task.model), len(calls)

    plain, plain_calls = run(False)
    checkpointed, checkpointed_calls = run(True)
    # 2 training steps, then validation (1 batch): 3 calls without, 2 more with recomputation.
    assert (plain_calls, checkpointed_calls) == (3, 5)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=0, atol=1e-6, msg=name)
    block_weight = "bert.encoder.layer.0.output.dense.weight"
    assert not torch.equal(checkpointed[block_weight], pretrained[block_weight])


def test_blocks_are_found_from_the_module_tree_for_checkpointing():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    with checkpointed_blocks(model, head=()) as blocks:
        assert blocks == ["1.0", "1.1"]
        assert "forward" in vars(model[1][0])
    assert "forward" not in vars(model[1][0])


def test_a_run_records_its_memory_and_throughput(tiny_bert_dir):
    task = tiny_task(tiny_bert_dir, ["a", "b", "c"])
    model = task.model
    steps = []
    train = settings(lr=1e-3, epochs=1, batch_size=8, optimizer="sgd", momentum=0.9)
    result = training.train(
        task,
        plan_of(model),
        frame(16, 0),
        frame(9, 1),
        train,
        0,
        torch.device("cpu"),
        on_steps=steps.extend,
    )
    numel = sum(p.numel() for p in model.parameters())
    assert result.optimizer_state_bytes == 4 * numel  # SGD: one momentum buffer per weight
    assert result.peak_memory_kind == "process_rss" and result.peak_memory_bytes > 100e6
    row = result.history.iloc[0]
    assert row["train_examples_per_second"] > 0
    # Texts of 8 tokens each, no padding.
    tokens_per_example = row["train_tokens_per_second"] / row["train_examples_per_second"]
    assert tokens_per_example == pytest.approx(8)
    assert len(steps) == 2 and all(s["grad_norm"] > 0 for s in steps)


def test_running_out_of_memory_names_the_levers(tiny_bert_dir, monkeypatch):
    task = tiny_task(tiny_bert_dir, ["a", "b", "c"])

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(task.modality, "forward", exhausted)
    with pytest.raises(OutOfMemory, match=r"train\.accumulate_steps.*gradient_checkpointing"):
        training.train(
            task,
            plan_of(task.model),
            frame(16, 0),
            frame(9, 1),
            settings(epochs=1),
            0,
            torch.device("cpu"),
        )
