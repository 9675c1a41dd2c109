import numpy as np
import pandas as pd
import pytest
import torch

from adaptune.models import load_model
from adaptune.plans import Plan, TensorPlan
from adaptune.settings import TrainSettings
from adaptune.training import finetune, predict

from .conftest import DEVICES

TEXT = {"modality": "text", "pad_token_id": 0}


def frame(n: int, seed: int) -> pd.DataFrame:
    """Three classes the tiny model can tell apart from their first token."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    ids = [np.concatenate([[100 + 50 * y], rng.integers(200, 900, size=7)]) for y in labels]
    return pd.DataFrame({"input_ids": ids, "label_id": labels})


def body_frozen_plan(model) -> Plan:
    return Plan(
        "probe",
        "test",
        [
            TensorPlan(
                n, "l", 0, p.numel(), not n.startswith(("classifier", "bert.pooler")), 1.0, ""
            )
            for n, p in model.named_parameters()
        ],
    )


@pytest.fixture
def task(tiny_bert_dir):
    return load_model(f"path:{tiny_bert_dir}", ["a", "b", "c"], seed=0)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_tensors_are_bit_identical_and_hold_no_state(task, device):
    model = task.model
    plan = body_frozen_plan(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrainSettings(optimizer="adam", lr=1e-2, epochs=2, batch_size=8, eval_batch_size=16)
    result = finetune(
        model, plan, frame(24, 0), frame(12, 1), settings, 0, TEXT, torch.device(device)
    )
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
    settings = TrainSettings(lr=3e-3, epochs=4, batch_size=8, warmup_ratio=0.0)
    val = frame(30, 1)
    result = finetune(model, plan, frame(48, 0), val, settings, 0, TEXT, torch.device(device))
    history = result.history
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert result.best_val_macro_f1 == history["val_macro_f1"].max()
    assert result.best_epoch == int(history.loc[history["val_macro_f1"].idxmax(), "epoch"])
    logits = predict(model, val, 16, TEXT, torch.device(device))
    from adaptune.evaluation import classification_metrics

    restored = classification_metrics(val["label_id"].to_numpy(), logits.argmax(1), 3)["macro_f1"]
    assert restored == pytest.approx(result.best_val_macro_f1)
    assert result.best_val_macro_f1 > 0.6


def test_same_seed_same_result(tiny_bert_dir):
    def run():
        task = load_model(f"path:{tiny_bert_dir}", ["a", "b", "c"], seed=3)
        plan = Plan(
            "full",
            "full",
            [
                TensorPlan(n, "l", 0, p.numel(), False, 1.0, "")
                for n, p in task.model.named_parameters()
            ],
        )
        settings = TrainSettings(lr=1e-3, epochs=1, batch_size=8)
        finetune(
            task.model, plan, frame(16, 0), frame(9, 1), settings, 3, TEXT, torch.device("cpu")
        )
        return torch.cat([p.detach().flatten() for p in task.model.parameters()])

    assert torch.equal(run(), run())


def test_scheduled_tensors_wait_for_their_epoch(task):
    model = task.model
    plan = Plan(
        "gradual",
        "gradual_unfreeze",
        [
            TensorPlan(n, "l", 0, p.numel(), False, 1.0, "", 1 if n.startswith("classifier") else 2)
            for n, p in model.named_parameters()
        ],
    )
    from adaptune.optim import apply_plan

    apply_plan(model, plan, epoch=2)
    assert all(p.requires_grad for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrainSettings(lr=1e-2, epochs=1, batch_size=8)
    finetune(model, plan, frame(16, 0), frame(9, 1), settings, 0, TEXT, torch.device("cpu"))
    for name, param in model.named_parameters():
        head = name.startswith("classifier")
        assert torch.equal(before[name], param.detach()) != head, name
        assert (param.grad is None) != head, name


def test_childtuning_d_trains_only_the_top_fisher_weights(task):
    model = task.model
    plan = Plan(
        "child",
        "childtuning_d",
        [TensorPlan(n, "l", 0, p.numel(), False, 1.0, "") for n, p in model.named_parameters()],
        settings={"p": 0.05},
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrainSettings(optimizer="adam", lr=1e-3, weight_decay=0.0, epochs=1, batch_size=8)
    finetune(model, plan, frame(16, 0), frame(9, 1), settings, 0, TEXT, torch.device("cpu"))
    total = sum(p.numel() for p in model.parameters())
    changed = sum(int((before[n] != p.detach()).sum()) for n, p in model.named_parameters())
    assert 0 < changed <= round(0.05 * total) + 1


def test_lora_trains_adapters_only_and_merges_into_a_plain_model(task, tiny_bert_dir, tmp_path):
    from adaptune.adapters import attention_projections
    from adaptune.models import load_finetuned

    model = task.model
    targets = attention_projections(model, task.head)
    assert "bert.encoder.layer.1.attention.self.query" in targets and len(targets) == 8
    plan = Plan(
        "lora",
        "lora",
        [
            TensorPlan(n, "l", 0, p.numel(), not n.startswith("classifier"), 1.0, "")
            for n, p in model.named_parameters()
        ],
        settings={"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": None},
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrainSettings(lr=5e-3, epochs=1, batch_size=8, warmup_ratio=0.0)
    val = frame(9, 1)
    result = finetune(model, plan, frame(16, 0), val, settings, 0, TEXT, torch.device("cpu"))
    # adapters: 8 projections x r x (in + out) = 8 x 4 x 64, plus the head
    assert result.trainable_params == 8 * 4 * 64 + 32 * 3 + 3
    assert set(before) == {n for n, _ in model.named_parameters()}  # merged and unloaded
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {f"{t}.weight" for t in targets} | {"classifier.weight", "classifier.bias"}
    logits = predict(model, val, 16, TEXT, torch.device("cpu"))
    model.save_pretrained(tmp_path)
    reloaded = predict(load_finetuned(tmp_path), val, 16, TEXT, torch.device("cpu"))
    np.testing.assert_allclose(reloaded, logits, atol=1e-5)
