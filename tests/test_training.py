import numpy as np
import pandas as pd
import pytest
import torch

from adaptune import training
from adaptune.evaluation import predict
from adaptune.plans import Plan, TensorPlan
from adaptune.settings import TrainSettings

from .conftest import DEVICES, tiny_task


def frame(n: int, seed: int) -> pd.DataFrame:
    """Three classes the tiny model can tell apart from their first token."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    ids = [np.concatenate([[100 + 50 * y], rng.integers(200, 900, size=7)]) for y in labels]
    return pd.DataFrame({"input_ids": ids, "label_id": labels})


def settings(**values) -> TrainSettings:
    return TrainSettings.from_config(values)


def body_frozen_plan(model) -> Plan:
    return Plan(
        "probe",
        "head_only",
        [
            TensorPlan(
                n, "l", 0, p.numel(), not n.startswith(("classifier", "bert.pooler")), 1.0, ""
            )
            for n, p in model.named_parameters()
        ],
    )


@pytest.fixture
def task(tiny_bert_dir):
    return tiny_task(tiny_bert_dir, ["a", "b", "c"])


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_tensors_are_bit_identical_and_hold_no_state(task, device):
    model = task.model
    plan = body_frozen_plan(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = settings(optimizer="adam", lr=1e-2, epochs=2, batch_size=8, eval_batch_size=16)
    result = training.train(task, plan, frame(24, 0), frame(12, 1), train, 0, torch.device(device))
    frozen = {t.name for t in plan.tensors if t.frozen}
    for name, param in model.named_parameters():
        assert param.device.type == device
        changed = not torch.equal(before[name], param.detach().cpu())
        assert changed == (name not in frozen), name
        assert (param.grad is None) == (name in frozen), name
    assert len(result.history) == 2 and result.optimizer_groups == 2


@pytest.mark.parametrize("device", DEVICES)
def test_training_learns_and_keeps_the_best_epoch(task, device):
    model = task.model
    plan = Plan(
        "full",
        "full",
        [TensorPlan(n, "l", 0, p.numel(), False, 1.0, "") for n, p in model.named_parameters()],
    )
    train = settings(lr=3e-3, epochs=4, batch_size=8, warmup_ratio=0.0)
    val = frame(30, 1)
    result = training.train(task, plan, frame(48, 0), val, train, 0, torch.device(device))
    history = result.history
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert result.best_val_macro_f1 == history["val_macro_f1"].max()
    assert result.best_epoch == int(history.loc[history["val_macro_f1"].idxmax(), "epoch"])
    logits = predict(task, val, 16, torch.device(device))
    from adaptune.evaluation import classification_metrics

    restored = classification_metrics(val["label_id"].to_numpy(), logits.argmax(1), 3)["macro_f1"]
    assert restored == pytest.approx(result.best_val_macro_f1)
    assert result.best_val_macro_f1 > 0.6


def test_same_seed_same_result(tiny_bert_dir):
    def run():
        task = tiny_task(tiny_bert_dir, ["a", "b", "c"], seed=3)
        plan = Plan(
            "full",
            "full",
            [
                TensorPlan(n, "l", 0, p.numel(), False, 1.0, "")
                for n, p in task.model.named_parameters()
            ],
        )
        train = settings(lr=1e-3, epochs=1, batch_size=8)
        training.train(task, plan, frame(16, 0), frame(9, 1), train, 3, torch.device("cpu"))
        return torch.cat([p.detach().flatten() for p in task.model.parameters()])

    assert torch.equal(run(), run())


def test_scheduled_tensors_wait_for_their_epoch(task):
    model = task.model
    # Thawing in a later epoch is plan data, applied by the loop whatever the kind.
    plan = Plan(
        "gradual",
        "full",
        [
            TensorPlan(n, "l", 0, p.numel(), False, 1.0, "", 1 if n.startswith("classifier") else 2)
            for n, p in model.named_parameters()
        ],
    )
    from adaptune.optim import apply_plan

    apply_plan(model, plan, epoch=2)
    assert all(p.requires_grad for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = settings(lr=1e-2, epochs=1, batch_size=8)
    training.train(task, plan, frame(16, 0), frame(9, 1), train, 0, torch.device("cpu"))
    for name, param in model.named_parameters():
        head = name.startswith("classifier")
        assert torch.equal(before[name], param.detach()) != head, name
        assert (param.grad is None) != head, name
