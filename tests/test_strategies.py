"""Strategy kinds with training hooks (Auto-RGN, ChildTuning-D, LoRA, LP-FT), each trained on the
tiny BERT or checked on a small network; and the registry that holds them."""

import numpy as np
import pytest
import torch
from torch import nn

from adaptune import strategies, training
from adaptune.evaluation import predict
from adaptune.optim import build_optimizer, param_groups, warmup_linear_schedule
from adaptune.plans import Plan, TensorPlan
from adaptune.settings import TrainSettings
from adaptune.strategies import NoSettings, TrainingContext
from adaptune.strategies.auto_rgn import AutoRGNHooks
from adaptune.strategies.lora import attention_projections

from .conftest import tiny_task
from .test_training import frame


def settings(**values) -> TrainSettings:
    return TrainSettings.from_config(values)


def plan_of(model: nn.Module, kind: str, frozen=lambda name: False, head=(), **plan_settings):
    return Plan(
        kind,
        kind,
        [
            TensorPlan(n, "l", 0, p.numel(), frozen(n), 0.0 if frozen(n) else 1.0, "", 1, n in head)
            for n, p in model.named_parameters()
        ],
        settings=plan_settings,
    )


@pytest.fixture
def task(tiny_bert_dir):
    return tiny_task(tiny_bert_dir, ["a", "b", "c"])


def test_every_kind_is_one_registry_entry_with_a_builder():
    kinds = strategies.kinds()
    assert {k.name for k in kinds.values()} == set(kinds)
    assert kinds["auto_rgn"].hooks.per_tensor_groups
    assert not kinds["full"].hooks.per_tensor_groups


def test_auto_rgn_sets_lr_by_relative_gradient_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    head = list(dict(model.named_parameters()))[-2]

    def hooks_for(exempt: tuple[str, ...]) -> AutoRGNHooks:
        plan = plan_of(model, "auto_rgn", head=exempt)
        hooks = AutoRGNHooks(NoSettings(), settings(lr=0.1, optimizer="sgd"))
        hooks.start(TrainingContext(None, plan, None, hooks.train, None, optimizer, scheduler))
        return hooks

    groups = param_groups(model, plan_of(model, "auto_rgn"), 0.0, per_tensor=True)
    assert [g["names"] for g in groups] == [[n] for n, _ in model.named_parameters()]
    optimizer = build_optimizer(groups, settings(lr=0.1, optimizer="sgd"))
    scheduler = warmup_linear_schedule(optimizer, total_steps=10, warmup_ratio=0.0)
    hooks = hooks_for(())
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    nn.functional.cross_entropy(model(x), y).backward()
    ratios = [float(p.grad.norm() / p.detach().norm()) for p in model.parameters()]
    top = max(r for r in ratios if np.isfinite(r))
    hooks.before_step(first_step_of_epoch=True)
    lrs = [g["lr"] for g in optimizer.param_groups]
    # The LayerNorm bias starts at zero: no relative norm, so the base rate.
    assert lrs == pytest.approx([0.1 * r / top if np.isfinite(r) else 0.1 for r in ratios])
    assert max(g["lr_multiplier"] for g in optimizer.param_groups) == 1.0
    # The new head keeps the base rate and leaves the normalisation.
    hooks_for((head,)).before_step(True)
    body = [r for (n, _), r in zip(model.named_parameters(), ratios, strict=True) if n != head]
    top_body = max(r for r in body if np.isfinite(r))
    expected = [
        0.1 if n == head or not np.isfinite(r) else 0.1 * r / top_body
        for (n, _), r in zip(model.named_parameters(), ratios, strict=True)
    ]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected)
    hooks.before_step(first_step_of_epoch=True)
    optimizer.step()
    scheduler.step()  # the schedule keeps scaling the new rates
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.9 * lr for lr in lrs])
    for p in model.parameters():
        p.grad = 3 * p.grad
    hooks.before_step(first_step_of_epoch=False)  # only the first step of an epoch re-measures
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.9 * lr for lr in lrs])


def test_childtuning_d_trains_only_the_top_fisher_weights(task):
    model = task.model
    plan = plan_of(model, "childtuning_d", p=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = settings(optimizer="adam", lr=1e-3, weight_decay=0.0, epochs=1, batch_size=8)
    result = training.train(task, plan, frame(16, 0), frame(9, 1), train, 0, torch.device("cpu"))
    total = sum(p.numel() for p in model.parameters())
    changed = sum(int((before[n] != p.detach()).sum()) for n, p in model.named_parameters())
    assert 0 < changed <= round(0.05 * total) + 1
    assert changed <= result.trainable_params <= round(0.05 * total) + 1


def test_lora_trains_adapters_only_and_merges_into_a_plain_model(task, tmp_path):
    model = task.model
    targets = attention_projections(model, task.head)
    assert "bert.encoder.layer.1.attention.self.query" in targets and len(targets) == 8
    plan = plan_of(
        model,
        "lora",
        frozen=lambda n: not n.startswith("classifier"),
        r=4,
        alpha=8.0,
        dropout=0.0,
        targets=[],
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = settings(lr=5e-3, epochs=1, batch_size=8, warmup_ratio=0.0)
    val = frame(9, 1)
    result = training.train(task, plan, frame(16, 0), val, train, 0, torch.device("cpu"))
    # adapters: 8 projections x r x (in + out) = 8 x 4 x 64, plus the head
    assert result.trainable_params == 8 * 4 * 64 + 32 * 3 + 3
    assert set(before) == {n for n, _ in model.named_parameters()}  # merged and unloaded
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {f"{t}.weight" for t in targets} | {"classifier.weight", "classifier.bias"}
    logits = predict(task, val, 16, torch.device("cpu"))
    model.save_pretrained(tmp_path)
    reloaded = task.modality.load_finetuned(tmp_path)
    np.testing.assert_allclose(predict(reloaded, val, 16, torch.device("cpu")), logits, atol=1e-5)


def test_lp_ft_probes_the_head_at_its_rate_then_fine_tunes_everything(task):
    """During the probe only the head moves, at probe_lr; then every tensor trains, from the
    probed head, on the run's warm-up and decay."""
    model = task.model
    head = tuple(task.head)
    body = [n for n, _ in model.named_parameters() if n not in head]
    plan = Plan(
        "lp_ft",
        "lp_ft",
        [
            TensorPlan(n, "l", 0, p.numel(), False, 1.0, "", 1 if n in head else 3, n in head)
            for n, p in model.named_parameters()
        ],
        settings={"probe_epochs": 2, "probe_lr": 0.05},
    )
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen: list[dict[str, float]] = []
    train = settings(
        optimizer="sgd", momentum=0.0, lr=1e-3, epochs=3, batch_size=8, warmup_ratio=0.5
    )
    after: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch(row):
        seen.append(row)
        after[row["epoch"]] = {n: p.detach().clone() for n, p in model.named_parameters()}

    training.train(task, plan, frame(16, 0), frame(9, 1), train, 0, torch.device("cpu"), on_epoch)
    assert all(torch.equal(start[n], after[2][n]) for n in body)
    assert not torch.equal(start[head[0]], after[2][head[0]])
    assert all(not torch.equal(after[2][n], after[3][n]) for n in body if "embeddings" not in n)
    # The base rate times the schedule that each epoch's last step used: probe_lr while
    # probing; then the fine-tuning phase's 2 steps warm up (step 1) and reach the peak lr
    # (step 2, where the linear decay to 0 starts).
    assert seen[0]["lr"] == pytest.approx(0.05)
    assert seen[2]["lr"] == pytest.approx(1e-3)
